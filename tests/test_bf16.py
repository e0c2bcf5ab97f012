"bf16 or float32: forced or chosen (faster and faithful only), recorded in the cache manifest, faithful to float32."
import json, warnings
import numpy as np, pytest, torch, torch.nn as nn
import spseg.cache, spseg.core
from spseg.core import BF16_MIN_COSINE, Precision, bf16_cosine, bf16_speedup, choose_precision
from spseg.cache import CACHE_FORMAT, CacheMismatch, build_cache, cache_manifest, embedding_precision
from spseg.data import list_tissues, load_tissue, sp_stats
from spseg.encoders import CellViTEncoder, VirTuesEncoder
from spseg.inference import model_precision, predict_tissue
from spseg.synthetic import make_cohort

@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp('bf16')/'cohort'
    make_cohort(root, n_tissues=2, size=240, seed=0, progress=False)
    paths = list_tissues(root)
    return paths, sp_stats(root, [paths[0].name])

@pytest.fixture
def fresh(monkeypatch):
    "A process with no choice made yet: `_PRECISIONS` emptied for the test."
    monkeypatch.setattr(spseg.cache, '_PRECISIONS', {})

def _fake_speed(monkeypatch, s):
    "Make this machine's bf16 matmuls `s` times as fast as float32, as far as `choose_precision` can tell."
    monkeypatch.setattr(spseg.core, 'bf16_speedup', lambda device='cpu': s)

def _enc(seed=0):
    torch.manual_seed(seed)
    return VirTuesEncoder('tiny', esm=torch.zeros(16, 640))

class Coarse(VirTuesEncoder):
    "An encoder whose bf16 path is unfaithful: under autocast its states are rounded to whole numbers."
    def states(self, sp=None, he=None):
        s = super().states(sp=sp, he=he)
        return s.round() if torch.is_autocast_enabled('cpu') else s

def _never(*a, **k): raise AssertionError('measured although forced')

# ---- the choice ----

def test_forced_choices_measure_nothing(monkeypatch, fresh):
    monkeypatch.setattr(spseg.core, 'bf16_speedup', _never)
    assert choose_precision(True) == Precision(True, 'forced') and choose_precision(False).dtype == 'float32'
    assert embedding_precision(_enc(), amp=False).dtype == 'float32'
    assert embedding_precision(_enc(), amp=True).dtype == 'bfloat16'
    assert cache_manifest(CellViTEncoder('tiny'), amp=True)['compute'] == 'bfloat16'

def test_slow_bf16_stays_float32_without_checking(monkeypatch, fresh):
    _fake_speed(monkeypatch, 0.01)                                   # an emulating CPU: bf16 ~100x slower
    p = choose_precision(None, cosine=_never)
    assert (p.dtype, p.speedup, p.cosine) == ('float32', 0.01, None)
    assert embedding_precision(_enc()).dtype == 'float32'

def test_fast_but_unfaithful_bf16_falls_back_to_float32(monkeypatch, fresh, capsys):
    _fake_speed(monkeypatch, 3.0)
    enc = Coarse('tiny', esm=torch.zeros(16, 640))
    p = embedding_precision(enc)
    assert p.dtype == 'float32' and p.cosine < BF16_MIN_COSINE
    assert 'Coarse on cpu runs in float32' in capsys.readouterr().err    # the choice is printed, once
    assert embedding_precision(enc) is p and capsys.readouterr().err == ''
    assert choose_precision(None, cosine=lambda: 0.99).dtype == 'float32'

def test_fast_and_faithful_bf16_is_taken(monkeypatch, fresh):
    _fake_speed(monkeypatch, 3.0)
    for enc in (_enc(), CellViTEncoder('tiny')):
        p = embedding_precision(enc)
        assert p.dtype == 'bfloat16' and p.cosine >= BF16_MIN_COSINE, p

def test_choice_is_remembered_per_weights(monkeypatch, fresh):
    a, b, c = _enc(0), _enc(0), _enc(1)
    assert embedding_precision(a) is embedding_precision(b)           # equal weights: one decision
    calls = []
    monkeypatch.setattr(spseg.cache, '_states_cosine', lambda *x: calls.append(1) or 1.0)
    _fake_speed(monkeypatch, 3.0)
    embedding_precision(c)
    embedding_precision(c)
    assert calls == [1]

def test_speedup_is_measured_once_per_process():
    assert bf16_speedup() is bf16_speedup('cpu') and bf16_speedup() > 0

def test_bf16_cosine_sees_an_unfaithful_path():
    x = torch.randn(3, 8, 32)
    lin = nn.Linear(32, 32)
    assert bf16_cosine(lambda: lin(x), dim=-1) >= BF16_MIN_COSINE
    flip = lambda: -lin(x) if torch.is_autocast_enabled('cpu') else lin(x)
    assert bf16_cosine(flip, dim=-1) == pytest.approx(-1, abs=1e-3)

# ---- the cache ----

@pytest.mark.parametrize('make', [_enc, lambda: CellViTEncoder('tiny')], ids=['virtues', 'cellvit'])
def test_bf16_cache_agrees_with_float32_cache(tmp_path, cohort, make):
    paths, st = cohort
    enc = make()
    f32 = build_cache(tmp_path/'f32', paths, enc, st, bs=4, amp=False)
    b16 = build_cache(tmp_path/'b16', paths, enc, st, bs=4, amp=True)
    assert (f32.manifest['compute'], b16.manifest['compute']) == ('float32', 'bfloat16')
    assert [k for k in f32.manifest if f32.manifest[k] != b16.manifest[k]] == ['compute']
    a, b = (torch.from_numpy(np.stack([c.tissue(p.name) for p in paths]).astype(np.float32)) for c in (f32, b16))
    cos = torch.nn.functional.cosine_similarity(a, b, dim=3)         # (tissues, tiles, states, h, w): every token
    assert cos.min() >= BF16_MIN_COSINE
    assert not torch.equal(a, b)                                     # bf16 did run

def test_auto_choice_lands_in_manifest(tmp_path, cohort, monkeypatch, fresh):
    paths, st = cohort
    _fake_speed(monkeypatch, 3.0)
    c = build_cache(tmp_path/'c', paths[:1], _enc(), st, bs=4)
    assert c.manifest['compute'] == 'bfloat16'
    assert json.loads((tmp_path/'c'/'manifest.json').read_text())['compute'] == 'bfloat16'

def test_cache_of_another_precision_is_never_extended(tmp_path, cohort):
    paths, st = cohort
    build_cache(tmp_path/'c', paths[:1], _enc(), st, bs=4, amp=False)
    with pytest.raises(CacheMismatch, match='compute'):
        build_cache(tmp_path/'c', paths, _enc(), st, bs=4, amp=True, on_mismatch='raise')
    with pytest.warns(UserWarning, match='compute'):
        c = build_cache(tmp_path/'c', paths, _enc(), st, bs=4, amp=True)
    assert c.manifest['compute'] == 'bfloat16' and c.ids == [p.name for p in paths]

def test_old_format_cache_is_rebuilt(tmp_path, cohort):
    "A format-2 cache (no `compute`: CPU builds ran float32, GPU builds bf16) cannot be trusted: it is rebuilt."
    paths, st = cohort
    c = build_cache(tmp_path/'c', paths[:1], _enc(), st, bs=4, amp=False)
    old = {k: v for k, v in c.manifest.items() if k != 'compute'} | dict(format=2)
    (tmp_path/'c'/'manifest.json').write_text(json.dumps(old))
    assert CACHE_FORMAT == 3
    with pytest.raises(CacheMismatch, match='compute, format'):
        build_cache(tmp_path/'c', paths[:1], _enc(), st, bs=4, amp=False, on_mismatch='raise')
    with pytest.warns(UserWarning, match='rebuilding'):
        c = build_cache(tmp_path/'c', paths[:1], _enc(), st, bs=4, amp=False)
    assert c.manifest == cache_manifest(_enc(), st, amp=False) and c.ids == [paths[0].name]

# ---- inference ----

class Recorder(nn.Module):
    "A model with an encoder that records whether its forward ran under autocast, and predicts nothing."
    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.seen = encoder, []
    def forward(self, sp, he):
        self.seen.append(torch.is_autocast_enabled('cpu'))
        return dict(types=torch.zeros(sp.shape[0], 10, *sp.shape[2:]))

def test_inference_runs_in_the_chosen_precision(cohort, monkeypatch, fresh):
    paths, st = cohort
    t = load_tissue(paths[0])
    for speed, amp, want in [(0.5, None, False), (3.0, None, True), (3.0, False, False), (0.5, True, True)]:
        _fake_speed(monkeypatch, speed)
        monkeypatch.setattr(spseg.cache, '_PRECISIONS', {})
        m = Recorder(_enc())
        predict_tissue(m, t, st, bs=4, amp=amp)
        assert m.seen and set(m.seen) == {want}, (speed, amp)

def test_model_without_encoder_stays_float32(monkeypatch):
    _fake_speed(monkeypatch, 3.0)
    assert model_precision(nn.Conv2d(3, 3, 1)).dtype == 'float32'
    assert model_precision(nn.Conv2d(3, 3, 1), amp=True).dtype == 'bfloat16'


def test_measuring_leaves_the_global_rng_alone():
    "Timing the matmuls draws from its own generator: a seeded run draws the same numbers with or without it."
    import torch
    from spseg.core import matmul_gflops
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    matmul_gflops(64, reps=1)
    assert torch.equal(torch.rand(3), want)
