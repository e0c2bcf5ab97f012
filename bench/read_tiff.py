"""Peak memory and time to read every tile of a real-slide-like SP image: lazy region reads vs whole-image decoding.

    python bench/read_tiff.py [--size 3000] [--tile 120] [--keep DIR]

Writes, in a temporary folder, a 19-channel `size`² uint16 OME-TIFF with the ORION channel names, twice: zlib-compressed,
tiled 512 and pyramidal (two halvings in SubIFDs), as real slides are; and uncompressed and contiguous (the layout the
synthetic cohort writes, memory-mappable). Then, for each file, in a fresh subprocess (so peak RSS is the file's own):
`read_tiff` + the 16 markers picked by OME name, then every `tile`-px tile of the tissue read as `TileDataset` does
(the 16 markers of the tile plus a 1-px halo, `Tissue.sp_region`). Where `load_tissue` takes `require` (lazy reading
and optional labels), a second run reads the same tiles through a whole `TileDataset` of an SP-only tissue folder (no
mask). Prints figures; asserts nothing. Run it with an older `spseg` first on `PYTHONPATH` for a before/after."""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np

ORION = ['Hoechst', 'AF1', 'CD31', 'CD45', 'CD68', 'Argo550', 'CD4', 'FOXP3', 'CD8a', 'CD45RO', 'CD20', 'PD-L1',
         'CD3e', 'CD163', 'E-cadherin', 'PD-1', 'Ki67', 'Pan-CK', 'SMA']

def _rss_mib():
    "Peak resident memory of this process so far (VmHWM: unlike ru_maxrss, not inherited from the parent)."
    try: return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
    except (OSError, StopIteration): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def _image(size, seed=0):
    "19 channels of smooth blobs plus Poisson-like noise (compresses about as well as real CyCIF)."
    rng = np.random.default_rng(seed)
    from scipy import ndimage as ndi
    for c in range(len(ORION)):
        low = ndi.zoom(rng.gamma(1.5, 400, (size // 50 + 1, size // 50 + 1)), 50, order=1)[:size, :size]
        yield (low + rng.poisson(30, (size, size))).astype(np.uint16)

def write_files(d, size):
    import tifffile
    data = np.stack(list(_image(size)))
    meta = {'axes': 'CYX', 'Channel': {'Name': ORION}}
    files = dict(zlib_tiled_pyramid=Path(d)/'zlib.ome.tif', uncompressed=Path(d)/'plain.ome.tif')
    for name, path in files.items():
        kw = dict(tile=(512, 512), compression='zlib') if name.startswith('zlib') else {}
        t0 = time.perf_counter()
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            tw.write(data, subifds=2, metadata=meta, photometric='minisblack', **kw)
            for k in (2, 4): tw.write(data[:, ::k, ::k], subfiletype=1, photometric='minisblack', **kw)
        print(f'wrote {name}: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s')
    return files

def read_tiles(path, tile):
    "Child process: open `path`, then read every tile's 16 markers (+1 px halo) as `TileDataset` does."
    from spseg.data import read_tiff, Tissue, tile_grid, _sp_channel_order
    base = _rss_mib()
    t0 = time.perf_counter()
    arr, names = read_tiff(path)
    order = _sp_channel_order(path, arr, names)
    t = Tissue(Path(path).parent, None, arr, order, None)
    t1 = time.perf_counter()
    H, W = arr.shape[1:]
    grid = tile_grid(H, W, tile)
    for y, x in grid:
        t.sp_region(max(y - 1, 0), max(x - 1, 0), min(y + tile + 1, H), min(x + tile + 1, W))
    t2 = time.perf_counter()
    return dict(kind=type(arr).__name__, open_s=t1 - t0, read_s=t2 - t1, tiles=len(grid), base_mib=base,
                peak_mib=_rss_mib())

def read_dataset(path, tile):
    "Child process: an SP-only tissue folder (no mask) through a whole `TileDataset` (normalisation, empty labels)."
    import inspect
    from spseg.data import load_tissue, sp_percentile, SPStats, TileDataset
    if 'require' not in inspect.signature(load_tissue).parameters: return None
    base = _rss_mib()
    folder = Path(tempfile.mkdtemp())/'tissue'
    folder.mkdir()
    (folder/'sp.tif').symlink_to(path)
    t0 = time.perf_counter()
    tis = load_tissue(folder, require=('sp',))
    p99 = sp_percentile(tis)
    t1 = time.perf_counter()
    ds = TileDataset([tis], SPStats([], {tis.id: p99.tolist()}, [0.0] * 16, [1.0] * 16), tile=tile)
    for i in range(len(ds)): ds.read(i)
    t2 = time.perf_counter()
    return dict(kind='TileDataset', open_s=t1 - t0, read_s=t2 - t1, tiles=len(ds), base_mib=base, peak_mib=_rss_mib())

def _child(mode, path, tile):
    out = subprocess.run([sys.executable, __file__, '--child', mode, str(path), '--tile', str(tile)],
                         capture_output=True, text=True, env=os.environ)
    if out.returncode: return dict(error=out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--size', type=int, default=3000)
    ap.add_argument('--tile', type=int, default=120)
    ap.add_argument('--keep', default=None, help='write (or reuse) the files in this folder')
    ap.add_argument('--child', nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        fn = dict(tiles=read_tiles, dataset=read_dataset)[a.child[0]]
        print(json.dumps(fn(a.child[1], a.tile)))
        return
    import spseg.data
    print(f'spseg.data from {spseg.data.__file__}; {os.cpu_count()} CPUs')
    d = a.keep or tempfile.mkdtemp()
    Path(d).mkdir(parents=True, exist_ok=True)
    files = {k: p for k, p in dict(zlib_tiled_pyramid=Path(d)/'zlib.ome.tif',
                                   uncompressed=Path(d)/'plain.ome.tif').items() if p.exists()}
    if len(files) < 2: files = write_files(d, a.size)
    print(f'{"file":20s} {"reader":12s} {"open s":>7s} {"tiles s":>8s} {"tiles":>6s} {"base MiB":>9s} {"peak MiB":>9s}')
    for name, path in files.items():
        for mode in ('tiles', 'dataset'):
            r = _child(mode, path, a.tile)
            if r is None: continue
            if 'error' in r:
                print(f'{name:20s} {mode:12s} failed: {r["error"]}')
                continue
            print(f'{name:20s} {r["kind"]:12s} {r["open_s"]:7.2f} {r["read_s"]:8.2f} {r["tiles"]:6d} '
                  f'{r["base_mib"]:9.0f} {r["peak_mib"]:9.0f}')
    if not a.keep:
        for p in files.values(): p.unlink()
        os.rmdir(d)

if __name__ == '__main__': main()
