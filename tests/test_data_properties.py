"Property tests (hypothesis) of tiling, splits and HV maps, and an end-to-end check of the tile dataset."
import numpy as np, pytest
from hypothesis import given, settings, strategies as st
from spseg.data import (tile_grid, split_tissues, hv_map, instances_from_mask, write_tissue, load_tissue, sp_stats,
                        TileDataset, normalise_sp, IGNORE_INDEX, list_tissues, tile_dls)

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(1, 150))
def test_tiles_cover_image_exactly_once(h, w, tile):
    g = tile_grid(h, w, tile)                 # edge='pad': every image pixel in exactly one tile
    cover = np.zeros((h + tile, w + tile), np.int32)
    for y, x in g: cover[y:y+tile, x:x+tile] += 1
    assert (cover[:h, :w] == 1).all()
    assert (g[:, 0] < h).all() and (g[:, 1] < w).all()      # no tile is all padding

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(1, 150))
def test_dropped_edges_cover_whole_tiles_once(h, w, tile):
    g = tile_grid(h, w, tile, edge='drop')
    cover = np.zeros((h, w), np.int32)
    for y, x in g: cover[y:y+tile, x:x+tile] += 1
    H, W = h // tile * tile, w // tile * tile
    assert (cover[:H, :W] == 1).all() and cover[H:].sum() == 0 and cover[:, W:].sum() == 0
    assert len(g) == (h // tile) * (w // tile)

@settings(max_examples=100, deadline=None)
@given(st.lists(st.text('abcdef', min_size=1, max_size=4), min_size=4, max_size=60, unique=True))
def test_splits_partition_and_are_deterministic(ids):
    tr, te = split_tissues(ids, 'holdout')
    assert tr + te == sorted(ids) and len(tr) == len(ids) * 4 // 5
    assert split_tissues(list(reversed(ids)), 'holdout') == (tr, te)
    for k in (1, 2, 3):
        a, b = split_tissues(ids, 'cv3', k)
        assert sorted(a + b) == sorted(ids) and not set(a) & set(b)
    tests = [split_tissues(ids, 'cv3', k)[1] for k in (1, 2, 3)]
    assert sorted(sum(tests, [])) == sorted(ids)
    (q1, q2), (q3, q4) = split_tissues(ids, 'quarter', 1), split_tissues(ids, 'quarter', 2)
    assert q1 + q2 + q3 + q4 == sorted(ids)

def _random_instances(draw_boxes, shape=(40, 50)):
    inst = np.zeros(shape, np.int32)
    for k, (y, x, h, w) in enumerate(draw_boxes, 1):
        yy, xx = np.ogrid[:shape[0], :shape[1]]
        ell = ((yy - y) / max(h, 1)) ** 2 + ((xx - x) / max(w, 1)) ** 2 <= 1
        inst[ell] = k
    return inst

boxes = st.lists(st.tuples(st.integers(0, 39), st.integers(0, 49), st.integers(1, 8), st.integers(1, 8)), max_size=12)

@settings(max_examples=150, deadline=None)
@given(boxes)
def test_hv_range_zero_outside_and_signs(bx):
    inst = _random_instances(bx)
    hv = hv_map(inst)
    assert hv.shape == (2,) + inst.shape and hv.dtype == np.float32
    assert hv.min() >= -1 and hv.max() <= 1
    assert (hv[:, inst == 0] == 0).all()
    for i in np.unique(inst[inst > 0]):
        yy, xx = np.nonzero(inst == i)
        cy, cx = yy.mean(), xx.mean()
        h, v = hv[0][yy, xx], hv[1][yy, xx]
        assert (h[xx < cx - 1e-9] < 0).all() and (h[xx > cx + 1e-9] > 0).all()   # left of centroid negative
        assert (v[yy < cy - 1e-9] < 0).all() and (v[yy > cy + 1e-9] > 0).all()   # above centroid negative
        if (xx < cx - 1e-9).any(): assert np.isclose(h.min(), -1)
        if (xx > cx + 1e-9).any(): assert np.isclose(h.max(), 1)

def test_hv_of_empty_map_is_zero():
    assert (hv_map(np.zeros((5, 5), np.int32)) == 0).all()

def test_instances_from_mask_separate_classes_and_components():
    m = np.zeros((10, 10), np.uint8); m[1:3, 1:3] = 2; m[1:3, 3:5] = 3; m[6:8, 6:8] = 2
    inst = instances_from_mask(m)
    assert inst.max() == 3 and len(np.unique(inst[m == 2])) == 2
    assert ((inst > 0) == (m > 0)).all()

@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(1)
    for k, (h, w) in enumerate([(50, 70), (64, 40), (31, 33)]):
        inst = _random_instances([(rng.integers(0, h), rng.integers(0, w), 4, 6) for _ in range(6)], (h, w))
        mask = np.where(inst > 0, 1 + inst % 9, 0).astype(np.uint8)
        write_tissue(tmp_path/f't{k}', rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                     rng.integers(0, 60000, (16, h, w), dtype=np.uint16), mask, inst)
    return tmp_path

def test_tiles_reassemble_the_normalised_tissue(cohort):
    stats = sp_stats(cohort, ['t0', 't1'])
    ds = TileDataset(list_tissues(cohort), stats, tile=24, margin=16)
    for ti, t in enumerate(ds.tissues):
        H, W = t.shape
        sp_full = normalise_sp(t.sp, *stats.for_tissue(t.id)); hv_full = hv_map(t.inst)
        for i, (tj, y, x) in enumerate(ds.tiles):
            if tj != ti: continue
            sp, he, mask, inst, hv = ds.read(i)
            h, w = min(24, H - y), min(24, W - x)
            np.testing.assert_allclose(sp[:, :h, :w], sp_full[:, y:y+h, x:x+w], atol=1e-5)
            np.testing.assert_array_equal(mask[:h, :w], np.asarray(t.mask)[y:y+h, x:x+w])
            np.testing.assert_array_equal(inst[:h, :w], np.asarray(t.inst)[y:y+h, x:x+w])
            np.testing.assert_allclose(hv[:, :h, :w], hv_full[:, y:y+h, x:x+w], atol=1e-6)
            assert (mask[h:] == IGNORE_INDEX).all() and (mask[:, w:] == IGNORE_INDEX).all()

def test_training_stats_ignore_test_tissues(cohort):
    a = sp_stats(cohort, ['t0', 't1'], cache=False)
    b = sp_stats(cohort, ['t0', 't1'], cache=False)
    c = sp_stats(cohort, ['t0'], cache=False)
    assert a.mean == b.mean and a.mean != c.mean and set(a.p99) == {'t0', 't1', 't2'}

def test_stats_cache_recomputed_for_other_train_ids(cohort):
    a = sp_stats(cohort, ['t0']); b = sp_stats(cohort, ['t0', 't1'])
    assert a.train_ids == ['t0'] and b.train_ids == ['t0', 't1'] and a.mean != b.mean
    assert sp_stats(cohort, ['t0', 't1']).mean == b.mean
    assert len(list((cohort/'.spseg').glob('sp_stats-*.json'))) == 2     # one file per training split
    assert sp_stats(cohort, ['t0']).mean == a.mean

def test_dataloaders_batches(cohort):
    dls = tile_dls(cohort, ['t0', 't1'], ['t2'], bs=4, tile=24)
    sp, he, mask, inst, hv = dls.train.one_batch()
    assert sp.shape == (4, 16, 24, 24) and he.shape == (4, 3, 24, 24) and hv.shape == (4, 2, 24, 24)
    assert len(dls.valid_ds) == 4 and dls.train.n_inp == 2

def test_compressed_tiled_copy_gives_the_same_tiles(cohort, tmp_path_factory):
    "The same tissues stored as real slides are (zlib, tiled) serve exactly the same tiles, through lazy reads."
    import tifffile
    from spseg.data import TiffArray, read_tiff
    stats = sp_stats(cohort, ['t0', 't1'])
    copy = tmp_path_factory.mktemp('compressed')
    for p in list_tissues(cohort):
        (copy/p.name).mkdir()
        for f in ('he.tif', 'sp.tif', 'mask.tif', 'inst.tif'):
            a, names = read_tiff(p/f)
            kw = dict(photometric='rgb') if f == 'he.tif' else {}
            if names: kw['metadata'] = {'axes': 'CYX', 'Channel': {'Name': names}}
            tifffile.imwrite(copy/p.name/f, np.asarray(a), tile=(16, 16), compression='zlib', **kw)
    a = TileDataset(list_tissues(cohort), stats, tile=24, margin=16)
    b = TileDataset(list_tissues(copy), stats, tile=24, margin=16)
    assert isinstance(b.tissues[0].sp_raw, TiffArray) and isinstance(b.tissues[0].he, TiffArray)
    assert a.tiles == b.tiles
    for i in range(len(a)):
        for x, y in zip(a.read(i), b.read(i)): np.testing.assert_array_equal(x, y)
