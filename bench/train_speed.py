"""Decoder training throughput on cached embeddings: tiles/s, achieved FLOP/s against this machine's measured matmul
peak (fp32, bf16), and the fastai Learner's step time against a plain PyTorch loop on the same model and batch.
On a GPU (torch.cuda.is_available()) the decoder steps also run under bf16 autocast, and the card is named.
Usage: python bench/train_speed.py [--bs 8] [--steps 4] [--widths tiny:0.125,tiny:0.25,paper:1.0]"""
import argparse, os, platform, tempfile, time, warnings
warnings.filterwarnings('ignore')
import torch
from torch.utils.flop_counter import FlopCounterMode
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.callback.core import Callback
from spseg.decoder import decoder_preset, n_params
from spseg.losses import SemanticLoss
from spseg.train import DecoderOnStates, seg_learner, AdamW

def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

def matmul_peak(dtype, device, n=None, reps=None):
    "Achieved FLOP/s of `torch.matmul` on large square matrices of `dtype` (best of `reps`)."
    cpu_bf16 = device.type == 'cpu' and dtype == torch.bfloat16    # emulated on CPUs without bf16 units: ~1 GFLOP/s
    n = n or (8192 if device.type == 'cuda' else 512 if cpu_bf16 else 2048)
    reps = reps or (20 if device.type == 'cuda' else 2 if cpu_bf16 else 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = float('inf')
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best

def fake_batch(bs, embed, device, tile=120, patch=8, chans=16, seed=0):
    "A batch as `CachedTiles` yields it: `(x_img, z1..z4, final, mask, inst, hv)`."
    g = torch.Generator().manual_seed(seed)
    grid = tile // patch
    x = torch.randn(bs, chans, tile, tile, generator=g)
    z = [torch.randn(bs, embed, grid, grid, generator=g) for _ in range(5)]
    mask = torch.randint(0, 10, (bs, tile, tile), generator=g)
    inst, hv = torch.zeros(bs, tile, tile, dtype=torch.long), torch.zeros(bs, 2, tile, tile)
    return [t.to(device) for t in (x, *z, mask, inst, hv)]

def decoder_model(preset, width, embed, device):
    torch.manual_seed(0)
    return DecoderOnStates(decoder_preset(preset, heads=dict(types=10), embed_dim=embed, width=width)).to(device)

def plain_step_fn(model, batch, loss_fn, amp, device):
    opt = AdamW(list(model.parameters()), lr=5e-4, wd=1e-2)
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(*batch[:6])
            loss = loss_fn(pred, *batch[6:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step

def time_steps(step, steps, device):
    step()                                                  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(steps): step()
    sync(device)
    return (time.perf_counter() - t) / steps

def step_flops(model, batch, loss_fn):
    "FLOPs of one forward + backward (the optimiser step's elementwise work is not counted)."
    with FlopCounterMode(display=False) as fc:
        loss_fn(model(*batch[:6]), *batch[6:]).backward()
    model.zero_grad()
    return fc.get_total_flops()

def learner_step_time(model, batch, loss_fn, steps, device, amp):
    "Seconds per training batch of a fastai `Learner` (protocol callbacks on, no validation) on copies of `batch`."
    items = [tuple(t[i].cpu() for t in batch) for i in range(len(batch[0]))] * (steps + 1)
    bs = len(batch[0])
    dls = DataLoaders(DataLoader(items, bs=bs, shuffle=False, drop_last=True), DataLoader(items[:bs], bs=bs),
                      device=device)
    for dl in dls.loaders: dl.n_inp = 6
    with tempfile.TemporaryDirectory() as d:
        learn = seg_learner(dls, model, loss_fn, d, patience=100)
        if amp: learn.to_bf16()
        class BatchTimer(Callback):   # wall time between consecutive training `after_batch` events
            order = 99
            def before_fit(self): self.t, self.dts = None, []
            def after_batch(self):
                if not self.training: return
                sync(device)
                now = time.perf_counter()
                if self.t is not None: self.dts.append(now - self.t)
                self.t = now
        bt = BatchTimer()
        learn.fit(1, 5e-4, cbs=[bt])
        return sum(bt.dts) / len(bt.dts)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--bs', type=int, default=8)
    ap.add_argument('--steps', type=int, default=4)
    ap.add_argument('--widths', default='tiny:0.125,tiny:0.25,paper:1.0')
    a = ap.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    card = torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()
    print(f'device: {device.type} ({card}); torch {torch.__version__}; threads {torch.get_num_threads()}; '
          f'load average {os.getloadavg()[0]:.2f}; bs {a.bs}; steps {a.steps}')
    peaks = {dt: matmul_peak(dt, device) for dt in (torch.float32, torch.bfloat16)}
    print('matmul peak: ' + ', '.join(f'{str(dt).split(".")[1]} {p / 1e12:.3f} TFLOP/s' for dt, p in peaks.items()))
    loss_fn = SemanticLoss()
    amps = [False, True] if device.type == 'cuda' else [False]
    for spec in a.widths.split(','):
        preset, width = spec.split(':')
        width = float(width)
        for embed in (64, 512):
            if (preset == 'paper') != (embed == 512): continue     # tiny encoder (64): tiny widths; paper: paper
            model = decoder_model(preset, width, embed, device)
            batch = fake_batch(a.bs, embed, device)
            flops = step_flops(model, batch, loss_fn)
            for amp in amps:
                s_plain = time_steps(plain_step_fn(model, batch, loss_fn, amp, device), a.steps, device)
                s_learn = learner_step_time(model, batch, loss_fn, a.steps, device, amp)
                peak = peaks[torch.bfloat16 if amp else torch.float32]
                dtype = 'bf16' if amp else 'fp32'
                print(f'{preset:5s} width {width:<5} embed {embed:3d} params {n_params(model):>10,d} {dtype}: '
                      f'{a.bs / s_plain:8.1f} tiles/s, {flops / a.bs / 1e9:7.2f} GFLOP/tile (fwd+bwd), '
                      f'{flops / s_plain / 1e12:.4f} TFLOP/s = {100 * flops / s_plain / peak:5.1f}% of matmul peak; '
                      f'plain loop {1000 * s_plain:7.1f} ms/step, fastai Learner {1000 * s_learn:7.1f} ms/step '
                      f'(ratio {s_learn / s_plain:.2f})')
    print(f'load average at the end {os.getloadavg()[0]:.2f}')

if __name__ == '__main__': main()
