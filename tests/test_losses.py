"Losses: agreement with naive per-pixel versions, padding is ignored, no NaN/inf on empty or padded tiles."
import itertools, math
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st
from spseg.data import IGNORE_INDEX, hv_map
from spseg.losses import (ce_loss, dice_loss, focal_tversky_loss, mse_loss, msge_loss, hv_gradients, class_weights,
                          binary_target, boundary_target, bce_loss, SemanticLoss, InstanceLoss)

def _batch(seed, b=2, c=4, h=5, w=6, pad=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 3
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < pad] = IGNORE_INDEX
    return logits, target

def _valid(target): return [(b, y, x) for b, y, x in itertools.product(*map(range, target.shape)) if target[b, y, x] != IGNORE_INDEX]

def _probs(logits, b, y, x): return torch.softmax(logits[b, :, y, x].double(), 0).tolist()

def naive_ce(logits, target, weight=None):
    num = den = 0.0
    for b, y, x in _valid(target):
        c = int(target[b, y, x]); wc = 1.0 if weight is None else float(weight[c])
        num -= wc * math.log(_probs(logits, b, y, x)[c]); den += wc
    return num / den if den else 0.0

def naive_counts(logits, target):
    C = logits.shape[1]; tp, fn, fp = np.zeros(C), np.zeros(C), np.zeros(C)
    for b, y, x in _valid(target):
        p = _probs(logits, b, y, x)
        for c in range(C):
            t = float(target[b, y, x] == c)
            tp[c] += p[c] * t; fn[c] += (1 - p[c]) * t; fp[c] += p[c] * (1 - t)
    return tp, fn, fp

def naive_dice(logits, target, s=1e-3):
    tp, fn, fp = naive_counts(logits, target)
    return float(np.sum(1 - (2 * tp + s) / ((tp + fp) + (tp + fn) + s)))

def naive_ft(logits, target, a=0.7, b=0.3, g=4/3, s=1e-6):
    tp, fn, fp = naive_counts(logits, target)
    return float(np.sum((1 - (tp + s) / (tp + a * fn + b * fp + s)) ** g))

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.integers(2, 5), pad=st.sampled_from([0.0, 0.3, 0.9]))
def test_agrees_with_naive(seed, c, pad):
    logits, target = _batch(seed, c=c, pad=pad)
    w = torch.linspace(0.5, 2, c)
    assert float(ce_loss(logits, target)) == pytest.approx(naive_ce(logits, target), abs=1e-4)
    assert float(ce_loss(logits, target, w)) == pytest.approx(naive_ce(logits, target, w), abs=1e-4)
    assert float(dice_loss(logits, target)) == pytest.approx(naive_dice(logits, target), abs=1e-4)
    assert float(focal_tversky_loss(logits, target)) == pytest.approx(naive_ft(logits, target), abs=1e-4)

def _conv_naive(img, k):
    H, W, s = img.shape[0], img.shape[1], k.shape[0] // 2
    out = np.zeros_like(img)
    for y, x, dy, dx in itertools.product(range(H), range(W), range(-s, s + 1), range(-s, s + 1)):
        if 0 <= y + dy < H and 0 <= x + dx < W: out[y, x] += k[dy + s, dx + s] * img[y + dy, x + dx]
    return out

def _naive_kernels(size=5):
    s = size // 2; kh, kv = np.zeros((size, size)), np.zeros((size, size))
    for r, c in itertools.product(range(size), range(size)):
        i, j = c - s, r - s                      # i: horizontal offset (column), j: vertical offset (row)
        if i or j: kh[r, c], kv[r, c] = i / (i * i + j * j), j / (i * i + j * j)
    return kh, kv

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_msge_mse_agree_with_naive(seed):
    g = torch.Generator().manual_seed(seed)
    pred, true = torch.randn(2, 2, 7, 6, generator=g), torch.randn(2, 2, 7, 6, generator=g)
    _, target = _batch(seed, h=7, w=6, pad=0.2)
    focus = (target > 0) & (target != IGNORE_INDEX)
    kh, kv = _naive_kernels()
    num = cnt = 0.0
    for b in range(2):
        for ch, k in ((0, kh), (1, kv)):
            d = _conv_naive(pred[b, ch].double().numpy(), k) - _conv_naive(true[b, ch].double().numpy(), k)
            num += float((d ** 2)[focus[b].numpy()].sum()); cnt += int(focus[b].sum())
    assert float(msge_loss(pred, true, focus)) == pytest.approx(num / cnt if cnt else 0.0, rel=1e-4, abs=1e-5)
    valid = target != IGNORE_INDEX
    mse = float((((pred - true) ** 2) * valid[:, None]).sum() / (2 * valid.sum())) if valid.any() else 0.0
    assert float(mse_loss(pred, true, target)) == pytest.approx(mse, rel=1e-5)

def test_msge_direction():
    "∂h/∂x and ∂v/∂y, not the cross directions: a horizontal map that varies only along y has zero inner gradient."
    y = torch.arange(9.)[:, None].expand(9, 9)
    g = hv_gradients(torch.stack([y, y.T])[None])
    assert torch.allclose(g[0, :, 2:-2, 2:-2], torch.zeros(2, 5, 5), atol=1e-5)
    g = hv_gradients(torch.stack([y.T, y])[None])
    assert (g[0, :, 2:-2, 2:-2] > 0).all()

def test_padding_is_ignored():
    logits, target = _batch(1, pad=0.4)
    pad = (target == IGNORE_INDEX)[:, None].expand_as(logits)
    other = torch.where(pad, torch.randn_like(logits) * 10, logits)
    for fn in (ce_loss, dice_loss, focal_tversky_loss):
        assert float(fn(logits, target)) == pytest.approx(float(fn(other, target)), abs=1e-6)
    hv, hv2 = torch.randn(2, 2, 5, 6), torch.zeros(2, 2, 5, 6)
    assert float(mse_loss(torch.where(pad[:, :2], 99., hv), hv2, target)) == pytest.approx(float(mse_loss(hv, hv2, target)))

EDGE_TARGETS = {'no nuclei': torch.zeros(2, 8, 8, dtype=torch.long),
                'all padding': torch.full((2, 8, 8), IGNORE_INDEX),
                'one class': torch.full((2, 8, 8), 3),
                'nuclei but rare classes absent': torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))}

@pytest.mark.parametrize('name', list(EDGE_TARGETS))
def test_no_nan_or_inf(name):
    target = EDGE_TARGETS[name]
    inst = torch.where((target > 0) & (target != IGNORE_INDEX), 1, 0)
    hv = torch.from_numpy(np.stack([hv_map(i.numpy()) for i in inst]))
    weight = class_weights(np.array([76.7, 8.4, 10.3, 1.9, 1.1, 0.4, 0.6, 0.5, 0.1, 0.007]))
    for scale in (1.0, 1e3):   # ordinary and saturated logits
        types = (torch.randn(2, 10, 8, 8) * scale).requires_grad_(True)
        binary = (torch.randn(2, 2, 8, 8) * scale).requires_grad_(True)
        hvp = torch.randn(2, 2, 8, 8).requires_grad_(True)
        bnd = torch.randn(2, 1, 8, 8).requires_grad_(True)
        pred = dict(types=types, binary=binary, hv=hvp, boundary=bnd, types_foreground=bnd)
        losses = [ce_loss(types, target), ce_loss(types, target, weight), dice_loss(types, target),
                  focal_tversky_loss(types, target), mse_loss(hvp, hv, target), msge_loss(hvp, hv, inst > 0),
                  SemanticLoss(class_weight=weight, boundary=0.1, foreground=0.1)(pred, target, inst, hv),
                  InstanceLoss()(pred, target, inst, hv)]
        for l in losses: assert torch.isfinite(l), name
        sum(losses).backward()
        for t in (types, binary, hvp, bnd): assert t.grad is None or torch.isfinite(t.grad).all(), name

def test_perfect_prediction_is_near_zero():
    _, target = _batch(3, pad=0.2)
    perfect = torch.nn.functional.one_hot(torch.where(target == IGNORE_INDEX, 0, target), 4).permute(0, 3, 1, 2).float() * 40
    assert float(dice_loss(perfect, target)) < 1e-3
    assert float(focal_tversky_loss(perfect, target)) < 1e-3
    assert float(ce_loss(perfect, target)) < 1e-6

def test_class_weights():
    w = class_weights([50, 30, 20, 0])
    assert torch.isfinite(w).all() and w[0] < w[1] < w[2] < w[3]
    s = torch.tensor([0.5, 0.3, 0.2, 0.0])
    assert float((w * s).sum()) == pytest.approx(1.0, rel=1e-4)

def test_targets_from_instances():
    inst = torch.zeros(1, 5, 7, dtype=torch.long); inst[0, 1:4, 1:4] = 4; inst[0, 1:4, 4:6] = 9
    mask = torch.where(inst > 0, 2, 0); mask[0, 0, 0] = IGNORE_INDEX
    bt = boundary_target(inst, mask)
    assert bt[0, 2, 2] == 0 and bt[0, 2, 1] == 1 and bt[0, 2, 3] == 1 and bt[0, 2, 4] == 1 and bt[0, 0, 0] == IGNORE_INDEX
    assert binary_target(inst, mask)[0].eq(torch.where(mask[0] == IGNORE_INDEX, IGNORE_INDEX, (inst[0] > 0).long())).all()
    assert float(bce_loss(torch.zeros(1, 1, 5, 7), torch.full((1, 5, 7), IGNORE_INDEX))) == 0.0

def test_combined_weights():
    logits, target = _batch(5, c=10, h=8, w=8)
    pred = dict(types=logits)
    parts = SemanticLoss(ce=1, dice=0, ft=0).parts(pred, target)
    assert float(sum(parts.values())) == pytest.approx(float(ce_loss(logits, target)))
    assert float(SemanticLoss(ft=0.2)(pred, target) - SemanticLoss(ft=0)(pred, target)) == pytest.approx(
        0.2 * float(focal_tversky_loss(logits, target)), rel=1e-5)
