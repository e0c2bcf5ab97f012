"""Benchmark of the HoVer-Net post-processing (`spseg.instance`) on one 3000×3000 map, against MONAI's.

Maps: `make_tissue(size, seed)`; its true instances give a binary + HV map, by default made slightly noisy with
`simulate_prediction` (blur 1 px, noise 0.1). A second set keeps only 10% of the nuclei ("few") to show that memory
does not grow with the number of nuclei. Each measurement runs in its own subprocess, single-threaded
(OMP/MKL/OPENBLAS threads and torch threads = 1), so the figures compare algorithms, not thread counts.

Cases (each reports the best wall time of `--reps` runs; the peak RSS during the calls (VmHWM, reset before each call)
and its growth over the RSS before the call, i.e. the working memory of the call beyond its inputs; and — in a second,
separate run, since tracing slows allocation — the tracemalloc peak of the numpy/Python allocations of one call):
  spseg map        `hv_watershed`: the label image only
  spseg map plain  the same with `fast=False` (one skimage watershed call over the whole image)
  spseg full       `postprocess`: label image + per-instance table (centroid, area, bbox, type, type_prob)
  MONAI map        MONAI 1.6.1 `HoVerNetInstanceMapPostProcessing`'s own steps up to its watershed (label image only)
  MONAI full       `HoVerNetInstanceMapPostProcessing` + `HoVerNetNuclearTypePostProcessing` as shipped
                   (label image + per-instance bbox, centroid, contour, type, type_prob)
MONAI runs with HoVer-Net's parameters: Sobel 21, 3×3 Gaussian [1, 2, 1]/4 for the distance map, marker threshold 0.4,
objects < 10 px removed; its marker opening uses a disk of radius 2 where HoVer-Net (and spseg) use OpenCV's 5×5 ellipse.
Agreement: PQ between the spseg and MONAI label images (IoU > 0.5 matching), and each against the ground truth.

Run: `.venv/bin/python bench/postprocess.py [--size 3000] [--seed 0] [--reps 3] [--no-noise] [--skip-monai-full]`.
MONAI is optional (`pip install monai==1.6.1`); without it the reference cases are skipped with a message.
Prints figures; asserts nothing.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'NUMEXPR_NUM_THREADS')
CASES = ('spseg map', 'spseg map plain', 'spseg full', 'MONAI map', 'MONAI full')

def have_monai():
    try:
        import monai  # noqa: F401
        return True
    except ImportError: return False

def make_maps(size, seed, noise, folder):
    "Write binary, HV, one-hot type probabilities and the true maps of one tissue (all nuclei and 10% of them)."
    import numpy as np
    from spseg.synthetic import make_tissue
    from spseg.data import hv_map
    from spseg.instance import simulate_prediction
    t = make_tissue(size, seed)
    rng = np.random.default_rng(seed)
    ids = np.unique(t.inst[t.inst > 0])
    few_ids = rng.choice(ids, max(1, len(ids) // 10), replace=False)
    for name, inst in (('many', t.inst), ('few', np.where(np.isin(t.inst, few_ids), t.inst, 0).astype(np.int32))):
        if noise: binary, hv = simulate_prediction(inst, seed, blur=1.0, noise=0.1, hv_noise=0.1)
        else: binary, hv = (inst > 0).astype(np.float32), hv_map(inst)
        d = Path(folder) / name; d.mkdir()
        mask = np.where(inst > 0, t.mask, 0).astype(np.uint8)
        for k, v in dict(binary=binary, hv=hv, inst=inst, mask=mask).items(): np.save(d / f'{k}.npy', v)
    return len(ids), len(few_ids)

def status_mb(key):
    "A memory figure of this process from /proc/self/status in MiB (VmRSS: now, VmHWM: peak since the last reset)."
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key): return int(line.split()[1]) / 1024
    return float('nan')

def reset_peak_rss():
    "Reset VmHWM to the current RSS (Linux ≥ 4.0), so the next peak belongs to the code that follows."
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')

def one_hot_probs(mask):
    import numpy as np
    from spseg.data import N_CLASSES
    probs = np.zeros((N_CLASSES,) + mask.shape, np.float32)
    np.put_along_axis(probs, mask[None].astype(np.int64), 1.0, 0)
    return probs

def monai_steps(binary, hv, full, probs=None):
    "MONAI's HoVer-Net post-processing with HoVer-Net's parameters; returns the label image."
    import contextlib, io
    import numpy as np
    from scipy import ndimage as ndi
    from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing, HoVerNetNuclearTypePostProcessing
    def blur3(x):  # HoVer-Net's cv2.GaussianBlur(x, (3, 3), 0)
        k = [0.25, 0.5, 0.25]
        return ndi.correlate1d(ndi.correlate1d(np.asarray(x), k, axis=-1, mode='mirror'), k, axis=-2, mode='mirror')
    post = HoVerNetInstanceMapPostProcessing(activation=lambda x: x, mask_threshold=0.5, min_object_size=10,
                                             sobel_kernel_size=21, distance_smooth_fn=blur3, marker_threshold=0.4)
    prob = binary[None]
    if not full:
        mask = post.generate_watershed_mask(prob)
        border = post.generate_instance_border(mask, hv)
        dist = post.generate_distance_map(mask, border)
        markers = post.generate_watershed_markers(mask, border)
        return np.asarray(post.watershed(dist, mask, markers))[0]
    with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints a line per instance too small for a contour
        info, inst = post(prob, hv)
        info, _ = HoVerNetNuclearTypePostProcessing(activation='softmax', return_type_map=False)(probs, info, inst)
    return np.asarray(inst)[0]

def worker(case, folder, reps, trace, out):
    "Runs in a one-thread subprocess: time (or trace) `case` on the maps in `folder`; print one JSON line."
    import numpy as np
    from spseg.instance import hv_watershed, postprocess
    if case.startswith('MONAI'):  # import outside the timed calls
        import torch
        torch.set_num_threads(1)
        import monai.apps.pathology.transforms.post.array  # noqa: F401
    d = Path(folder)
    binary, hv, mask = np.load(d / 'binary.npy'), np.load(d / 'hv.npy'), np.load(d / 'mask.npy')
    probs = one_hot_probs(mask) if 'full' in case else None
    run = {'spseg map': lambda: hv_watershed(binary, hv),
           'spseg map plain': lambda: hv_watershed(binary, hv, fast=False),
           'spseg full': lambda: postprocess(binary, hv, probs=probs)[0],
           'MONAI map': lambda: monai_steps(binary, hv, False),
           'MONAI full': lambda: monai_steps(binary, hv, True, probs)}[case]
    if case != 'MONAI full': run()  # warm-up; MONAI's full run is too slow to repeat
    res = {}
    if trace:
        import tracemalloc
        tracemalloc.start(); run(); res['traced_peak_mb'] = tracemalloc.get_traced_memory()[1] / 2**20; tracemalloc.stop()
    else:
        times, before, peak = [], [], []
        for _ in range(reps):
            before.append(status_mb('VmRSS')); reset_peak_rss()
            t0 = time.perf_counter(); labels = run(); times.append(time.perf_counter() - t0)
            peak.append(status_mb('VmHWM'))
            np.save(out, np.asarray(labels, np.int32)); del labels
        res.update(seconds=min(times), rss_before_mb=min(before), peak_rss_mb=max(peak))
    print(json.dumps(res))

def measure(case, folder, reps, trace=False, out=None):
    env = {**os.environ, **{v: '1' for v in THREAD_VARS}}
    cmd = [sys.executable, __file__, '--worker', case, '--folder', str(folder), '--reps', str(reps), '--out', str(out or '/dev/null')]
    if trace: cmd.append('--trace')
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode: raise RuntimeError(f'{case} failed:\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])

def main(a):
    import numpy as np
    from spseg.metrics import panoptic_quality
    monai = have_monai()
    if not monai: print('MONAI is not installed (pip install monai==1.6.1): the reference cases are skipped.')
    cases = [c for c in CASES if (monai or not c.startswith('MONAI')) and not (a.skip_monai_full and c == 'MONAI full')]
    print(f'load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} CPUs; '
          f'size {a.size}, seed {a.seed}, {"noisy" if a.noise else "exact"} maps, best of {a.reps}, one thread per case')
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter(); n_many, n_few = make_maps(a.size, a.seed, a.noise, tmp)
        print(f'maps made in {time.perf_counter() - t0:.0f} s: {n_many} nuclei ("many"), {n_few} ("few")\n')
        res, labels = {}, {}
        for which in ('many', 'few'):
            for case in cases:
                if which == 'few' and case in ('spseg map plain', 'MONAI full'): continue
                out = Path(tmp) / f'{which}-{case}.npy'.replace(' ', '_')
                reps = a.reps if case.startswith('spseg') else 1
                r = measure(case, Path(tmp) / which, reps, out=out)
                if case.startswith('spseg'): r.update(measure(case, Path(tmp) / which, 1, trace=True))
                res[which, case], labels[which, case] = r, np.load(out)
                traced = f'{r["traced_peak_mb"]:7.0f}' if 'traced_peak_mb' in r else '      –'
                print(f'{which:4s} {case:16s} {r["seconds"]:8.2f} s   peak RSS {r["peak_rss_mb"]:6.0f} MiB '
                      f'(+{r["peak_rss_mb"] - r["rss_before_mb"]:5.0f} during the call)   numpy peak {traced} MiB   '
                      f'{int(labels[which, case].max())} nuclei', flush=True)
        print()
        true = np.load(Path(tmp) / 'many' / 'inst.npy')
        for case in cases:
            print(f'PQ vs ground truth   {case:16s} {panoptic_quality(true, labels["many", case])["pq"]:.4f}')
        if ('many', 'spseg map plain') in labels:
            same = np.array_equal(labels['many', 'spseg map'], labels['many', 'spseg map plain'])
            print(f'spseg fast flooding identical to one watershed call: {same}')
        if monai:
            for ours, ref in (('spseg map', 'MONAI map'), ('spseg full', 'MONAI full')):
                if ('many', ref) not in res: continue
                pq = panoptic_quality(labels['many', ref], labels['many', ours])
                print(f'{ours} vs {ref}: {res["many", ref]["seconds"] / res["many", ours]["seconds"]:5.1f}× faster, '
                      f'PQ between the two label images {pq["pq"]:.4f} (DQ {pq["dq"]:.4f}, SQ {pq["sq"]:.4f})')
    print(f'load average at the end {os.getloadavg()[0]:.2f}')

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=3000); ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--reps', type=int, default=3); ap.add_argument('--no-noise', dest='noise', action='store_false')
    ap.add_argument('--skip-monai-full', action='store_true')
    ap.add_argument('--worker'); ap.add_argument('--folder'); ap.add_argument('--out'); ap.add_argument('--trace', action='store_true')
    a = ap.parse_args()
    if a.worker: worker(a.worker, a.folder, a.reps, a.trace, a.out)
    else: main(a)
