"""Time to cache one tissue's encoder states (`spseg.cache.build_cache`): tiles/s, seconds per stage, peak memory.

    python bench/cache_build.py [--preset tiny|paper] [--encoder virtues|cellvit] [--size 3000] [--bs 16]

One synthetic tissue of `size`² (625 tiles of 120 px at 3000²) is generated and written to a temporary cohort; its SP
statistics are computed; then the encoder (random weights of `preset`) caches its final and skip states in fp16. On a
GPU the encoder runs under bf16 autocast, as `build_cache` does by default there. Prints figures; asserts nothing."""
import argparse, platform, resource, tempfile, time
from pathlib import Path
import torch
from spseg.synthetic import make_cohort
from spseg.data import sp_stats
from spseg.encoders import VirTuesEncoder, CellViTEncoder
from spseg.cache import build_cache

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='tiny')
    ap.add_argument('--encoder', default='virtues', choices=['virtues', 'cellvit'])
    ap.add_argument('--size', type=int, default=3000)
    ap.add_argument('--bs', type=int, default=16)
    a = ap.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    card = torch.cuda.get_device_name() if device.type == 'cuda' else (platform.processor() or platform.machine())
    print(f'{card}, torch {torch.__version__}, {torch.get_num_threads()} threads; {a.encoder} {a.preset}, '
          f'{a.size}² tissue, bs {a.bs}')
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        make_cohort(Path(d)/'cohort', n_tissues=1, size=a.size, seed=0, progress=False)
        t1 = time.perf_counter()
        stats = sp_stats(Path(d)/'cohort', ['tissue_000'])
        t2 = time.perf_counter()
        enc = (VirTuesEncoder if a.encoder == 'virtues' else CellViTEncoder)(a.preset)
        if device.type == 'cuda': torch.cuda.reset_peak_memory_stats()
        cache = build_cache(Path(d)/'cache', [Path(d)/'cohort'/'tissue_000'], enc, stats, bs=a.bs, device=device)
        if device.type == 'cuda': torch.cuda.synchronize()
        t3 = time.perf_counter()
        n = len(cache.tissue('tissue_000'))
        print(f'synthesise + write {t1 - t0:.1f} s, SP statistics {t2 - t1:.1f} s, '
              f'cache {n} tiles in {t3 - t2:.1f} s = {n / (t3 - t2):.1f} tiles/s, {cache.nbytes() / 2**20:.0f} MiB on disk')
        print(f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB'
              + (f', peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB' if device.type == 'cuda' else ''))

if __name__ == '__main__': main()
