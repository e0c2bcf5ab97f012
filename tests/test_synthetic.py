"End-to-end checks of the synthetic cohort generator: determinism, the on-disk layout, and what H&E vs SP can tell."
import numpy as np, pytest
from scipy import ndimage as ndi
from spseg.data import CLASSES, MARKERS, TISSUE_FILES, load_tissue, list_tissues
from spseg.synthetic import make_cohort, make_tissue

def _files(paths): return {(p.name, f): (p / f).read_bytes() for p in paths for f in TISSUE_FILES.values()}

@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp('a'), n_tissues=2, size=300, seed=5, progress=False)

def test_same_seed_gives_identical_files(cohort, tmp_path):
    again = make_cohort(tmp_path, n_tissues=2, size=300, seed=5, progress=False)
    assert [p.name for p in again] == ['tissue_000', 'tissue_001']
    assert _files(cohort) == _files(again)

def test_other_seed_gives_other_files(cohort, tmp_path):
    other = _files(make_cohort(tmp_path, n_tissues=2, size=300, seed=6, progress=False))
    ref = _files(cohort)
    for key in ref:
        assert ref[key] != other[key], key

def test_tissue_k_does_not_depend_on_cohort_size(cohort, tmp_path):
    one = make_cohort(tmp_path, n_tissues=1, size=300, seed=5, progress=False)
    assert _files(one) == {k: v for k, v in _files(cohort).items() if k[0] == 'tissue_000'}

def test_cohort_loads(cohort):
    assert list_tissues(cohort[0].parent) == cohort
    for p in cohort:
        t = load_tissue(p)
        assert t.he.shape == (300, 300, 3) and t.he.dtype == np.uint8
        assert t.sp_raw.shape == (16, 300, 300) and t.sp_raw.dtype == np.uint16
        assert t.mask.shape == (300, 300) and t.mask.dtype == np.uint8 and t.mask.max() <= 9
        inst = np.asarray(t.inst_raw)
        assert inst.dtype == np.int32 and inst.min() == 0 and inst.max() > 0
        assert ((t.mask > 0) == (inst > 0)).all()                # the mask labels nucleus pixels only

def _touching_pairs(inst):
    "Pairs of distinct instance ids that are 4-adjacent somewhere."
    pairs = set()
    for a, b in ((inst[:, :-1], inst[:, 1:]), (inst[:-1], inst[1:])):
        sel = (a > 0) & (b > 0) & (a != b)
        pairs |= set(zip(a[sel].tolist(), b[sel].tolist()))
    return pairs

def test_touching_nuclei_keep_distinct_ids(cohort):
    inst = np.concatenate([np.asarray(load_tissue(p).inst_raw) for p in cohort], 1)
    assert len(_touching_pairs(inst)) >= 1

def test_each_instance_is_one_class_and_connected():
    t = make_tissue(400, 3)
    ids = np.arange(1, t.inst.max() + 1)
    np.testing.assert_array_equal(ndi.maximum(t.mask, t.inst, ids), ndi.minimum(t.mask, t.inst, ids))
    assert set(np.unique(t.inst)) == set(range(t.inst.max() + 1))   # ids 1..n all used

@pytest.fixture(scope='module')
def lymph():
    "A tissue with boosted lymphocyte-subset shares, and per-nucleus class, area, darkness and SP means."
    t = make_tissue(1000, 21, shares={4: 1.5, 5: 1.5, 8: 1.5, 9: 1.5})
    ids = np.arange(1, t.inst.max() + 1)
    cls = ndi.maximum(t.mask, t.inst, ids).astype(int)
    area = ndi.sum_labels(np.ones_like(t.inst), t.inst, ids)
    dark = 255 - ndi.mean(t.he.mean(-1), t.inst, ids)
    sp = {m: ndi.mean(t.sp[MARKERS.index(m)].astype(np.float32), t.inst, ids) for m in MARKERS}
    return cls, area, dark, sp

SUBSETS = [4, 5, 8, 9]   # helper T, cytotoxic T, Treg, B cells

def test_lymphocyte_subsets_look_alike_in_he(lymph):
    cls, area, dark, _ = lymph
    for c in SUBSETS: assert (cls == c).sum() >= 20, CLASSES[c]
    areas = [area[cls == c].mean() for c in SUBSETS]
    darks = [dark[cls == c].mean() for c in SUBSETS]
    assert max(areas) < 1.15 * min(areas), areas
    assert max(darks) < 1.10 * min(darks), darks
    tumour = area[cls == 2].mean()
    assert tumour > 1.8 * max(areas)                            # but lineages differ: tumour nuclei are much larger

def test_lymphocyte_subsets_differ_in_sp(lymph):
    cls, _, _, sp = lymph
    mean = lambda m, c: sp[m][cls == c].mean()
    assert mean('CD8a', 5) > 3 * mean('CD8a', 4)                # cytotoxic T: CD8a+
    assert mean('FOXP3', 8) > 3 * mean('FOXP3', 4)              # Treg: FOXP3+, helper T: FOXP3-
    assert mean('CD4', 4) > 2 * mean('CD4', 5)                  # helper T: CD4+, cytotoxic T: CD4-
    assert mean('CD20', 9) > 3 * max(mean('CD20', c) for c in (4, 5, 8))   # B cells: CD20+
    for c in SUBSETS: assert mean('CD45', c) > 2 * mean('CD45', 2)         # immune CD45+ vs tumour CD45-
    assert mean('Pan-CK', 2) > 3 * mean('Pan-CK', 4)            # tumour Pan-CK+
