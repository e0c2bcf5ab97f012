"""Whole-tissue inference benchmark: wall-clock and CPU time per stage, and peak memory, of one tissue end to end.

    .venv/bin/python bench/inference.py [--sizes 1500 3000 6000] [--no-ome] [--bs 4] [--margin 8] [--threads 1]
        [--wait-policy passive|active|unset] [--device cpu] [--preset tiny|paper] [--work DIR]

Tissues: synthetic ones of 1500², 3000² and 6000² px (the 6000² one is the 3000² one repeated 2×2), uncompressed and
memory-mapped as the synthetic cohort writes them; and, unless `--no-ome`, the 3000² one re-written as a real slide
comes (`3000 ome`): one zlib-compressed, 512-px-tiled, pyramidal OME-TIFF `sp.tif` of 19 uint16 channels named as
ORION's (the 16 markers among Hoechst, AF1 and Argo550, picked by name by `spseg.data`), read lazily through
`TiffArray`. Model: the preset's randomly initialised SP model (VirTues encoder; a decoder with types, binary and HV
heads). Each tissue runs in a fresh subprocess, through the stages `spseg predict` runs:

- percentiles: `sp_percentile` of the whole SP (one pass in row bands);
- read: windows read and normalised (`read_windows`); encode, decode: the encoder and the decoder; other: activation,
  argmax and copies; stitch: the kept boxes written into the tissue maps (`predict_tissue` with `argmax=('types',)`);
- postprocess: `typed_nuclei`. A random model predicts no nuclei, so the binary, HV and type maps are first replaced
  (in place, outside the clock) by stand-ins holding the tissue's true nuclei (`spseg.instance.simulate_prediction`,
  computed beforehand), and the watershed costs what it costs on a real prediction;
- write: `spseg.export.write_outputs` (type and instance OME-TIFFs, GeoJSON, Parquet, h5ad) into a temporary folder,
  the marker means read one SP channel at a time.

Time: wall clock and process CPU time (`time.process_time`: all threads) of each stage; `uptime`'s load is printed
before and after, since other work on the machine slows the wall clock. Memory: a thread samples `/proc/self/status`
every 10 ms; the anonymous resident memory (`RssAnon`: the process's own allocations, not the pages of a memory-mapped
input, which the kernel may drop) is reported when the tissue is open, at its peak while predicting, after predicting,
and at its peak while post-processing and writing, beside the bytes of the maps. The working memory of prediction is
the peak while predicting minus the memory at the start and the maps: flat, whatever the tissue's size. `VmHWM` is the
peak of all resident memory, memory-mapped input pages included.

`--threads` sets torch's CPU threads, 1 by default: where other processes share the cores, two OpenMP threads that
spin while waiting for each other run many times slower than one. `--wait-policy` sets `OMP_WAIT_POLICY` in the
subprocesses (before torch starts): `passive` (the default) lets a waiting thread sleep instead of spinning; `unset`
leaves the environment as it is (OpenMP's default spin-wait).
"""
import argparse, json, os, subprocess, sys, tempfile, threading, time
from pathlib import Path
import numpy as np

ORION = ['Hoechst', 'AF1', 'CD31', 'CD45', 'CD68', 'Argo550', 'CD4', 'FOXP3', 'CD8a', 'CD45RO', 'CD20', 'PD-L1',
         'CD3e', 'CD163', 'E-cadherin', 'PD-1', 'Ki67', 'Pan-CK', 'SMA']


def write_ome(src, dst):
    "`dst/sp.tif`: the SP of tissue folder `src` as a 19-channel, zlib, 512-px-tiled, pyramidal OME-TIFF (ORION names)."
    import tifffile
    from spseg.data import load_tissue, MARKERS
    t = load_tissue(src, require=())
    H, W = t.shape
    rng = np.random.default_rng(0)
    data = np.empty((len(ORION), H, W), np.uint16)
    for k, m in enumerate(MARKERS): data[ORION.index(m)] = t.sp_raw[t.sp_order[k]]
    data[ORION.index('Hoechst')] = (np.asarray(t.inst) > 0) * 3000 + rng.poisson(200, (H, W))
    for name in ('AF1', 'Argo550'): data[ORION.index(name)] = rng.poisson(150, (H, W))
    dst.mkdir(parents=True, exist_ok=True)
    kw = dict(tile=(512, 512), compression='zlib', photometric='minisblack', maxworkers=2)
    with tifffile.TiffWriter(dst/'sp.tif', bigtiff=True, ome=True) as tw:
        tw.write(data, subifds=3, metadata={'axes': 'CYX', 'Channel': {'Name': ORION}}, **kw)
        for k in (2, 4, 8): tw.write(data[:, ::k, ::k], subfiletype=1, **kw)


def write_stand_ins(src, dst):
    "`dst.npz`-like files `dst_{binary,hv,types}.npy`: maps holding the true nuclei and classes of tissue `src`."
    from spseg.data import load_tissue
    from spseg.instance import simulate_prediction
    t = load_tissue(src, require=())
    binary, hv = simulate_prediction(np.asarray(t.inst))
    for name, a in dict(binary=binary, hv=hv, types=np.asarray(t.mask, np.uint8)).items():
        np.save(f'{dst}_{name}.npy', a)


def make_inputs(work, sizes, ome):
    "Tissue folders under `work/cohort` (synthesised once), their stand-in maps under `work/sim`, the SP statistics."
    from spseg.synthetic import make_tissue
    from spseg.data import write_tissue, sp_stats, load_tissue
    root, sim = Path(work)/'cohort', Path(work)/'sim'
    sim.mkdir(parents=True, exist_ok=True)
    for size in sorted(set(sizes) | ({3000} if 6000 in sizes or ome else set())):
        path, t0 = root/f's{size}', time.time()
        if not (path/'sp.tif').exists():
            if size == 6000:
                src = load_tissue(root/'s3000')
                inst, n = np.asarray(src.inst), int(np.asarray(src.inst).max())
                inst = np.block([[inst, np.where(inst > 0, inst + n, 0)], [np.where(inst > 0, inst + 2 * n, 0),
                                                                           np.where(inst > 0, inst + 3 * n, 0)]])
                write_tissue(path, np.tile(np.asarray(src.he), (2, 2, 1)), np.tile(np.asarray(src.sp_raw), (1, 2, 2)),
                             np.tile(np.asarray(src.mask), (2, 2)), inst)          # each copy's nuclei their own ids
            else:
                t = make_tissue(size, rng=size)
                write_tissue(path, t.he, t.sp, t.mask, t.inst)
            print(f'synthesised {path.name} in {time.time() - t0:.0f} s', flush=True)
        if not Path(f'{sim/path.name}_types.npy').exists(): write_stand_ins(path, sim/path.name)
    if ome and not (root/'s3000_ome'/'sp.tif').exists():
        t0 = time.time()
        write_ome(root/'s3000', root/'s3000_ome')
        print(f'wrote s3000_ome/sp.tif ({(root/"s3000_ome"/"sp.tif").stat().st_size / 2**20:.0f} MiB) '
              f'in {time.time() - t0:.0f} s', flush=True)
    stats_path = Path(work)/'stats.json'
    if not stats_path.exists(): sp_stats(root, [f's{min(sizes)}']).save(stats_path)
    return root, sim, stats_path


class Memory(threading.Thread):
    "Samples `RssAnon` (MiB) every `period` s; `peak[phase]` is its largest value during each phase."
    def __init__(self, period=0.01):
        super().__init__(daemon=True)
        self.period, self.phase, self.peak, self.done = period, 'start', {}, False
    @staticmethod
    def status(key='RssAnon'):
        "The `key` line of `/proc/self/status`, in MiB."
        with open('/proc/self/status') as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ':')) / 1024
    def sample(self):
        v = self.status()
        self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), v)
        return v
    def enter(self, phase):
        "Start `phase`; return the memory now."
        self.sample()
        self.phase = phase
        return self.sample()
    def run(self):
        while not self.done:
            self.sample()
            time.sleep(self.period)


def timed(fn, timer, stage):
    "`fn` that adds its wall-clock and CPU seconds to `timer[stage]` and `timer[stage + '_cpu']`."
    def run(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        try: return fn(*a, **k)
        finally:
            timer[stage] = timer.get(stage, 0.0) + time.perf_counter() - t0
            timer[f'{stage}_cpu'] = timer.get(f'{stage}_cpu', 0.0) + time.process_time() - c0
    return run


class Channels:
    "The SP of a tissue as `write_outputs` reads it (its shape, then channel by channel), never loaded whole."
    def __init__(self, t): self.t, self.shape = t, (len(t.sp_order), *t.shape)
    def __iter__(self): return (np.asarray(self.t.sp_raw[c]) for c in self.t.sp_order)


def one(path, sim, stats_path, bs, margin, device, threads, preset='tiny'):
    "Child: predict, post-process and write one tissue; print one JSON line of timings and memory."
    import torch
    torch.set_num_threads(threads)
    from spseg.data import load_tissue, SPStats, sp_percentile
    from spseg.experiments import preset_config, make_encoder
    from spseg.decoder import decoder_for
    from spseg.train import EncoderDecoder
    from spseg.inference import predict_tissue, typed_nuclei, window_plan
    from spseg.export import write_outputs
    mem = Memory()
    mem.start()
    cfg = preset_config(preset)
    enc = make_encoder(cfg)
    torch.manual_seed(0)
    kw = dict(width=cfg.width) if cfg.width is not None else {}
    model = EncoderDecoder(enc, decoder_for(enc, cfg.decoder_preset, heads=dict(types=10, binary=2, hv=2), **kw))
    model = model.eval().to(device)
    timer = {}
    enc.states = timed(enc.states, timer, 'encode')
    model.head.forward = timed(model.head.forward, timer, 'decode')
    t_all, c_all = time.perf_counter(), time.process_time()
    tissue = load_tissue(path, require=())
    kind = type(tissue.sp_raw).__name__
    ready = mem.enter('predict')
    p99 = timed(sp_percentile, timer, 'percentiles')(tissue)
    maps = predict_tissue(model, tissue, SPStats.load(stats_path), bs=bs, margin=margin, device=device,
                          argmax=('types',), p99=p99, timer=timer)
    after = mem.enter('post')
    out_mib = sum(v.nbytes for v in maps.values()) / 2**20
    c_pause, t_pause = time.process_time(), time.perf_counter()          # stand-in maps: outside the clocks
    maps['binary'][-1] = np.load(f'{sim}_binary.npy', mmap_mode='r')
    maps['hv'][...] = np.load(f'{sim}_hv.npy', mmap_mode='r')
    maps['types'][...] = np.load(f'{sim}_types.npy', mmap_mode='r')
    c_all, t_all = c_all + time.process_time() - c_pause, t_all + time.perf_counter() - t_pause
    inst, table, types = timed(typed_nuclei, timer, 'postprocess')(maps)
    with tempfile.TemporaryDirectory() as d:
        timed(write_outputs, timer, 'write')(d, inst, types, table, sp=Channels(tissue))
    timer['total'], timer['total_cpu'] = time.perf_counter() - t_all, time.process_time() - c_all
    mem.enter('end')
    mem.done = True
    windows = len(window_plan(*tissue.shape, 120, margin))
    print(json.dumps(dict(path=str(path), size=tissue.shape[0], input=kind, windows=windows, nuclei=len(table),
                          anon_ready=ready, anon_predict_peak=mem.peak['predict'], anon_after_predict=after,
                          anon_post_peak=mem.peak['post'], outputs_mib=out_mib,
                          vmhwm=mem.status('VmHWM'), **timer)), flush=True)


def uptime():
    try: return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError: return f'load average {os.getloadavg()}'


STAGES = ['percentiles', 'read', 'encode', 'decode', 'other', 'stitch', 'postprocess', 'write', 'total']


def label(r): return f'{r["size"]}' + (' ome' if r['input'] == 'TiffArray' else '')


def report(rows, args, before, after):
    card = __import__('torch').cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'
    print(f'\n{args.preset} preset, {card}: bs={args.bs} margin={args.margin} threads={args.threads} '
          f'OMP_WAIT_POLICY={args.wait_policy} device={args.device}\nbefore: {before}\nafter:  {after}')
    for r in rows:
        r['other'] = r['model'] - r['encode'] - r['decode']                  # activation, argmax, copies
        r['other_cpu'] = r['model_cpu'] - r['encode_cpu'] - r['decode_cpu']
    for unit, suffix in (('wall-clock seconds', ''), ('CPU seconds (process, all threads)', '_cpu')):
        print(f'\n{"tissue":>9} {"windows":>7} {"nuclei":>6} ' + ' '.join(f'{h:>11}' for h in STAGES) + f'  ({unit})')
        for r in rows:
            print(f'{label(r):>9} {r["windows"]:>7} {r["nuclei"]:>6} '
                  + ' '.join(f'{r[h + suffix]:>11.1f}' for h in STAGES))
    print(f'\n{"tissue":>9} {"open MiB":>9} {"peak predicting":>16} {"after predict":>14} {"maps MiB":>9} '
          f'{"working (peak - open - maps)":>29} {"peak post+write":>16} {"VmHWM":>10}   (resident MiB)')
    for r in rows:
        work = r['anon_predict_peak'] - r['anon_ready'] - r['outputs_mib']
        print(f'{label(r):>9} {r["anon_ready"]:>9.0f} {r["anon_predict_peak"]:>16.0f} {r["anon_after_predict"]:>14.0f} '
              f'{r["outputs_mib"]:>9.0f} {work:>29.0f} {r["anon_post_peak"]:>16.0f} {r["vmhwm"]:>10.0f}')
    plain = [r for r in rows if r['input'] != 'TiffArray']
    if len(plain) > 1:
        a, b = plain[0], plain[-1]
        area = (b['size'] / a['size']) ** 2
        print(f'\n{a["size"]}² → {b["size"]}², area ×{area:.0f}: wall ×{b["total"] / a["total"]:.1f}, '
              f'CPU ×{b["total_cpu"] / a["total_cpu"]:.1f}, windows ×{b["windows"] / a["windows"]:.1f}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[1500, 3000, 6000])
    p.add_argument('--no-ome', dest='ome', action='store_false', help='skip the 3000² OME-TIFF tissue')
    p.add_argument('--bs', type=int, default=4)
    p.add_argument('--margin', type=int, default=8)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--wait-policy', default='passive', choices=['passive', 'active', 'unset'])
    p.add_argument('--device', default='cpu')
    p.add_argument('--preset', default='tiny', choices=['tiny', 'paper'])
    p.add_argument('--work', default=str(Path(tempfile.gettempdir())/'spseg-bench-inference'))
    p.add_argument('--one', help=argparse.SUPPRESS)
    p.add_argument('--sim', help=argparse.SUPPRESS)
    p.add_argument('--stats', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args.one, args.sim, args.stats, args.bs, args.margin, args.device, args.threads, args.preset)
    root, sim, stats = make_inputs(args.work, args.sizes, args.ome)
    env = dict(os.environ)
    if args.wait_policy != 'unset': env['OMP_WAIT_POLICY'] = args.wait_policy.upper()
    runs = [(f's{s}', f's{s}') for s in args.sizes]
    if args.ome:                                                              # after the 3000² one
        runs.insert(next((i + 1 for i, s in enumerate(args.sizes) if s >= 3000), len(runs)), ('s3000_ome', 's3000'))
    rows, before = [], uptime()
    for name, sim_name in runs:
        cmd = [sys.executable, __file__, '--one', str(root/name), '--sim', str(sim/sim_name), '--stats', str(stats),
               '--bs', str(args.bs), '--margin', str(args.margin), '--device', args.device,
               '--threads', str(args.threads), '--preset', args.preset]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode: sys.exit(f'{name} failed:\n{res.stderr[-3000:]}')
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    report(rows, args, before, uptime())


if __name__ == '__main__': main()
