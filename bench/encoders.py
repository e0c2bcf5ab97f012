"""Encoder forward throughput and achieved FLOP/s vs this machine's matmul peak (printed figures, not tests).

    .venv/bin/python bench/encoders.py [--quick] [--threads N]

Inputs are 120×120 tiles as each encoder reads them (`encoder.encoder_input`): 16-channel SP for VirTues, the matching
H&E tile resized by the ViT's input scale (×2, to 240×240) for the ViT, so both see a 15×15 token grid (see
nbs/01_encoders.ipynb, "Pairing"). FLOPs per tile are counted by
`torch.utils.flop_counter` on the meta device (matmuls and attention; elementwise work is not counted). Peaks are the
best of several matmul shapes measured in the same run. On a GPU the same is repeated under bf16 autocast.
"""
import argparse, time, platform
import torch
from torch.utils.flop_counter import FlopCounterMode
from spseg.encoders import VirTuesEncoder, CellViTEncoder

def best_rate(f, flops, reps, sync=lambda: None):
    "Best FLOP/s over `reps` timed calls (after one warm-up)."
    f(); sync(); best = float('inf')
    for _ in range(reps):
        t = time.perf_counter(); f(); sync(); best = min(best, time.perf_counter() - t)
    return flops / best

def matmul_peak(dtype, device, shapes, reps=5):
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    out = 0.
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        out = max(out, best_rate(lambda: a @ b, 2 * m * k * n, reps, sync))
    return out

TILE = 120

def tile_input(enc, bs, device=None):
    "A batch of `bs` random 120-px tiles as `enc` reads them (its own modality, at its input scale)."
    sp, he = torch.randn(bs, 16, TILE, TILE, device=device), torch.randn(bs, 3, TILE, TILE, device=device)
    return enc.encoder_input(sp=sp, he=he)

def flops_per_tile(make):
    with torch.device('meta'):
        enc = make()
        x = tile_input(enc, 1)
        with FlopCounterMode(display=False) as fc: enc(x)
    return fc.get_total_flops()

def throughput(make, bs, device, amp, reps):
    enc = make().to(device).eval()
    x = tile_input(enc, bs, device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp): enc(x)
    return best_rate(run, bs, reps, sync)   # tiles/s

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true', help='tiny presets only')
    ap.add_argument('--threads', type=int, default=None)
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    cpu = torch.device('cpu')
    cpu_name = platform.processor() or platform.machine()
    print(f'torch {torch.__version__}, {cpu_name}, {torch.get_num_threads()} threads')
    big = [(2048, 2048, 2048), (4096, 4096, 4096), (7680, 512, 1536), (7680, 1024, 512)]
    p32 = matmul_peak(torch.float32, cpu, big)
    p16 = matmul_peak(torch.bfloat16, cpu, [(512, 512, 512), (1024, 1024, 1024)], reps=2)
    print(f'CPU matmul peak: fp32 {p32 / 1e9:.1f} GFLOP/s, bf16 {p16 / 1e9:.2f} GFLOP/s')
    cases = [('VirTues', 'tiny', lambda: VirTuesEncoder('tiny'), 16),
             ('ViT-S/16', 'tiny', lambda: CellViTEncoder('tiny'), 32)]
    if not args.quick:
        cases += [('VirTues', 'paper', lambda: VirTuesEncoder('paper'), 2),
                  ('ViT-S/16', 'paper', lambda: CellViTEncoder('paper'), 16)]
    print(f'{"encoder":9s} {"preset":6s} {"GFLOP/tile":>10s} {"bs":>3s} {"tiles/s":>8s} {"GFLOP/s":>8s} '
          f'{"%fp32pk":>8s} {"%bf16pk":>8s}')
    for name, preset, make, bs in cases:
        f = flops_per_tile(make)
        tps = throughput(make, bs, cpu, False, reps=2 if preset == 'paper' else 3)
        print(f'{name:9s} {preset:6s} {f / 1e9:10.2f} {bs:3d} {tps:8.2f} {tps * f / 1e9:8.1f} '
              f'{100 * tps * f / p32:7.1f}% {100 * tps * f / p16:7.0f}%')
    if torch.cuda.is_available():
        gpu = torch.device('cuda')
        print(f'\nGPU: {torch.cuda.get_device_name(0)}')
        g32 = matmul_peak(torch.float32, gpu, [(8192, 8192, 8192)], reps=10)
        g16 = matmul_peak(torch.bfloat16, gpu, [(8192, 8192, 8192)], reps=10)
        print(f'GPU matmul peak: fp32 {g32 / 1e12:.1f} TFLOP/s, bf16 {g16 / 1e12:.1f} TFLOP/s')
        for name, preset, make, bs in cases:
            f = flops_per_tile(make)
            tps = throughput(make, 64, gpu, True, reps=5)
            print(f'{name:9s} {preset:6s} bf16 autocast bs64: {tps:8.1f} tiles/s, {tps * f / 1e12:6.1f} TFLOP/s = '
                  f'{100 * tps * f / g16:.0f}% of bf16 peak')

if __name__ == '__main__': main()
