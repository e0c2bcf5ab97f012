"""Forward+backward time of the tiny SP decoder with and without masked self-attention at the final stage, per window.
Usage: python bench/masked_attention.py [--bs 4] [--reps 3] [--windows 8 16 32] [--threads 1]

The decoder reads a 16-channel 120-px tile and four random 64-channel 15×15 states (the tiny VirTues grid), with the
types and boundary heads of Table 8's variants; `window` sets `MaskedSelfAttention.window`. A window of 128 or more
(the whole padded tile) is attention over every predicted-foreground pixel of the tile."""
import argparse, time, warnings
import torch
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
from spseg.decoder import CellViTDecoder, MaskedSelfAttention

def step_seconds(attention, window, bs, reps):
    dec = CellViTDecoder(heads=dict(types=10, boundary=1), embed_dim=64, patch_size=8, in_chans=16,
                         attention=attention, width=0.125)
    for m in dec.modules():
        if isinstance(m, MaskedSelfAttention): m.window = window
    x, z = torch.randn(bs, 16, 120, 120), [torch.randn(bs, 64, 15, 15) for _ in range(4)]
    def step(): sum(v.float().mean() for v in dec(x, z).values()).backward()
    step()
    t0 = time.perf_counter()
    for _ in range(reps): step()
    return (time.perf_counter() - t0) / reps

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--bs', type=int, default=4)
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--windows', type=int, nargs='+', default=[8, 16, 32])
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f'tiny SP decoder, batch {a.bs} of 120-px tiles, {a.threads} thread(s); fwd+bwd per step')
    print(f'no attention block        {step_seconds(None, 16, a.bs, a.reps):7.3f} s')
    for w in a.windows: print(f'masked, {w:3d}-px windows     {step_seconds("masked", w, a.bs, a.reps):7.3f} s')
