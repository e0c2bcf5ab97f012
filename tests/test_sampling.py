"Sampling: eq. 2 weights on hand-made presence matrices, cache on disk, seeded weighted draws."
import warnings; warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from spseg.data import write_tissue, sp_stats, TileDataset, IGNORE_INDEX
from spseg.sampling import (sampling_weights, class_presence, tile_class_counts, cached_class_counts, counts_key,
                            WeightedDataLoader, weighted_dls, expected_class_share)

def naive_weights(P, gamma):
    P = np.asarray(P, float); n, C = P.shape
    N = [sum(P[i, c] for i in range(n)) for c in range(C)]; k = sum(N)
    w = [k / (gamma * N[c] + (1 - gamma) * k) if gamma * N[c] + (1 - gamma) * k > 0 else 0 for c in range(C)]
    out = [(1 - gamma) * max(P[i]) + gamma * sum(P[i, c] * w[c] for c in range(C)) for i in range(n)]
    nz = [v for v in out if v > 0]
    return np.array([v if v > 0 else min(nz) for v in out])

def test_hand_made():
    P = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    # N = (2, 1, 1), k = 4; gamma = 0.45: w_c = 4 / (0.45 N_c + 0.55*4)
    w = 4 / (0.45 * np.array([2, 1, 1]) + 2.2)
    expect = [0.55 + 0.45 * w[0], 0.55 + 0.45 * (w[0] + w[1]), 0.55 + 0.45 * w[2], 0.55 + 0.45 * w[0]]
    assert np.allclose(sampling_weights(P, 0.45), expect)
    assert np.allclose(sampling_weights(P, 0.0), 1)

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.45, 0.85, 1.0]), st.integers(1, 30), st.integers(1, 9))
def test_matches_naive(seed, gamma, n, C):
    P = np.random.default_rng(seed).random((n, C)) < 0.3
    if not P.any(): assert np.allclose(sampling_weights(P, gamma), 1); return
    w = sampling_weights(P, gamma)
    assert np.allclose(w, naive_weights(P, gamma)) and (w > 0).all()

def test_rarer_classes_weigh_more():
    P = np.zeros((10, 2), bool); P[:9, 0] = True; P[9, 1] = True       # class 1 in one tile only
    w = sampling_weights(P, 0.85)
    assert w[9] > w[0]
    with pytest.raises(ValueError, match='gamma'): sampling_weights(P, -0.1)

def _cohort(root, n=3, size=240):
    rng = np.random.default_rng(0)
    for t in range(n):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(30):
            y, x = rng.integers(0, size - 6, 2); mask[y:y + 6, x:x + 6] = rng.integers(1, 10)
        write_tissue(root / f't{t}', np.zeros((size, size, 3), np.uint8), rng.integers(0, 50, (16, size, size), dtype=np.uint16), mask)
    return root

@pytest.fixture(scope='module')
def cohort(tmp_path_factory): return _cohort(tmp_path_factory.mktemp('cohort'))

def test_counts_and_cache(cohort):
    ids = ['t0', 't1', 't2']
    ds = TileDataset([cohort / i for i in ids], sp_stats(cohort, ids), tile=100)    # 240 = 2×100 + a padded 40
    counts = tile_class_counts(ds)
    assert counts.shape == (len(ds), 10)
    for n in range(len(ds)):
        m = ds.read(n)[2]
        assert np.array_equal(counts[n], np.bincount(m[m != IGNORE_INDEX].ravel(), minlength=10)[:10])
    c = cached_class_counts(ds)
    files = list((cohort / '.spseg').glob(f'class_counts-{counts_key(ds)}.npy'))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), counts) and np.array_equal(c, counts)
    assert not list((cohort / '.spseg').glob('*.tmp'))
    np.save(files[0], counts * 0)                                   # the cache is what is read back
    assert cached_class_counts(ds).sum() == 0
    assert cached_class_counts(ds, cache=False).sum() == counts.sum()
    files[0].unlink()
    sub = TileDataset([cohort / 't0'], sp_stats(cohort, ids), tile=100)
    assert counts_key(sub) != counts_key(ds)
    assert class_presence(counts).shape == (len(ds), 9)

def test_sampler_seeded():
    w = np.arange(1, 21, dtype=float)
    a = WeightedDataLoader(list(range(20)), w, seed=3, bs=4)
    b = WeightedDataLoader(list(range(20)), w, seed=3, bs=4)
    c = WeightedDataLoader(list(range(20)), w, seed=4, bs=4)
    ea, eb, ec = [a.get_idxs() for _ in range(3)], [b.get_idxs() for _ in range(3)], [c.get_idxs() for _ in range(3)]
    assert ea == eb and ea != ec and ea[0] != ea[1]
    assert all(len(e) == 20 for e in ea)
    assert [torch.cat(list(a)).tolist() for _ in range(2)] == [torch.cat(list(b)).tolist() for _ in range(2)]

def test_sampler_follows_weights():
    w = np.array([1., 0., 3., 6.])
    dl = WeightedDataLoader(list(range(4)), w, seed=0, bs=None)
    draws = np.concatenate([dl.get_idxs() for _ in range(5000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq[1] == 0 and np.allclose(freq, w / w.sum(), atol=0.01)
    assert dl.new(shuffle=False).get_idxs() == [0, 1, 2, 3]
    assert torch.equal(dl.new().weights, dl.weights)
    with pytest.raises(ValueError, match='weights'): WeightedDataLoader(list(range(4)), [1, 2])
    with pytest.raises(ValueError, match='non-negative'): WeightedDataLoader(list(range(2)), [0, 0])

def test_weighted_dls(cohort):
    dls = weighted_dls(cohort, ['t0', 't1'], ['t2'], gamma=0.85, bs=3, tile=120, seed=0)
    assert isinstance(dls.train, WeightedDataLoader) and dls.train.n == len(dls.train.dataset) == 8
    sp, he, mask, inst, hv = dls.train.one_batch()
    assert sp.shape == (3, 16, 120, 120) and mask.shape == (3, 120, 120)
    again = weighted_dls(cohort, ['t0', 't1'], ['t2'], gamma=0.85, bs=3, tile=120, seed=0)
    assert dls.train.get_idxs() == again.train.get_idxs()

def test_expected_share():
    counts = np.array([[90, 10, 0], [50, 0, 50]])
    assert np.allclose(expected_class_share(counts), [70, 5, 25])
    assert np.allclose(expected_class_share(counts, [1, 0]), [90, 10, 0])
