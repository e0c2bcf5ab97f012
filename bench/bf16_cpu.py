"""bf16 autocast against float32 on this CPU: matmuls, the tiny encoders, a whole tissue (printed figures, no tests).

    .venv/bin/python bench/bf16_cpu.py [--threads 1] [--sizes 128 256 512 1024] [--bs 8] [--reps 5] [--tissue 1500]
        [--work DIR]

1. Matmul: GFLOP/s of an n×n float32 matmul, plain, under bf16 autocast (operands cast to bf16, as the encoders run),
   and on bf16 tensors (the kernel alone); then `spseg.core.bf16_speedup`, the one figure `choose_precision` uses.
2. Encoders (tiny presets, 120-px tiles as each reads them): tiles/s of `encoder.states` in float32 and under bf16
   autocast, timed interleaved (best of `--reps`, so a burst of load from other processes hits both); the per-token
   cosine similarity of the bf16 states to the float32 ones (worst and mean), on random tiles (the check
   `spseg.cache.embedding_precision` runs) and on tiles of a synthetic tissue; and the choice `embedding_precision`
   makes on this machine.
3. `--tissue N` (0 skips): `predict_tissue` of the N² synthetic tissue of `bench/inference.py` (made there if missing,
   in `--work`) with the tiny SP model (VirTues encoder, decoder with types, binary and HV heads, random weights),
   `amp=False` against `amp=True`: wall seconds, the largest class-probability difference, argmax agreement.

The machine's load (`uptime`) is printed before and after: other processes on shared cores slow the wall clock.
"""
import argparse, os, platform, subprocess, sys, time
from pathlib import Path
import numpy as np, torch

TILE = 120


def uptime():
    try: return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError: return f'load average {os.getloadavg()}'


def cpu_flags():
    "The bf16/AMX flags of this CPU (Linux), and its model name."
    try: text = Path('/proc/cpuinfo').read_text()
    except OSError: return platform.processor(), []
    name = next((l.split(':', 1)[1].strip() for l in text.splitlines() if l.startswith('model name')), '?')
    flags = next((l.split(':', 1)[1].split() for l in text.splitlines() if l.startswith('flags')), [])
    return name, sorted(f for f in flags if 'bf16' in f or f.startswith('amx'))


def interleaved(fns, reps):
    "Best seconds of each of `fns` over `reps` rounds, one call of each per round (after one warm-up call each)."
    for f in fns: f()
    best = [float('inf')] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def matmuls(sizes, reps):
    from spseg.core import bf16_speedup
    print(f'\n1. matmul n×n, GFLOP/s (best of {reps}, interleaved)')
    print(f'{"n":>6} {"float32":>9} {"bf16 autocast":>14} {"bf16 tensors":>13} {"autocast/fp32":>14}')
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        ab, bb = a.bfloat16(), b.bfloat16()
        def auto():
            with torch.autocast('cpu', dtype=torch.bfloat16): a @ b
        t = interleaved([lambda: a @ b, auto, lambda: ab @ bb], reps)
        g = [2 * n ** 3 / s / 1e9 for s in t]
        print(f'{n:>6} {g[0]:>9.1f} {g[1]:>14.1f} {g[2]:>13.1f} {g[1] / g[0]:>13.2f}×')
    print(f'spseg.core.bf16_speedup() (what choose_precision reads): {bf16_speedup():.2f}×')


def token_cosine(enc, x):
    "Worst and mean per-token cosine of `enc.states(**x)` under bf16 autocast against float32."
    with torch.inference_mode():
        a = enc.states(**x).float()
        with torch.autocast('cpu', dtype=torch.bfloat16): b = enc.states(**x).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=2)
    return float(cos.min()), float(cos.mean())


def encoders(bs, reps, real):
    from spseg.encoders import VirTuesEncoder, CellViTEncoder
    from spseg.cache import embedding_precision
    print(f'\n2. tiny encoders, batches of {bs} tiles of {TILE} px (best of {reps}, interleaved)')
    print(f'{"encoder":>8} {"fp32 tiles/s":>13} {"bf16 tiles/s":>13} {"bf16/fp32":>10} '
          f'{"cos random worst/mean":>22} {"cos tissue worst/mean":>22}  choice')
    g = torch.Generator().manual_seed(0)
    rand = dict(sp=torch.randn(bs, 16, TILE, TILE, generator=g), he=torch.randn(bs, 3, TILE, TILE, generator=g))
    for name, make in (('VirTues', lambda: VirTuesEncoder('tiny')), ('CellViT', lambda: CellViTEncoder('tiny'))):
        torch.manual_seed(0)
        enc = make().eval()
        def run(amp):
            def f():
                with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                    enc.states(**rand)
            return f
        t32, t16 = interleaved([run(False), run(True)], reps)
        cr = token_cosine(enc, rand)
        ct = token_cosine(enc, real) if real is not None else (float('nan'),) * 2
        p = embedding_precision(enc)
        print(f'{name:>8} {bs / t32:>13.1f} {bs / t16:>13.1f} {t32 / t16:>9.2f}× {cr[0]:>11.5f}/{cr[1]:.6f} '
              f'{ct[0]:>11.5f}/{ct[1]:.6f}  {p.dtype} ({p.why})')


def tissue_inputs(work, size):
    "The `bench/inference.py` tissue of `size`² and its SP statistics (synthesised there if missing)."
    sys.path.insert(0, str(Path(__file__).parent))
    from inference import make_inputs
    root, _, stats = make_inputs(work, [size], False)
    return root/f's{size}', stats


def real_tiles(path, stats, bs):
    "`bs` normalised 120-px windows (SP and H&E) from the middle of the tissue at `path`."
    from spseg.data import load_tissue, SPStats
    from spseg.inference import read_windows, tissue_norm
    t = load_tissue(path, require=())
    y = t.shape[0] // 2
    corners = [(y, x) for x in range(0, bs * TILE, TILE)]
    sp, he = read_windows(t, corners, TILE, tissue_norm(t, SPStats.load(stats)))
    return dict(sp=sp, he=he)


def whole_tissue(path, stats, bs=4):
    from spseg.data import load_tissue, SPStats
    from spseg.experiments import preset_config, make_encoder
    from spseg.decoder import decoder_for
    from spseg.train import EncoderDecoder
    from spseg.inference import predict_tissue, window_plan
    cfg = preset_config('tiny')
    torch.manual_seed(0)
    enc = make_encoder(cfg)
    kw = dict(width=cfg.width) if cfg.width is not None else {}
    model = EncoderDecoder(enc, decoder_for(enc, cfg.decoder_preset, heads=dict(types=10, binary=2, hv=2), **kw)).eval()
    t, st = load_tissue(path, require=()), SPStats.load(stats)
    print(f'\n3. predict_tissue, {t.shape[0]}×{t.shape[1]} px, {len(window_plan(*t.shape))} windows, bs={bs}, '
          f'tiny SP model (random weights), heads types+binary+hv')
    maps, secs = {}, {}
    for amp in (False, True, False, True):                                   # twice each, interleaved
        t0 = time.perf_counter()
        maps[amp] = predict_tissue(model, t, st, bs=bs, heads=('types', 'binary', 'hv'), amp=amp)
        secs[amp] = min(secs.get(amp, float('inf')), time.perf_counter() - t0)
    a, b = maps[False], maps[True]
    print(f'float32 {secs[False]:.1f} s, bf16 {secs[True]:.1f} s (best of 2): bf16 {secs[False] / secs[True]:.2f}× '
          f'as fast')
    for head in ('types', 'binary'):
        diff = np.abs(a[head] - b[head]).max()
        agree = (a[head].argmax(0) == b[head].argmax(0)).mean()
        print(f'  {head}: largest probability difference {diff:.4f}, argmax equal on {agree:.4%} of pixels')
    print(f'  hv: largest difference {np.abs(a["hv"] - b["hv"]).max():.4f} (values in [-1, 1])')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--sizes', type=int, nargs='+', default=[128, 256, 512, 1024])
    p.add_argument('--bs', type=int, default=8)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--tissue', type=int, default=1500, help='side of the synthetic tissue to predict; 0 skips')
    p.add_argument('--work', default=str(Path(os.environ.get('TMPDIR', '/tmp'))/'spseg-bench-inference'))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name, flags = cpu_flags()
    print(f'{name}; bf16/AMX flags: {" ".join(flags) or "none"}; torch {torch.__version__}, '
          f'{torch.get_num_threads()} thread(s), oneDNN ISA via torch: {torch.backends.cpu.get_cpu_capability()}')
    before = uptime()
    print(f'before: {before}')
    matmuls(args.sizes, args.reps)
    path = stats = real = None
    if args.tissue:
        path, stats = tissue_inputs(args.work, args.tissue)
        real = real_tiles(path, stats, args.bs)
    encoders(args.bs, args.reps, real)
    if args.tissue: whole_tissue(path, stats)
    print(f'\nbefore: {before}\nafter:  {uptime()}')


if __name__ == '__main__': main()
