"Augmentation: HV maps stay consistent under all 8 dihedral elements, maps move together, dropout/jitter rates."
import warnings; warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st
from spseg.data import IGNORE_INDEX, hv_map, instances_from_mask
from spseg.augment import (DIHEDRAL, dihedral, dihedral_hv, dihedral_batch, random_elements, augment_batch,
                           channel_dropout, jitter_he_batch, dihedral_embeddings, PairedAugment, augment_embedding_xy)

def _instances(seed, size=24, n=6):
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int64)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, n + 1):
        cy, cx = rng.uniform(-2, size + 2, 2); ry, rx = rng.uniform(1.5, 6, 2)
        inst[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i
    return inst

@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.sampled_from([8, 15, 24]))
def test_hv_consistent_for_all_elements(seed, size):
    inst = _instances(seed, size)
    hv = torch.from_numpy(hv_map(inst))
    for k, flip in DIHEDRAL:
        moved = dihedral(torch.from_numpy(inst), k, flip).numpy()
        assert torch.allclose(dihedral_hv(hv, k, flip), torch.from_numpy(hv_map(moved)), atol=1e-5), (k, flip)

def test_group_structure():
    x = torch.arange(16).reshape(4, 4)
    outs = {tuple(dihedral(x, k, f).flatten().tolist()) for k, f in DIHEDRAL}
    assert len(outs) == 8
    assert torch.equal(dihedral(x, 0, True), x.flip(-1)) and torch.equal(dihedral(x, 2, True), x.flip(-2))
    assert torch.equal(dihedral(dihedral(x, 1, False), 3, False), x)
    hv = torch.randn(2, 5, 5)
    for k, f in DIHEDRAL:   # applying an element twice: flips are involutions, rotations compose
        twice = dihedral_hv(dihedral_hv(hv, k, f), k, f)
        assert torch.allclose(twice, hv if f or k in (0,) else dihedral_hv(hv, 2 * k % 4, False))

def _batch(B=6, size=24, seed=0):
    inst = torch.stack([torch.from_numpy(_instances(seed + b, size)) for b in range(B)])
    mask = torch.where(inst > 0, (inst % 9) + 1, 0); mask[:, -3:, :] = IGNORE_INDEX
    hv = torch.stack([torch.from_numpy(hv_map(i.numpy())) for i in inst])
    sp = torch.randn(B, 16, size, size); sp[:, 0] = inst.float(); sp[:, 1] = mask.float()
    he = torch.rand(B, 3, size, size) * 2 - 1; he[:, 0] = inst.float() / 10 - 0.5
    return sp, he, mask, inst, hv

def test_maps_move_together():
    sp, he, mask, inst, hv = augment_batch(*_batch(), generator=torch.Generator().manual_seed(0), p_jitter=0, p_drop=0)
    assert torch.equal(sp[:, 0], inst.float()) and torch.equal(sp[:, 1], mask.float())
    assert torch.allclose(he[:, 0], inst.float() / 10 - 0.5)
    assert ((mask == IGNORE_INDEX).sum((1, 2)) == 3 * 24).all()
    for b in range(6):
        assert torch.allclose(hv[b], torch.from_numpy(hv_map(inst[b].numpy())), atol=1e-5)

def test_augment_is_seeded_and_random():
    b = _batch()
    a1 = augment_batch(*b, generator=torch.Generator().manual_seed(7))
    a2 = augment_batch(*b, generator=torch.Generator().manual_seed(7))
    a3 = augment_batch(*b, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert not all(torch.equal(x, y) for x, y in zip(a1, a3))

def test_elements_uniform():
    els = random_elements(8000, torch.Generator().manual_seed(0))
    counts = np.array([els.count(e) for e in DIHEDRAL])
    assert np.all(np.abs(counts - 1000) < 5 * np.sqrt(8000 * 1 / 8 * 7 / 8))

def test_channel_dropout_rate():
    sp = torch.randn(1000, 16, 2, 2) + 5
    out, dropped = channel_dropout(sp, p=0.1, generator=torch.Generator().manual_seed(0))
    n = dropped.numel()
    rate = dropped.float().mean().item()
    assert abs(rate - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)          # within 4 standard errors
    per_channel = dropped.float().mean(0)
    assert (per_channel - 0.1).abs().max() < 4 * np.sqrt(0.1 * 0.9 / 1000)
    assert torch.equal((out == 0).all(-1).all(-1), dropped)
    assert torch.equal(out[~dropped], sp[~dropped])

def test_jitter_probability_and_padding():
    he = torch.rand(400, 3, 4, 4) * 2 - 1
    mask = torch.zeros(400, 4, 4, dtype=torch.long); mask[:, 0, :] = IGNORE_INDEX
    out = jitter_he_batch(he, mask, p=0.5, generator=torch.Generator().manual_seed(0))
    rate = (out != he).flatten(1).any(1).float().mean().item()
    assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / 400)
    assert torch.equal(out[:, :, 0, :], he[:, :, 0, :])
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5

def test_embeddings_path():
    sp, he, mask, inst, hv = _batch(B=4, size=24)
    tokens = torch.nn.functional.avg_pool2d(inst.float()[:, None], 8)            # (4, 1, 3, 3)
    z, x, m, i, h = dihedral_embeddings([tokens, tokens + 1], sp, mask, inst, hv, torch.Generator().manual_seed(1))
    assert torch.allclose(z[0], torch.nn.functional.avg_pool2d(i.float()[:, None], 8))
    assert torch.equal(z[1], z[0] + 1) and torch.equal(x[:, 0], i.float())
    for b in range(4): assert torch.allclose(h[b], torch.from_numpy(hv_map(i[b].numpy())), atol=1e-5)
    z, x, *_ = dihedral_embeddings([tokens], None, mask, inst, hv)
    assert x is None

def test_non_square_refused():
    with pytest.raises(ValueError, match='square'):
        dihedral_batch([(1, False)], [torch.zeros(1, 4, 6)])
    out, _ = dihedral_batch([(2, True)], [torch.arange(24.).reshape(1, 4, 6)])   # half turns are fine
    assert out[0].shape == (1, 4, 6)

def test_callback():
    from types import SimpleNamespace
    sp, he, mask, inst, hv = _batch(B=3)
    cb = PairedAugment(seed=0, p_drop=0.0, p_jitter=0.0)
    cb.learn = SimpleNamespace(xb=(sp, he), yb=(mask, inst, hv))
    cb.before_batch()
    (sp2, he2), (m2, i2, h2) = cb.learn.xb, cb.learn.yb
    assert torch.equal(sp2[:, 0], i2.float())
    assert PairedAugment.run_valid is False
    tokens = torch.zeros(3, 4, 3, 3)
    cb2 = PairedAugment(fn=augment_embedding_xy, seed=0)
    cb2.learn = SimpleNamespace(xb=(sp, tokens, tokens), yb=(mask, inst, hv))
    cb2.before_batch()
    assert len(cb2.learn.xb) == 3 and cb2.learn.xb[1].shape == (3, 4, 3, 3)
