"""Whole-tissue inference benchmark: time per stage and peak memory of `predict_tissue` + `typed_nuclei`.

For synthetic tissues of 1500², 3000² and 6000² px (the 6000² one is the 3000² one repeated 2×2) and the tiny preset's
randomly initialised SP model (VirTues encoder, a decoder with types + binary + HV heads), each size runs in a fresh
subprocess and reports the seconds spent in each stage (percentiles, read + normalise, encode, decode, stitch,
post-process) and the peak RSS (`ru_maxrss`) before and after post-processing, beside the bytes of the output maps.

    .venv/bin/python bench/inference.py [--sizes 1500 3000 6000] [--bs 16] [--margin 16] [--work DIR] [--device cpu] [--preset tiny|paper]
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np


def rss_mib(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_inputs(work, sizes):
    "Tissue folders `work/cohort/s<size>` (synthesised once, 6000² tiled from 3000²) and the SP statistics' JSON."
    from spseg.synthetic import make_tissue
    from spseg.data import write_tissue, sp_stats, load_tissue, TISSUE_FILES
    root = Path(work)/'cohort'
    for size in sorted(set(sizes) | ({3000} if 6000 in sizes else set())):
        path = root/f's{size}'
        if (path/'sp.tif').exists(): continue
        t0 = time.time()
        if size == 6000:
            src = load_tissue(root/'s3000')
            write_tissue(path, np.tile(np.asarray(src.he), (2, 2, 1)), np.tile(np.asarray(src.sp_raw), (1, 2, 2)),
                         np.tile(np.asarray(src.mask), (2, 2)))
        else:
            t = make_tissue(size, rng=size)
            write_tissue(path, t.he, t.sp, t.mask, t.inst)
        print(f'synthesised {path.name} in {time.time() - t0:.0f} s', flush=True)
    stats_path = Path(work)/'stats.json'
    if not stats_path.exists():
        small = min(sizes)
        st = sp_stats(root, [f's{small}'])
        st.save(stats_path)
    return root, stats_path


def timed(fn, timer, stage):
    "`fn` that adds its run time to `timer[stage]`."
    def run(*a, **k):
        t0 = time.perf_counter()
        try: return fn(*a, **k)
        finally: timer[stage] = timer.get(stage, 0.0) + time.perf_counter() - t0
    return run


def one(path, stats_path, bs, margin, device, threads, preset='tiny'):
    "Predict and post-process one tissue; print one JSON line of timings and memory."
    import torch
    torch.set_num_threads(threads)
    from spseg.data import load_tissue, SPStats, sp_percentile
    from spseg.experiments import preset_config, make_encoder
    from spseg.decoder import decoder_for
    from spseg.train import EncoderDecoder
    from spseg.inference import predict_tissue, typed_nuclei, window_plan
    cfg = preset_config(preset)
    enc = make_encoder(cfg)
    torch.manual_seed(0)
    kw = dict(width=cfg.width) if cfg.width is not None else {}
    model = EncoderDecoder(enc, decoder_for(enc, cfg.decoder_preset, heads=dict(types=10, binary=2, hv=2), **kw))
    model = model.eval().to(device)
    timer, t_all = {}, time.perf_counter()
    enc.states = timed(enc.states, timer, 'encode')
    model.head.forward = timed(model.head.forward, timer, 'decode')
    tissue = load_tissue(path, require=())
    rss_ready = rss_mib()
    t0 = time.perf_counter()
    p99 = sp_percentile(tissue)
    timer['percentiles'] = time.perf_counter() - t0
    maps = predict_tissue(model, tissue, SPStats.load(stats_path), bs=bs, margin=margin, device=device,
                          argmax=('types',), p99=p99, timer=timer)
    rss_pred = rss_mib()
    t0 = time.perf_counter()
    inst, table, _ = typed_nuclei(maps)
    timer['postprocess'] = time.perf_counter() - t0
    timer['total'] = time.perf_counter() - t_all
    out_mib = (sum(v.nbytes for v in maps.values()) + inst.nbytes) / 2**20
    print(json.dumps(dict(size=tissue.shape[0], windows=len(window_plan(*tissue.shape, 120, margin)), nuclei=len(table), rss_ready=rss_ready,
                          rss_predict=rss_pred, rss_peak=rss_mib(), outputs_mib=out_mib, **timer)), flush=True)


def report(rows, args):
    head = ['size', 'total', 'percentiles', 'read', 'encode', 'decode', 'other', 'stitch', 'postprocess']
    card = __import__('torch').cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'
    print(f'\n{args.preset} preset, {card}: bs={args.bs} margin={args.margin} threads={args.threads} device={args.device} '
          f'(load average before: {os.getloadavg()[0]:.1f}; the CPU may be shared with other work)')
    print(' '.join(f'{h:>11}' for h in head) + '  (seconds)')
    for r in rows:
        r['other'] = r['model'] - r['encode'] - r['decode']      # activation, argmax, copies
        print(' '.join(f'{r[h]:>11.1f}' if h != 'size' else f'{r[h]:>11d}' for h in head))
    print(f'\n{"size":>6} {"ready MiB":>10} {"after predict":>14} {"peak (post-proc.)":>18} {"outputs MiB":>12} '
          f'{"pred. - ready - outputs":>24}')
    for r in rows:
        extra = r['rss_predict'] - r['rss_ready'] - r['outputs_mib']
        print(f'{r["size"]:>6} {r["rss_ready"]:>10.0f} {r["rss_predict"]:>14.0f} {r["rss_peak"]:>18.0f} '
              f'{r["outputs_mib"]:>12.0f} {extra:>24.0f}')
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        area = (b['size'] / a['size']) ** 2
        print(f'\narea ×{area:.0f}: time ×{b["total"] / a["total"]:.1f} (linear = ×{area:.0f}); memory beyond the '
              f'outputs after predicting {a["rss_predict"] - a["rss_ready"] - a["outputs_mib"]:.0f} → '
              f'{b["rss_predict"] - b["rss_ready"] - b["outputs_mib"]:.0f} MiB')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[1500, 3000, 6000])
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--margin', type=int, default=16)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--preset', default='tiny', choices=['tiny', 'paper'])
    p.add_argument('--work', default=str(Path(tempfile.gettempdir())/'spseg-bench-inference'))
    p.add_argument('--one', help=argparse.SUPPRESS)
    p.add_argument('--stats', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one: return one(args.one, args.stats, args.bs, args.margin, args.device, args.threads, args.preset)
    root, stats = make_inputs(args.work, args.sizes)
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, '--one', str(root/f's{size}'), '--stats', str(stats), '--bs', str(args.bs),
               '--margin', str(args.margin), '--device', args.device, '--threads', str(args.threads),
               '--preset', args.preset]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode: sys.exit(f'size {size} failed:\n{res.stderr[-3000:]}')
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    report(rows, args)


if __name__ == '__main__': main()
