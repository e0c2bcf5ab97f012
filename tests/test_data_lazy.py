"Lazy region reads of real-slide-like TIFFs (compressed, tiled, strips, pyramidal, planar) equal full reads."
import multiprocessing, pickle
import numpy as np, pytest, tifffile
from hypothesis import given, settings, strategies as st
from spseg.data import (ChunkCache, TiffArray, read_tiff, load_tissue, MARKERS, TileDataset, SPStats, sp_percentile,
                        normalise_sp)

C, H, W = 7, 70, 90
REF = (np.random.default_rng(0).gamma(2, 300, (C, H, W)) + np.arange(W)).astype(np.uint16)
RGB = np.random.default_rng(1).integers(0, 255, (H, W, 3), dtype=np.uint8)

def _pyramid(path, data, **kw):
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(data, subifds=2, metadata={'axes': 'CYX', 'Channel': {'Name': list('abcdefg')}}, **kw)
        for k in (2, 4): tw.write(data[:, ::k, ::k], subfiletype=1, **kw)

WRITERS = {
    'zlib_tiled': lambda p: tifffile.imwrite(p, REF, tile=(32, 32), compression='zlib', metadata={'axes': 'CYX'}),
    'lzw_strips': lambda p: tifffile.imwrite(p, REF, rowsperstrip=5, compression='lzw', metadata={'axes': 'CYX'}),
    'zlib_pyramid_ome': lambda p: _pyramid(p, REF, tile=(16, 32), compression='zlib', photometric='minisblack'),
    'planar_separate': lambda p: tifffile.imwrite(p, REF, planarconfig='separate', photometric='minisblack',
                                                  rowsperstrip=16, compression='zlib'),
    'uncompressed_tiled': lambda p: tifffile.imwrite(p, REF, tile=(32, 16), metadata={'axes': 'CYX'}),
    'uncompressed': lambda p: tifffile.imwrite(p, REF, metadata={'axes': 'CYX'}),
    'float_predictor': lambda p: tifffile.imwrite(p, REF.astype(np.float32), tile=(32, 32), compression='zlib',
                                                  predictor=True, metadata={'axes': 'CYX'}),
    'jpeg_rgb': lambda p: tifffile.imwrite(p, RGB, tile=(16, 16), compression='jpeg', photometric='rgb'),
}

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('lazy')
    for name, write in WRITERS.items(): write(d/f'{name}.tif')
    return {name: d/f'{name}.tif' for name in WRITERS}

def test_compressed_files_open_lazily_and_uncompressed_ones_are_memory_mapped(files):
    for name, p in files.items():
        arr, _ = read_tiff(p)
        assert isinstance(arr, np.memmap if name == 'uncompressed' else TiffArray), name
        assert arr.shape == tifffile.imread(p).shape, name

def test_pyramid_opens_at_full_resolution_with_names(files):
    arr, names = read_tiff(files['zlib_pyramid_ome'])
    assert arr.shape == (C, H, W) and names == list('abcdefg')
    np.testing.assert_array_equal(np.asarray(arr), REF)

windows = st.tuples(st.integers(0, H - 1), st.integers(1, H), st.integers(0, W - 1), st.integers(1, W))
channels = st.lists(st.integers(0, C - 1), min_size=1, max_size=C, unique=True)

@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from([n for n in WRITERS if n != 'jpeg_rgb']), win=windows, ch=channels,
       bypass=st.sampled_from([0, 64]))
def test_region_reads_equal_full_reads(files, name, win, ch, bypass):
    arr, _ = read_tiff(files[name])
    if isinstance(arr, TiffArray): arr.bypass_chunks = bypass        # 0: every read straight from zarr
    full = tifffile.imread(files[name])
    y0, y1, x0, x1 = win[0], max(win[0] + 1, win[1]), win[2], max(win[2] + 1, win[3])
    np.testing.assert_array_equal(arr[ch, y0:y1, x0:x1], full[ch, y0:y1, x0:x1])
    np.testing.assert_array_equal(arr[ch[0], y0:y1], full[ch[0], y0:y1])
    np.testing.assert_array_equal(arr[..., x0:x1], full[..., x0:x1])

@settings(max_examples=30, deadline=None)
@given(win=windows)
def test_jpeg_rgb_windows_equal_the_full_decode(files, win):
    arr, _ = read_tiff(files['jpeg_rgb'])
    y0, y1, x0, x1 = win[0], max(win[0] + 1, win[1]), win[2], max(win[2] + 1, win[3])
    np.testing.assert_array_equal(arr[y0:y1, x0:x1], tifffile.imread(files['jpeg_rgb'])[y0:y1, x0:x1])

def test_a_window_decodes_only_the_tiles_it_touches(files, monkeypatch):
    monkeypatch.setattr(TiffArray, 'cache', ChunkCache())
    arr, _ = read_tiff(files['zlib_tiled'])                          # tiles 32×32
    arr[[5, 1, 2], 33:60, 40:63]                                     # inside tile (1, 1) of each channel
    assert TiffArray.cache.misses == 3
    arr[[1, 2], 40:50, 41:50]                                        # the same tiles again: from the cache
    assert (TiffArray.cache.misses, TiffArray.cache.hits) == (3, 2)
    arr[0, 30:34, 30:34]                                             # a corner of four tiles
    assert TiffArray.cache.misses == 3 + 4

def test_cache_stays_within_its_budget(files, monkeypatch):
    monkeypatch.setattr(TiffArray, 'cache', ChunkCache(max_bytes=3 * 32 * 32 * 2))   # three tiles
    arr, _ = read_tiff(files['zlib_tiled'])
    for y in range(0, H, 10):
        for x in range(0, W, 10): arr[:, y:y + 10, x:x + 10]
    assert 0 < TiffArray.cache.nbytes <= TiffArray.cache.max_bytes

def _window(k): return np.asarray(_SHARED[k::3, 10:40, 20:50]).sum()

_SHARED = None

def test_pickled_and_forked_arrays_read_the_same(files):
    global _SHARED
    arr, _ = read_tiff(files['zlib_tiled'])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(arr))[2, 5:9], REF[2, 5:9])
    _SHARED = arr
    arr[0, :5, :5]                                                    # the parent has read before forking
    with multiprocessing.get_context('fork').Pool(2) as pool: sums = pool.map(_window, range(3))
    assert sums == [REF[k::3, 10:40, 20:50].sum() for k in range(3)]

ORION = ['Hoechst', 'AF1', 'CD31', 'CD45', 'CD68', 'Argo550', 'CD4', 'FOXP3', 'CD8a', 'CD45RO', 'CD20', 'PD-L1',
         'CD3e', 'CD163', 'E-cadherin', 'PD-1', 'Ki67', 'Pan-CK', 'SMA']

@pytest.fixture
def orion_sp(tmp_path):
    "An SP-only tissue folder: 19 ORION channels, zlib, tiled, pyramidal OME-TIFF of a size no tile divides."
    sp = np.random.default_rng(2).integers(0, 3000, (19, 50, 37), dtype=np.uint16)
    (tmp_path/'t').mkdir()
    with tifffile.TiffWriter(tmp_path/'t'/'sp.tif', ome=True) as tw:
        kw = dict(tile=(16, 16), compression='zlib', photometric='minisblack')
        tw.write(sp, subifds=1, metadata={'axes': 'CYX', 'Channel': {'Name': ORION}}, **kw)
        tw.write(sp[:, ::2, ::2], subfiletype=1, **kw)
    return tmp_path/'t', sp[[ORION.index(m) for m in MARKERS]]

def test_sp_only_tissue_without_mask_loads_and_tiles(orion_sp):
    path, markers = orion_sp
    t = load_tissue(path, require=('sp',))
    assert t.modalities == ('sp',) and not t.labelled and t.he is None and t.inst is None and t.shape == (50, 37)
    np.testing.assert_array_equal(t.sp, markers.astype(np.float32))
    np.testing.assert_array_equal(t.sp_region(3, 30, 20, 37), markers[:, 3:20, 30:37].astype(np.float32))
    stats = SPStats([], {t.id: sp_percentile(t).tolist()}, [5.0] * 16, [2.0] * 16)
    full = normalise_sp(t.sp, *stats.for_tissue(t.id))
    ds = TileDataset([path], stats, tile=16, margin=8, require=())
    assert len(ds) == 4 * 3
    for i, (_, y, x) in enumerate(ds.tiles):
        sp, he, mask, inst, hv = ds.read(i)
        h, w = min(16, 50 - y), min(16, 37 - x)
        np.testing.assert_allclose(sp[:, :h, :w], full[:, y:y+h, x:x+w], atol=1e-5)
        assert not sp[:, h:].any() and not sp[:, :, w:].any()
        assert (mask == 255).all() and not inst.any() and not hv.any() and not he.any()
        assert sp.dtype == he.dtype == hv.dtype == np.float32 and mask.dtype == inst.dtype == np.int64

def test_he_only_tissue_loads_and_tiles(tmp_path):
    (tmp_path/'h').mkdir()
    tifffile.imwrite(tmp_path/'h'/'he.tif', RGB, tile=(32, 32), compression='zlib', photometric='rgb')
    t = load_tissue(tmp_path/'h', require=('he',))
    assert t.modalities == ('he',) and t.sp_raw is None and t.shape == (H, W)
    assert not t.sp_region(0, 0, 5, 7).any() and t.sp_region(0, 0, 5, 7).shape == (16, 5, 7)
    ds = TileDataset([t], None, tile=32, margin=4)
    sp, he, mask, inst, hv = ds[len(ds) - 1]                         # the bottom-right corner: 6×26 px inside
    assert tuple(he.shape) == (3, 32, 32) and not sp.any() and (mask == 255).all()
    np.testing.assert_allclose(he[:, :6, :26].numpy(), (RGB[64:, 64:].transpose(2, 0, 1) / 255 - 0.5) / 0.5,
                               atol=1e-6)
    assert not he[:, 6:].any() and not he[:, :, 26:].any()

def test_labels_are_used_when_present(orion_sp):
    path, _ = orion_sp
    mask = np.zeros((50, 37), np.uint8)
    mask[10:14, 10:16] = 3
    tifffile.imwrite(path/'mask.tif', mask, tile=(16, 16), compression='zlib')
    t = load_tissue(path, require=())
    assert t.labelled and t.inst.max() == 1
    ds = TileDataset([t], SPStats([], {t.id: [1.0] * 16}, [0.0] * 16, [1.0] * 16), tile=16, margin=8)
    _, _, m, inst, hv = ds.read(0)
    np.testing.assert_array_equal(m, mask[:16, :16])
    assert inst.max() == 1 and hv.any()
