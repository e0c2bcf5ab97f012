"Instance post-processing: recovery of known nuclei, resolution defaults, empty and bad inputs, types, table."
import numpy as np, pytest
from hypothesis import given, settings, strategies as st
from skimage.measure import regionprops
from spseg.data import IGNORE_INDEX, N_CLASSES, hv_map
from spseg.synthetic import make_tissue
from spseg.metrics import panoptic_quality, instance_class, MATCH_RADIUS
from spseg.instance import (hv_watershed, postprocess, instance_table, instance_types, simulate_prediction,
                            resolution_defaults, TABLE_COLUMNS)

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
    assert [resolution_defaults(m)['radius'] for m in (40, 20)] == [MATCH_RADIUS[40], MATCH_RADIUS[20]]

def test_empty_and_bad_inputs():
    assert hv_watershed(np.zeros((10, 12)), np.zeros((2, 10, 12))).max() == 0
    inst, table = postprocess(np.zeros((10, 12)), np.zeros((2, 10, 12)), types=np.zeros((10, 12), np.uint8))
    assert len(table) == 0 and list(table.columns) == TABLE_COLUMNS
    with pytest.raises(ValueError, match='shape'): hv_watershed(np.zeros((10, 12)), np.zeros((10, 12)))
    with pytest.raises(ValueError, match='magnification'):
        hv_watershed(np.zeros((3, 3)), np.zeros((2, 3, 3)), magnification=10)

# --- types and the per-instance table ------------------------------------------------------------------------------

def test_majority_vote_type():
    inst = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3]])
    cls = np.array([[4, 4, 5, 0, 0, 0, 1, IGNORE_INDEX, IGNORE_INDEX]])
    t, p = instance_types(inst, cls)
    assert t[1:].tolist() == [4, 1, 0]        # 2: background is outvoted by a single stroma pixel; 3: no valid vote
    assert np.allclose(p[1:], [2 / 4, 1 / 3, 0])
    assert t.tolist() == instance_class(inst, cls).tolist()   # the rule that types true nuclei for mPQ

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
