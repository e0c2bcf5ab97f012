"Scores of spseg.metrics: hand-made semantic and instance cases, empty inputs, padding, pooling, and the two F1 rules."
import itertools, math
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from spseg.data import IGNORE_INDEX, N_CLASSES, hv_map
from spseg.metrics import (confusion, per_class_dice, pixel_shares, mean_dice, class_table, balanced_accuracy,
                           panoptic_quality, aji, binary_dice, hv_mse, centroids, match_centroids, detection_counts,
                           f1_scores, tissue_counts, scores, summarise, pool, class_votes, majority_class,
                           instance_class, match_radius, MATCH_RADIUS)

# --- semantic: confusion matrix, Dice, shares, balanced accuracy ----------------------------------------------------

def test_semantic_hand_made():
    # class 0: 2 true, class 1: 3 true, class 4: 1 true; 3 padding pixels predicted as class 7
    target = torch.tensor([[0, 0, 1, 1, 1, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2, 7, 7, 7]])
    cm = confusion(pred, target)
    assert cm.sum() == 6 and cm[:, 7].sum() == 0
    d = per_class_dice(cm)
    np.testing.assert_allclose(d[[0, 1, 2, 4]], [0.5, 2 / 3, 0, 0])   # class 2: FP only; class 4: FN only
    assert np.isnan(d[[3, 5, 6, 7, 8, 9]]).all()                      # absent from both: left out
    assert mean_dice(cm) == pytest.approx((0.5 + 2 / 3) / 4)
    gt, pr = pixel_shares(cm)
    np.testing.assert_allclose(gt[[0, 1, 4]], [100 * 2 / 6, 50, 100 / 6])
    np.testing.assert_allclose(pr[[0, 1, 2]], [100 * 2 / 6, 50, 100 / 6])
    t = class_table(cm)
    assert list(t.columns) == ['class', 'GT %', 'Pred %', 'Dice']
    assert t.iloc[-1]['Dice'] == pytest.approx(mean_dice(cm), abs=1e-4)

def test_semantic_all_padding_and_perfect():
    t = torch.full((4, 4), IGNORE_INDEX)
    assert confusion(torch.zeros(4, 4, dtype=torch.long), t).sum() == 0 and math.isnan(mean_dice(confusion(t * 0, t)))
    y = torch.randint(0, N_CLASSES, (3, 8, 8))
    assert mean_dice(confusion(y, y)) == 1.0

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16))
def test_confusion_sums_and_balanced_accuracy(seed):
    "Confusion matrices of two halves add up to the whole; balanced accuracy is the mean recall of its rows."
    g = torch.Generator().manual_seed(seed)
    y, p = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (50,), generator=g)
    cm = confusion(p, y)
    assert torch.equal(confusion(p[:20], y[:20]) + confusion(p[20:], y[20:]), cm)
    rows = cm.sum(1)
    recall = (cm.diag()[rows > 0] / rows[rows > 0]).double().mean().item()
    assert balanced_accuracy(p, y) == pytest.approx(recall)

# --- instances: hand-made cases -------------------------------------------------------------------------------------

TWO = np.zeros((10, 20), np.int32); TWO[2:8, 2:8] = 1; TWO[2:8, 10:18] = 2
SPLIT = TWO.copy(); SPLIT[2:8, 14:18] = 3
MISSED = np.where(TWO == 2, 0, TWO)
EMPTY = np.zeros_like(TWO)

def test_perfect_match():
    assert panoptic_quality(TWO, TWO * 3)['pq'] == 1.0
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

def test_majority_class_votes():
    inst = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3]])
    cls = np.array([[4, 4, 5, 0, 0, 0, 1, IGNORE_INDEX, IGNORE_INDEX]])
    votes = class_votes(inst, cls)
    assert votes.shape == (4, N_CLASSES) and votes[3].sum() == 0
    assert majority_class(votes).tolist() == instance_class(inst, cls).tolist() == [0, 4, 1, 0]

def test_pooled_and_per_tissue():
    mask = np.where(TWO > 0, 2, 0)
    counts = [tissue_counts(TWO, mask, TWO), tissue_counts(TWO, mask, MISSED), tissue_counts(EMPTY, EMPTY, EMPTY)]
    table = summarise(counts, ['a', 'b', 'c'])
    assert np.isclose(table.loc['mean over tissues', 'bpq'], (1 + 2 / 3 + 1) / 3)
    assert np.isclose(table.loc['pooled', 'bpq'], 3 / 3.5)
    assert pool(counts)['pq_tp'] == 3 and table.loc['pooled', 'n_true'] == 4

def test_match_radius():
    assert match_radius() == MATCH_RADIUS[40] == 12 and match_radius(20) == 6
    with pytest.raises(ValueError, match='magnification'): match_radius(10)
    # a prediction 8 px off: detected at 40× (radius 12), missed at 20× (radius 6)
    true, pred = np.zeros((20, 30), np.int32), np.zeros((20, 30), np.int32)
    true[8:12, 4:8], pred[8:12, 12:16] = 1, 1
    mask = (true > 0).astype(np.uint8) * 2
    assert scores(tissue_counts(true, mask, pred))['det_f1'] == 1.0
    assert scores(tissue_counts(true, mask, pred, magnification=20))['det_f1'] == 0.0

# --- detection F1: the two matching rules ---------------------------------------------------------------------------

TRUE_AB, PRED_AB = np.array([[0, 0], [0, 12]]), np.array([[0, 1], [5, 0]])

def test_rules_differ_on_the_example():
    "A–a 1 px, A–b 5 px, B–a 11 px, B–b 13 px: the assignment takes A–a + B–b (14 px) and drops B–b."
    assert match_centroids(TRUE_AB, PRED_AB, 12).tolist() == [[0, 0]]
    assert match_centroids(TRUE_AB, PRED_AB, 12, rule='most_pairs').tolist() == [[0, 1], [1, 0]]
    assert detection_counts(TRUE_AB, PRED_AB) == dict(tp=1, fp=1, fn=1)
    assert detection_counts(TRUE_AB, PRED_AB, rule='most_pairs') == dict(tp=2, fp=0, fn=0)
    mask = np.zeros((30, 30), np.uint8)
    true_inst, pred_inst = np.zeros((30, 30), np.int32), np.zeros((30, 30), np.int32)
    for k, (y, x) in enumerate(TRUE_AB + 10, 1): true_inst[y, x] = k
    for k, (y, x) in enumerate(PRED_AB + 10, 1): pred_inst[y, x] = k
    mask[true_inst > 0] = 2
    assert tissue_counts(true_inst, mask, pred_inst)['det_tp'] == 1
    assert tissue_counts(true_inst, mask, pred_inst, rule='most_pairs')['det_tp'] == 2

def test_unknown_rule():
    with pytest.raises(ValueError, match='rule'): match_centroids([[0, 0]], [[0, 1]], rule='greedy')

def test_radius_is_inclusive_for_both_rules():
    for rule in ('assignment', 'most_pairs'):
        assert len(match_centroids([[0, 0]], [[0, 12]], 12, rule)) == 1
        assert len(match_centroids([[0, 0]], [[0, 12.01]], 12, rule)) == 0

def points(n, rng): return rng.uniform(0, 40, (n, 2))

def one_to_one(pairs): return len(set(pairs[:, 0])) == len(pairs) == len(set(pairs[:, 1]))

def max_pairs_within(a, b, radius):
    if not (len(a) and len(b)): return 0
    within = np.linalg.norm(a[:, None] - b[None], axis=2) <= radius
    return int((maximum_bipartite_matching(csr_matrix(within.astype(int)), perm_type='column') >= 0).sum())

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 8), st.integers(0, 8), st.integers(0, 2**16))
def test_most_pairs_is_maximum_and_one_to_one(n_true, n_pred, seed):
    rng = np.random.default_rng(seed)
    a, b = points(n_true, rng), points(n_pred, rng)
    pairs = match_centroids(a, b, 12, rule='most_pairs')
    assert one_to_one(pairs)
    if len(pairs): assert (np.linalg.norm(a[pairs[:, 0]] - b[pairs[:, 1]], axis=1) <= 12).all()
    assert len(pairs) == max_pairs_within(a, b, 12)

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 8), st.integers(0, 8), st.integers(0, 2**16))
def test_assignment_within_radius_and_never_more_than_most_pairs(n_true, n_pred, seed):
    rng = np.random.default_rng(seed)
    a, b = points(n_true, rng), points(n_pred, rng)
    pairs = match_centroids(a, b, 12)
    assert one_to_one(pairs)
    if len(pairs): assert (np.linalg.norm(a[pairs[:, 0]] - b[pairs[:, 1]], axis=1) <= 12).all()   # none beyond
    assert len(match_centroids(a, b, 12, rule='most_pairs')) >= len(pairs)

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5), st.integers(0, 5), st.integers(0, 2**16))
def test_assignment_is_hovernets_rule(n_true, n_pred, seed):
    "Brute force: the minimum-total-distance full matching over all pairs, then pairs beyond the radius dropped."
    rng = np.random.default_rng(seed)
    a, b = points(n_true, rng), points(n_pred, rng)
    pairs = match_centroids(a, b, 12)
    if not (n_true and n_pred):
        assert len(pairs) == 0
        return
    d = np.linalg.norm(a[:, None] - b[None], axis=2)
    k = min(n_true, n_pred)
    matchings = [list(zip(rows, cols)) for rows in itertools.combinations(range(n_true), k)
                 for cols in itertools.permutations(range(n_pred), k)]
    best = min(matchings, key=lambda m: sum(d[i, j] for i, j in m))
    expected = sorted([i, j] for i, j in best if d[i, j] <= 12)
    assert sorted(pairs.tolist()) == expected

# --- instances: properties ------------------------------------------------------------------------------------------

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
