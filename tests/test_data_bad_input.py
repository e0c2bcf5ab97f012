"Every bad input `load_tissue` can meet gets a `DataError` naming the file and the problem."
import numpy as np, pytest, tifffile
from spseg.data import DataError, load_tissue, MARKERS, list_tissues, sp_stats, TileDataset, split_tissues, tile_grid

def _expect(path, *words, **kw):
    with pytest.raises(DataError) as e: load_tissue(path.parent if path.is_file() or path.suffix else path, **kw)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words: assert w in msg, msg
    return msg

def test_valid_tissue_loads(tissue_dir, arrays):
    t = load_tissue(tissue_dir)
    assert t.shape == (16, 20) and t.id == 'tissue_a'
    np.testing.assert_array_equal(t.sp, arrays['sp'].astype(np.float32))
    assert isinstance(t.sp_raw, np.memmap) and isinstance(t.mask, np.memmap)   # lazily read from disk

def test_missing_tissue_folder(tmp_path):
    _expect(tmp_path/'nope', 'missing tissue folder')

@pytest.mark.parametrize('name', ['he.tif', 'sp.tif', 'mask.tif'])
def test_missing_file(tissue_dir, name):
    (tissue_dir/name).unlink()
    _expect(tissue_dir/name, 'missing file')

@pytest.mark.parametrize('name', ['he.tif', 'sp.tif', 'mask.tif', 'inst.tif'])
def test_unreadable_tiff(tissue_dir, name):
    (tissue_dir/name).write_bytes(b'this is not a TIFF file')
    _expect(tissue_dir/name, 'unreadable TIFF')

@pytest.mark.parametrize('name', ['he.tif', 'sp.tif', 'mask.tif'])
def test_truncated_tiff(tissue_dir, name):
    p = tissue_dir/name; data = p.read_bytes(); p.write_bytes(data[:len(data) // 2])
    msg = _expect(p)
    assert 'truncated' in msg or 'unreadable' in msg, msg

def test_wrong_channel_count(tissue_dir, arrays):
    tifffile.imwrite(tissue_dir/'sp.tif', arrays['sp'][:15])
    _expect(tissue_dir/'sp.tif', 'wrong channel count', '15 channels')

def test_channel_names_count_mismatch(tissue_dir, arrays):
    tifffile.imwrite(tissue_dir/'sp.tif', arrays['sp'], metadata={'axes': 'CYX', 'Channel': {'Name': MARKERS[:10]}})
    _expect(tissue_dir/'sp.tif', '10 channel names for 16 channels')

def test_marker_missing_from_ome_names(tissue_dir, arrays):
    names = ['Hoechst'] + MARKERS[:-1]          # SMA missing
    tifffile.imwrite(tissue_dir/'sp.tif', arrays['sp'], ome=True, metadata={'axes': 'CYX', 'Channel': {'Name': names}})
    _expect(tissue_dir/'sp.tif', 'marker(s) missing', 'SMA')

def test_ome_channels_reordered_by_name(tissue_dir, arrays):
    names = ['Hoechst', 'AF1'] + MARKERS[::-1] + ['Argo550']
    sp = np.concatenate([arrays['sp'][:2] * 0 + 7, arrays['sp'][::-1], arrays['sp'][:1] * 0 + 9])
    tifffile.imwrite(tissue_dir/'sp.tif', sp, ome=True, metadata={'axes': 'CYX', 'Channel': {'Name': names}})
    t = load_tissue(tissue_dir)
    np.testing.assert_array_equal(t.sp, arrays['sp'].astype(np.float32))

@pytest.mark.parametrize('name,shape', [('he.tif', (16, 19, 3)), ('sp.tif', (16, 15, 20)), ('inst.tif', (17, 20))])
def test_sizes_differ(tissue_dir, name, shape):
    tifffile.imwrite(tissue_dir/name, np.zeros(shape, dict(he=np.uint8, sp=np.uint16, inst=np.int32)[name[:-4]]))
    _expect(tissue_dir/name, 'does not match the mask')

@pytest.mark.parametrize('bad', [10, 255])
def test_labels_out_of_range(tissue_dir, arrays, bad):
    m = arrays['mask'].copy(); m[0, 0] = bad
    tifffile.imwrite(tissue_dir/'mask.tif', m)
    _expect(tissue_dir/'mask.tif', 'labels outside 0..9', str(bad))

def test_negative_labels(tissue_dir, arrays):
    tifffile.imwrite(tissue_dir/'mask.tif', arrays['mask'].astype(np.int16) - 1)
    _expect(tissue_dir/'mask.tif', 'labels outside 0..9', '-1')

@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_nan_inf_in_sp(tissue_dir, arrays, bad):
    sp = arrays['sp'].astype(np.float32); sp[3, 4, 5] = bad
    tifffile.imwrite(tissue_dir/'sp.tif', sp)
    _expect(tissue_dir/'sp.tif', 'NaN or inf', 'channel 3')

@pytest.mark.parametrize('name,arr,words', [
    ('he.tif', np.zeros((16, 20, 3), np.float32), ['wrong dtype float32', 'uint8']),
    ('sp.tif', np.zeros((16, 16, 20), np.float64), ['wrong dtype float64', 'uint16 or float32']),
    ('sp.tif', np.zeros((16, 16, 20), np.int8), ['wrong dtype int8']),
    ('mask.tif', np.zeros((16, 20), np.float32), ['wrong dtype float32']),
    ('inst.tif', np.zeros((16, 20), np.float32), ['wrong dtype float32']),
])
def test_wrong_dtype(tissue_dir, name, arr, words):
    tifffile.imwrite(tissue_dir/name, arr)
    _expect(tissue_dir/name, *words)

@pytest.mark.parametrize('name,arr', [
    ('he.tif', np.zeros((16, 20), np.uint8)),
    ('he.tif', np.zeros((16, 20, 4), np.uint8)),
    ('sp.tif', np.zeros((16, 20), np.uint16)),
    ('mask.tif', np.zeros((2, 16, 20), np.uint8)),
    ('inst.tif', np.zeros((2, 16, 20), np.int32)),
])
def test_wrong_dimensionality(tissue_dir, name, arr):
    tifffile.imwrite(tissue_dir/name, arr)
    msg = _expect(tissue_dir/name)
    assert 'wrong dimensionality' in msg or 'wrong channel count' in msg, msg

def test_negative_instance_ids(tissue_dir, arrays):
    tifffile.imwrite(tissue_dir/'inst.tif', arrays['inst'] - 1)
    _expect(tissue_dir/'inst.tif', 'negative instance ids')

def test_missing_cohort_folder(tmp_path):
    with pytest.raises(DataError, match='cohort folder does not exist'): list_tissues(tmp_path/'none')

def test_stats_unknown_train_ids(tissue_dir):
    with pytest.raises(DataError, match='training ids not in the cohort: zzz'): sp_stats(tissue_dir.parent, ['zzz'])

def test_stats_no_foreground(tmp_path, arrays):
    from spseg.data import write_tissue
    write_tissue(tmp_path/'t', **{**arrays, 'mask': np.zeros_like(arrays['mask'])})
    with pytest.raises(DataError, match='no foreground'): sp_stats(tmp_path, ['t'])

def test_dataset_without_stats_for_tissue(tissue_dir):
    st = sp_stats(tissue_dir.parent, ['tissue_a'])
    st.p99.pop('tissue_a')
    with pytest.raises(DataError, match='no SP statistics for tissue'): TileDataset([tissue_dir], st)

def test_split_and_tile_arguments():
    with pytest.raises(ValueError, match='duplicate ids'): split_tissues(['a', 'a'])
    with pytest.raises(ValueError, match='has no folds'): split_tissues(['a', 'b'], 'holdout', fold=1)
    with pytest.raises(ValueError, match='cv3 needs fold'): split_tissues(['a', 'b', 'c'], 'cv3')
    with pytest.raises(ValueError, match='tile size must be positive'): tile_grid(10, 10, 0)
    with pytest.raises(ValueError, match="edge must be"): tile_grid(10, 10, 5, edge='wrap')

# Real-slide-like files (compressed, tiled) and tissues without labels or without one modality.
def _tiled(path, arr, **kw): tifffile.imwrite(path, arr, tile=(16, 16), compression='zlib', **kw)

def test_compressed_wrong_channel_count(tissue_dir, arrays):
    _tiled(tissue_dir/'sp.tif', arrays['sp'][:15], metadata={'axes': 'CYX'})
    _expect(tissue_dir/'sp.tif', 'wrong channel count', '15 channels')

def test_compressed_truncated(tissue_dir, arrays):
    p = tissue_dir/'sp.tif'
    _tiled(p, arrays['sp'], metadata={'axes': 'CYX'})
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    msg = _expect(p)
    assert 'truncated' in msg or 'unreadable' in msg, msg

def test_corrupt_tile_named_when_read(tissue_dir, arrays):
    p = tissue_dir/'sp.tif'
    _tiled(p, arrays['sp'], metadata={'axes': 'CYX'})
    with tifffile.TiffFile(p) as tif: off, n = tif.pages[3].dataoffsets[0], tif.pages[3].databytecounts[0]
    data = bytearray(p.read_bytes())
    data[off:off + n] = b'\xff' * n                  # channel 3's only tile is garbage: found when it is read
    p.write_bytes(bytes(data))
    t = load_tissue(tissue_dir)
    with pytest.raises(DataError) as e: t.sp_region(0, 0, 4, 4)
    assert str(p) in str(e.value) and 'unreadable TIFF data' in str(e.value)

def test_sizes_of_present_files_differ_without_mask(tissue_dir):
    (tissue_dir/'mask.tif').unlink()
    (tissue_dir/'inst.tif').unlink()
    tifffile.imwrite(tissue_dir/'he.tif', np.zeros((16, 19, 3), np.uint8), photometric='rgb')
    msg = _expect(tissue_dir/'he.tif', 'does not match the SP image', str(tissue_dir/'sp.tif'), require=())
    assert '16×19' in msg and '16×20' in msg, msg

def test_no_image_in_folder(tissue_dir):
    for f in ('he.tif', 'sp.tif'): (tissue_dir/f).unlink()
    _expect(tissue_dir, 'no image', require=())

def test_required_file_missing_for_prediction(tissue_dir):
    (tissue_dir/'sp.tif').unlink()
    _expect(tissue_dir/'sp.tif', 'missing file', require=('sp',))
    assert load_tissue(tissue_dir, require=('he',)).modalities == ('he',)

def test_require_names_layout_files(tissue_dir):
    with pytest.raises(ValueError, match='require takes names'): load_tissue(tissue_dir, require=('labels',))
