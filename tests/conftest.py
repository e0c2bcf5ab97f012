import numpy as np, pytest
from spseg.data import MARKERS, write_tissue

def _arrays(h=16, w=20, seed=0):
    rng = np.random.default_rng(seed)
    he = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    sp = rng.integers(0, 4000, (16, h, w), dtype=np.uint16)
    mask = np.zeros((h, w), np.uint8); mask[2:6, 2:6] = 2; mask[8:11, 10:13] = 5
    inst = np.zeros((h, w), np.int32); inst[2:6, 2:4] = 1; inst[2:6, 4:6] = 2; inst[8:11, 10:13] = 3
    return dict(he=he, sp=sp, mask=mask, inst=inst)

@pytest.fixture
def arrays(): return _arrays()

@pytest.fixture
def tissue_dir(tmp_path, arrays):
    "A valid tissue folder; tests break one file of it."
    return write_tissue(tmp_path/'tissue_a', **arrays)

def two_tissue_cohort(root, h=240, w=200, seed=0):
    "Two random tissues `t0`, `t1` of `h`×`w` under `root`, a tumour and a helper-T block each; returns their paths."
    rng = np.random.default_rng(seed)
    for i in range(2):
        m = np.zeros((h, w), np.uint8)
        m[10:30, 10:40] = 2
        m[150:170, w // 2:w // 2 + 30] = 4
        write_tissue(root/f't{i}', rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                     rng.integers(0, 3000, (16, h, w), dtype=np.uint16), m)
    return sorted(p for p in root.iterdir() if p.is_dir())
