"""Benchmark of the synthetic cohort generator (`spseg.synthetic`).

Generates 3000×3000 tissues in a subprocess pinned to one thread (OMP/MKL/OPENBLAS_NUM_THREADS=1, CPU affinity to one
core where the OS allows), times generation and writing to a temporary folder separately, and reports the peak
resident memory of that subprocess and the class pixel shares of the tissues against the study's Table 1.
Run: `.venv/bin/python bench/synthetic_tissue.py [--n 3] [--size 3000] [--seed 0]`. Prints figures; asserts nothing.
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'NUMEXPR_NUM_THREADS', 'VECLIB_MAXIMUM_THREADS')

def worker(n, size, seed):
    "Runs in the one-thread subprocess: generate, time, write; print one JSON line."
    if hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import resource, time
    import numpy as np
    from spseg.synthetic import make_tissue
    from spseg.data import write_tissue, class_shares, CLASSES
    seeds = np.random.SeedSequence(seed).spawn(n)
    gen, write, paths = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for k in range(n):
            t0 = time.perf_counter(); t = make_tissue(size, np.random.default_rng(seeds[k])); t1 = time.perf_counter()
            p = write_tissue(Path(d) / f'tissue_{k:03d}', t.he, t.sp, t.mask, t.inst); t2 = time.perf_counter()
            gen.append(t1 - t0); write.append(t2 - t1); paths.append(p)
            del t
        shares = class_shares(paths)
        disk = sum(f.stat().st_size for p in paths for f in p.iterdir())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    print(json.dumps(dict(gen=gen, write=write, rss_kib=rss, shares=dict(zip(CLASSES, shares.tolist())), disk=disk)))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=3, help='tissues to generate')
    ap.add_argument('--size', type=int, default=3000)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker: return worker(a.n, a.size, a.seed)
    env = {**os.environ, **{v: '1' for v in THREAD_VARS}, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    cmd = [sys.executable, __file__, '--worker', '--n', str(a.n), '--size', str(a.size), '--seed', str(a.seed)]
    print(f'generating {a.n} tissue(s) of {a.size}×{a.size} in a one-thread subprocess ...', flush=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode: sys.exit(f'worker failed:\n{res.stderr}')
    r = json.loads(res.stdout.strip().splitlines()[-1])
    from spseg.data import TABLE1
    print(f"generation per tissue: {', '.join(f'{t:.1f}' for t in r['gen'])} s  (mean {sum(r['gen']) / len(r['gen']):.1f} s, target ≤ 30 s)")
    print(f"writing per tissue:    {', '.join(f'{t:.1f}' for t in r['write'])} s  ({r['disk'] / len(r['gen']) / 2**20:.0f} MiB per tissue on disk)")
    print(f"peak RSS of the worker: {r['rss_kib'] / 2**20:.2f} GiB  (target ≤ 3 GiB)")
    print(f"\nclass pixel shares over {a.n} tissue(s) vs Table 1:")
    print(f"{'class':<18}{'synthetic %':>12}{'Table 1 %':>11}{'ratio':>8}")
    for c, s in r['shares'].items():
        t = TABLE1[c]
        print(f'{c:<18}{s:>12.4f}{t:>11.3f}{s / t:>8.2f}')

if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    main()
