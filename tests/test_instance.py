"Instance post-processing and metrics: recovery of known nuclei, hand-made metric cases, empty inputs, padding, types, table."
import itertools
import numpy as np, pandas as pd, pytest
from hypothesis import given, settings, strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from skimage.measure import regionprops
from spseg.data import IGNORE_INDEX, N_CLASSES, hv_map
from spseg.synthetic import make_tissue
from spseg.instance import (hv_watershed, postprocess, instance_table, instance_types, simulate_prediction, panoptic_quality,
                            aji, binary_dice, hv_mse, centroids, match_centroids, detection_counts, f1_scores, tissue_counts,
                            scores, summarise, pool, resolution_defaults, TABLE_COLUMNS)

def disks(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1): inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = i
    return inst

def perfect_maps(inst): return (inst > 0).astype(np.float32), hv_map(inst)

@pytest.fixture(scope='module')
def tissue(): return make_tissue(384, 7)

# --- post-processing recovers known nuclei -------------------------------------------------------------------------

def test_touching_disks_recovered():
    inst = disks((80, 120), [(20, 20), (20, 37), (50, 50), (50, 67), (35, 100), (62, 100), (62, 84)], 9)
    pred = hv_watershed(*perfect_maps(inst))
    assert pred.max() == 7
    assert panoptic_quality(inst, pred)['pq'] >= 0.9

@settings(max_examples=25, deadline=None)
@given(st.integers(8, 16), st.floats(1.3, 1.98), st.floats(0, np.pi), st.integers(0, 2**16))
def test_touching_pairs_property(radius, gap, angle, seed):
    "Three pairs of touching disks (radius ≥ 8 px, nuclei at 40×), any overlap and orientation, give six nuclei."
    rng = np.random.default_rng(seed)
    d = gap * radius
    centres = []
    for k in range(3):
        cy, cx = 42 + 75 * k, 65 + rng.integers(-5, 6)
        dy, dx = d / 2 * np.sin(angle), d / 2 * np.cos(angle)
        centres += [(cy - dy, cx - dx), (cy + dy, cx + dx)]
    inst = disks((240, 130), centres, radius)
    pred = hv_watershed(*perfect_maps(inst))
    assert pred.max() == 6
    assert panoptic_quality(inst, pred)['pq'] >= 0.9

def test_synthetic_tissue_recovered(tissue):
    pred, table = postprocess(*perfect_maps(tissue.inst), types=tissue.mask)
    assert panoptic_quality(tissue.inst, pred)['pq'] >= 0.9
    assert len(table) == pred.max()

def test_fast_flooding_equals_single_watershed(tissue):
    b, h = simulate_prediction(tissue.inst, 3, blur=1.5, noise=0.2, hv_noise=0.2)
    np.testing.assert_array_equal(hv_watershed(b, h), hv_watershed(b, h, fast=False))

def test_resolution_defaults_used():
    inst = disks((40, 40), [(20, 20)], 8)   # 197 px
    assert hv_watershed(*perfect_maps(inst)).max() == hv_watershed(*perfect_maps(inst), magnification=20).max() == 1
    assert hv_watershed(*perfect_maps(inst), min_object=198).max() == 0
    assert resolution_defaults(20)['ksize'] == 11

def test_empty_and_bad_inputs():
    assert hv_watershed(np.zeros((10, 12)), np.zeros((2, 10, 12))).max() == 0
    inst, table = postprocess(np.zeros((10, 12)), np.zeros((2, 10, 12)), types=np.zeros((10, 12), np.uint8))
    assert len(table) == 0 and list(table.columns) == TABLE_COLUMNS
    with pytest.raises(ValueError, match='shape'): hv_watershed(np.zeros((10, 12)), np.zeros((10, 12)))
    with pytest.raises(ValueError, match='magnification'): hv_watershed(np.zeros((3, 3)), np.zeros((2, 3, 3)), magnification=10)

# --- types and the per-instance table ------------------------------------------------------------------------------

def test_majority_vote_type():
    inst = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3]])
    cls = np.array([[4, 4, 5, 0, 0, 0, 1, IGNORE_INDEX, IGNORE_INDEX]])
    t, p = instance_types(inst, cls)
    assert t[1:].tolist() == [4, 1, 0]        # 2: background is outvoted by a single stroma pixel; 3: no valid vote
    assert np.allclose(p[1:], [2 / 4, 1 / 3, 0])

def test_type_probability_is_mean_softmax_of_winner():
    inst = np.array([[1, 1, 2]])
    probs = np.zeros((N_CLASSES, 1, 3), np.float32)
    probs[2, 0] = [0.9, 0.5, 0.1]; probs[3, 0] = [0.1, 0.4, 0.6]; probs[0, 0] = [0.0, 0.1, 0.3]
    t, p = instance_types(inst, probs=probs)
    assert t[1:].tolist() == [2, 3] and np.allclose(p[1:], [0.7, 0.6])

def test_table_matches_regionprops(tissue):
    inst = tissue.inst
    table = instance_table(inst, tissue.mask).set_index('id')
    props = regionprops(inst)
    assert len(table) == len(props)
    for r in props[::7]:
        row = table.loc[r.label]
        assert row.area == r.area
        assert np.allclose([row.y, row.x], r.centroid)
        assert (row.y0, row.x0, row.y1, row.x1) == r.bbox
        assert row.type == np.bincount(tissue.mask[inst == r.label]).argmax() and row.type_prob == 1.0

# --- metrics: hand-made cases ---------------------------------------------------------------------------------------

TWO = np.zeros((10, 20), np.int32); TWO[2:8, 2:8] = 1; TWO[2:8, 10:18] = 2
SPLIT = TWO.copy(); SPLIT[2:8, 14:18] = 3
MISSED = np.where(TWO == 2, 0, TWO)
EMPTY = np.zeros_like(TWO)

def test_perfect_match():
    assert panoptic_quality(TWO, TWO[:, ::1] * 3)['pq'] == 1.0
    assert aji(TWO, TWO) == 1.0
    assert f1_scores(**detection_counts(centroids(TWO), centroids(TWO)))['f1'] == 1.0

def test_split_nucleus():
    pq = panoptic_quality(TWO, SPLIT)
    assert np.isclose(pq['dq'], 1 / (1 + 0.5 * 2 + 0.5 * 1)) and pq['sq'] == 1.0
    assert np.isclose(aji(TWO, SPLIT), 60 / 108)

def test_missed_nucleus():
    assert np.isclose(panoptic_quality(TWO, MISSED)['pq'], 1 / 1.5)
    assert np.isclose(aji(TWO, MISSED), 36 / 84)
    assert detection_counts(centroids(TWO), centroids(MISSED)) == dict(tp=1, fp=0, fn=1)

@pytest.mark.parametrize('true,pred,expected', [(TWO, EMPTY, 0.0), (EMPTY, TWO, 0.0), (EMPTY, EMPTY, 1.0)])
def test_empty_sides(true, pred, expected):
    with np.errstate(all='raise'):
        c = tissue_counts(true, np.where(true > 0, 2, 0), pred, np.full(3, 2), pred > 0, hv_map(pred))
        s = scores(c)
    assert all(np.isfinite(v) for v in s.values())
    for k in ('bpq', 'bdq', 'aji', 'det_f1', 'dice'): assert s[k] == expected, k
    assert s['mpq'] == expected

def test_ignored_pixels_do_not_count():
    mask = np.where(TWO > 0, 2, 0); mask[:, 9:] = IGNORE_INDEX      # nucleus 2 lies in padding
    s = scores(tissue_counts(TWO, mask, MISSED, np.array([0, 2]), MISSED > 0, hv_map(MISSED)))
    assert s['bpq'] == s['aji'] == s['det_f1'] == s['dice'] == s['mpq'] == 1.0
    assert binary_dice(MISSED > 0, TWO, valid=mask != IGNORE_INDEX) == 1.0
    assert hv_mse(hv_map(MISSED), TWO, valid=mask != IGNORE_INDEX) == 0.0

def test_hv_mse_regions():
    err = hv_map(TWO) + 0.5
    err[:, TWO == 0] = 0                                         # error on nucleus pixels only
    frac = (TWO > 0).mean()
    assert np.isclose(hv_mse(err, TWO, region='nuclei'), 0.25)
    assert np.isclose(hv_mse(err, TWO, region='all'), 0.25 * frac)

def test_mpq_wrong_type():
    c = tissue_counts(TWO, np.where(TWO == 1, 2, np.where(TWO == 2, 5, 0)), TWO, np.array([0, 2, 4]))
    assert np.isclose(scores(c)['mpq'], 1 / 3) and scores(c)['bpq'] == 1.0

def test_pooled_and_per_tissue():
    mask = np.where(TWO > 0, 2, 0)
    counts = [tissue_counts(TWO, mask, TWO), tissue_counts(TWO, mask, MISSED), tissue_counts(EMPTY, EMPTY, EMPTY)]
    table = summarise(counts, ['a', 'b', 'c'])
    assert np.isclose(table.loc['mean over tissues', 'bpq'], (1 + 2 / 3 + 1) / 3)
    assert np.isclose(table.loc['pooled', 'bpq'], 3 / 3.5)
    assert pool(counts)['pq_tp'] == 3 and table.loc['pooled', 'n_true'] == 4

# --- metrics: properties --------------------------------------------------------------------------------------------

label_maps = st.integers(0, 2**16).map(lambda s: np.random.default_rng(s).integers(0, 4, (12, 12)) *
                                       (np.random.default_rng(s + 1).random((12, 12)) < 0.7))

@settings(max_examples=40, deadline=None)
@given(label_maps, label_maps, st.permutations(range(1, 4)))
def test_pq_symmetric_and_relabel_invariant(a, b, perm):
    "PQ is symmetric and ignores ids (AJI breaks IoU ties by id, so it is only range-checked)."
    relabel = np.array([0, *perm])
    pq = panoptic_quality(a, b)
    assert np.isclose(pq['pq'], panoptic_quality(b, a)['pq'])
    assert np.isclose(pq['pq'], panoptic_quality(a, relabel[b])['pq'])
    assert 0 <= pq['pq'] <= 1 and 0 <= aji(a, b) <= 1

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 8), st.integers(0, 8), st.integers(0, 2**16))
def test_centroid_matching_is_maximum_and_one_to_one(n_true, n_pred, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 40, (n_true, 2)), rng.uniform(0, 40, (n_pred, 2))
    pairs = match_centroids(a, b, 12)
    assert len(set(pairs[:, 0])) == len(pairs) == len(set(pairs[:, 1]))
    if len(pairs): assert (np.linalg.norm(a[pairs[:, 0]] - b[pairs[:, 1]], axis=1) <= 12).all()
    within = np.linalg.norm(a[:, None] - b[None], axis=2) <= 12 if n_true and n_pred else np.zeros((n_true, n_pred), bool)
    best = (maximum_bipartite_matching(csr_matrix(within.astype(int)), perm_type='column') >= 0).sum() if within.size else 0
    assert len(pairs) == best
