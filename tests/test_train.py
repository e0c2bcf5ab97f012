"Training protocol of `spseg.train` on tiny data: determinism, schedule, best checkpoint, logged metrics, cached tiles."
import math, warnings
import numpy as np, pytest, torch, torch.nn as nn
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
from types import SimpleNamespace
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Metric
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from spseg.data import IGNORE_INDEX, N_CLASSES, TileDataset, list_tissues, sp_stats
from spseg.synthetic import make_cohort
from spseg.metrics import confusion, hv_mse
from spseg.encoders import VirTuesEncoder, CellViTEncoder
from spseg.cache import build_cache, CacheMismatch
from spseg.decoder import decoder_for
from spseg.train import (cosine_restart_lr, CosineRestarts, BestCheckpoint, seg_learner, ConfusionMetric, HVMSE,
                         task_metrics, CachedTiles, DecoderOnStates, EncoderDecoder, cached_dls, evaluate)

torch.set_num_threads(2)


# ---- a tiny model and data in the learner's format: xb = (x,), yb = (mask, inst, hv)
class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, N_CLASSES, 1))
    def forward(self, x): return dict(types=self.net(x))


def toy_dls(n=16, size=16, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    mask = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 1).long()
    items = [(x[i], mask[i], torch.zeros(size, size, dtype=torch.long), torch.zeros(2, size, size)) for i in range(n)]
    dls = DataLoaders(DataLoader(items[:n - 4], bs=bs, shuffle=True), DataLoader(items[n - 4:], bs=bs))
    dls.train.rng.seed(seed)
    for dl in dls.loaders: dl.n_inp = 1
    return dls


def ce(pred, mask, inst, hv): return nn.functional.cross_entropy(pred['types'], mask)


def toy_learner(path, seed=0, **kwargs):
    set_seed(seed, reproducible=True)
    return seg_learner(toy_dls(seed=seed), TinySeg(), ce, path, **kwargs)


def test_determinism(tmp_path):
    runs = []
    for k in range(2):
        learn = toy_learner(tmp_path/f'r{k}')
        learn.fit(3, 1e-2)
        runs.append(([float(l) for l in learn.recorder.losses], learn.recorder.values))
    assert runs[0] == runs[1]
    other = toy_learner(tmp_path/'r2', seed=1)
    other.fit(3, 1e-2)
    assert [float(l) for l in other.recorder.losses] != runs[0][0]


def test_cosine_restart_curve(tmp_path):
    # the function against PyTorch's scheduler, T_mult 1 and 2
    for T_mult in (1, 2):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
        sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=20, T_mult=T_mult, eta_min=1e-6)
        for e in range(70):
            assert math.isclose(cosine_restart_lr(e, 5e-4, 20, 1e-6, T_mult), opt.param_groups[0]['lr'], rel_tol=1e-9)
            opt.step()
            sch.step()
    # the callback in a learner: starts at the base rate, reaches ~eta_min at T0-1, restarts at T0
    learn = toy_learner(tmp_path, T0=3, eta_min=1e-6, patience=100)
    learn.fit(7, 1e-2)
    lrs = learn.cbs.filter(lambda c: isinstance(c, CosineRestarts))[0].lrs
    assert lrs == pytest.approx([cosine_restart_lr(e, 1e-2, 3, 1e-6) for e in range(7)])
    assert lrs[0] == lrs[3] == lrs[6] == pytest.approx(1e-2)
    assert lrs[1] == pytest.approx(1e-6 + (1e-2 - 1e-6) * 0.75)
    assert lrs[2] < lrs[1] < lrs[0]
    # the lr actually used by the optimiser in the last epoch, and the logged column
    assert learn.opt.hypers[-1]['lr'] == pytest.approx(lrs[-1])
    assert [v[-1] for v in learn.recorder.values] == pytest.approx(lrs)


class Scripted(Metric):
    def __init__(self, values): self.values, self.i = values, -1
    def reset(self): self.i += 1
    def accumulate(self, learn): pass
    @property
    def value(self): return self.values[self.i]
    @property
    def name(self): return 'mean_dice'


class Snapshots(Callback):
    order = 55
    def before_fit(self): self.w = []
    def after_epoch(self): self.w.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_early_stopping_restores_best(tmp_path):
    snaps = Snapshots()
    learn = toy_learner(tmp_path, metrics=[Scripted([.2, .6, .4, .5, .3, .1, .1, .1, .1, .1])], patience=3, cbs=[snaps])
    learn.fit(10, 1e-2)
    assert len(learn.recorder.values) == 5          # epochs 0..4: three epochs without beating epoch 1
    assert learn.cbs.filter(lambda c: isinstance(c, BestCheckpoint))[0].best_epoch == 1
    sd = learn.model.state_dict()
    assert all(torch.equal(sd[k], snaps.w[1][k]) for k in sd)
    assert not all(torch.equal(sd[k], snaps.w[4][k]) for k in sd)
    saved = torch.load(tmp_path/'best.pth', weights_only=True)
    assert all(torch.equal(sd[k], saved[k]) for k in sd)
    assert (tmp_path/'history.csv').read_text().count('\n') == 6   # header + 5 epochs
    assert not list(tmp_path.glob('*.tmp'))                          # atomic saves leave no temporary files


def test_evaluate_gives_the_best_logged_score(tmp_path):
    learn = toy_learner(tmp_path, patience=100)
    learn.fit(4, 1e-2)
    scores, cm = evaluate(learn.model, learn.dls.valid)
    col = learn.recorder.metric_names.index('mean_dice') - 1
    assert scores['mean_dice'] == pytest.approx(max(v[col] for v in learn.recorder.values), abs=1e-9)
    assert int(cm.sum()) == 4 * 16 * 16


def test_confusion_metric_accumulates_the_split():
    g = torch.Generator().manual_seed(0)
    ids = lambda: torch.randint(0, N_CLASSES, (2, 5, 5), generator=g)
    batches = [(ids(), ids()) for _ in range(3)]
    batches[1][1][0, :, :2] = IGNORE_INDEX
    m = ConfusionMetric()
    for p, y in batches:
        m.accumulate(SimpleNamespace(pred=dict(types=nn.functional.one_hot(p, N_CLASSES).permute(0, 3, 1, 2).float()),
                                     yb=(y, None, None)))
    whole = confusion(torch.cat([p for p, _ in batches]), torch.cat([y for _, y in batches]))
    assert np.array_equal(m.cm.numpy(), np.asarray(whole)) and int(m.cm.sum()) == 3 * 2 * 25 - 10


def test_hv_mse_metric_is_the_split_mse():
    "HVMSE over batches of tiles equals `spseg.metrics.hv_mse`'s definition over all their valid pixels."
    g = torch.Generator().manual_seed(1)
    pred, true = torch.randn(3, 2, 2, 6, 6, generator=g), torch.randn(3, 2, 2, 6, 6, generator=g)
    masks = torch.zeros(3, 2, 6, 6, dtype=torch.long)
    masks[2, 1] = IGNORE_INDEX
    m = HVMSE()
    m.reset()
    for k in range(3): m.accumulate(SimpleNamespace(pred=dict(hv=pred[k]), yb=(masks[k], None, true[k])))
    valid = (masks != IGNORE_INDEX)[:, :, None].expand_as(true)
    assert m.value == pytest.approx(float(((pred - true) ** 2)[valid].double().mean()), rel=1e-6)
    assert [x.name for x in task_metrics('instance')] == ['binary_dice', 'hv_mse']
    # one tile, against hv_mse of a prediction = the true map of an instance map (zero error)
    inst = np.zeros((6, 6), np.int32)
    inst[1:4, 1:4] = 1
    from spseg.data import hv_map
    assert hv_mse(hv_map(inst), inst) == 0.0


@pytest.fixture(scope='module')
def cache_setup(tmp_path_factory):
    "Two 250-px tissues (padded edge tiles), their stats, and caches of a tiny VirTues and a tiny H&E ViT."
    d = tmp_path_factory.mktemp('cached')
    make_cohort(d/'cohort', n_tissues=2, size=250, seed=5, progress=False)
    paths = list_tissues(d/'cohort')
    stats = sp_stats(d/'cohort', [p.name for p in paths])
    torch.manual_seed(0)
    sp_enc, he_enc = VirTuesEncoder('tiny'), CellViTEncoder('tiny')
    caches = {k: build_cache(d/k, paths, e, stats, bs=9) for k, e in dict(sp=sp_enc, he=he_enc).items()}
    return paths, stats, dict(sp=sp_enc, he=he_enc), caches


@pytest.mark.parametrize('mod', ['sp', 'he'])
def test_cached_tiles_ask_the_encoder(cache_setup, mod):
    paths, stats, encs, caches = cache_setup
    enc = encs[mod]
    ds = CachedTiles(caches[mod], TileDataset(paths, stats), enc)
    x_img, *states = ds[4][:ds.n_inp]
    sp, he, *_ = ds.tiles[4]
    assert torch.equal(x_img, enc.encoder_input(sp=sp[None], he=he[None])[0])
    assert x_img.shape[-1] == 120 * enc.input_scale and [tuple(s.shape) for s in states] == [(64, 15, 15)] * 5
    with torch.no_grad(): ref = enc.states(sp=sp[None], he=he[None])[0]
    assert torch.allclose(states[-1], ref[0], atol=2e-2) and torch.allclose(states[0], ref[1], atol=2e-2)
    model = DecoderOnStates(decoder_for(enc, 'tiny', width=0.125), enc.input_scale).eval()
    with torch.no_grad(): out = model(*[a[None] for a in ds[4][:ds.n_inp]])
    assert all(v.shape[-2:] == (120, 120) for v in out.values())
    sub = ds.take([0, 4])
    assert len(sub) == 2 and all(torch.equal(a, b) for a, b in zip(sub[1], ds[4]))


def test_cached_tiles_refuse_another_encoders_cache(cache_setup):
    paths, stats, encs, caches = cache_setup
    with pytest.raises(CacheMismatch): CachedTiles(caches['sp'], TileDataset(paths, stats), encs['he'])
    with pytest.raises(ValueError, match='tile'):
        CachedTiles(caches['sp'], TileDataset(paths, stats, tile=60), encs['sp'])


def test_encoder_decoder_matches_the_cached_path(cache_setup):
    "Frozen `EncoderDecoder` on raw tiles = `DecoderOnStates` on the cache, for both encoders (fp16 cache tolerance)."
    paths, stats, encs, caches = cache_setup
    for mod, enc in encs.items():
        dec = decoder_for(enc, 'tiny', width=0.125).eval()
        raw = TileDataset(paths[:1], stats)
        cached = CachedTiles(caches[mod], raw, enc)
        sp, he = [torch.stack(t) for t in zip(*[raw[i][:2] for i in range(3)])]
        xs = [torch.stack(t) for t in zip(*[cached[i][:cached.n_inp] for i in range(3)])]
        with torch.no_grad():
            a = EncoderDecoder(enc, dec).eval()(sp, he)
            b = DecoderOnStates(dec, enc.input_scale)(*xs)
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=5e-2) for k in a)


def test_cached_dls_weighted_and_shuffled(cache_setup):
    paths, stats, encs, caches = cache_setup
    ds = CachedTiles(caches['sp'], TileDataset(paths, stats), encs['sp'], preload=True)
    for gamma in (None, 0.85):
        dls = cached_dls(ds, ds.take(range(4)), bs=3, gamma=gamma, seed=2)
        b = dls.one_batch()
        assert len(b) == 9 and dls.train.n_inp == 6 and b[0].shape == (3, 16, 120, 120)


# ---- resuming: `ResumeState` saves after every epoch; a new learner given its file continues the fit exactly
class Crash(Exception): pass


class CrashAt(Callback):
    "Raise `Crash` at training batch `it` of epoch `epoch`, as a crash would end the process."
    def __init__(self, epoch, it=0): self.at = (epoch, it)
    def after_batch(self):
        if self.training and (self.epoch, self.iter) == self.at: raise Crash('crash')


class Jitter(Callback):
    "Noise on the inputs from the callback's own generator (as `PairedAugment` draws its elements)."
    def __init__(self, seed=0): self.generator = torch.Generator().manual_seed(seed)
    def before_batch(self):
        x = self.learn.xb[0]
        self.learn.xb = (x + 0.5 * torch.randn(x.shape, generator=self.generator),)


class ByEpoch(Metric):
    "A scripted 'Dice' indexed by the epoch (a metric that holds no state across epochs)."
    def __init__(self, values): self.values, self.epoch = values, 0
    def reset(self): pass
    def accumulate(self, learn): self.epoch = learn.epoch
    @property
    def value(self): return self.values[self.epoch]
    @property
    def name(self): return 'mean_dice'


class Epochs(Callback):
    "The epochs a fit enters."
    def before_fit(self): self.seen = []
    def before_epoch(self): self.seen.append(self.epoch)


def _fit_state(learn):
    hist = (learn.path/'history.csv').read_text().splitlines()
    return (learn.recorder.values, [float(l) for l in learn.recorder.losses], [h.rsplit(',', 1)[0] for h in hist],
            learn.cbs.filter(lambda c: isinstance(c, BestCheckpoint))[0].best_epoch)


@pytest.mark.parametrize('crash_epoch', [1, 3])
def test_resume_equals_the_uninterrupted_fit(tmp_path, crash_epoch):
    kw = dict(resume='resume.pth', patience=100)
    whole = toy_learner(tmp_path/'whole', cbs=[Jitter()], **kw)
    whole.fit(5, 1e-2)
    with pytest.raises(Crash): toy_learner(tmp_path/'run', cbs=[Jitter(), CrashAt(crash_epoch, 1)], **kw).fit(5, 1e-2)
    assert torch.load(tmp_path/'run'/'resume.pth', weights_only=False)['epochs_done'] == crash_epoch
    seen = Epochs()
    # another seed for the jitter and for the loader's order: the saved states replace both
    resumed = toy_learner(tmp_path/'run', cbs=[Jitter(seed=1), seen], **kw)
    resumed.dls.train.rng.seed(7)
    resumed.fit(5, 1e-2)
    assert seen.seen == list(range(crash_epoch, 5))
    assert _fit_state(resumed) == _fit_state(whole)
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_early_stopping_and_the_best_epoch(tmp_path):
    dice = [.2, .6, .4, .5, .3, .1, .1, .1, .1, .1]       # best at 1; patience 3 stops after epoch 4
    kw = dict(resume='resume.pth', patience=3)
    whole = toy_learner(tmp_path/'whole', metrics=[ByEpoch(dice)], **kw)
    whole.fit(10, 1e-2)
    with pytest.raises(Crash):
        toy_learner(tmp_path/'run', metrics=[ByEpoch(dice)], cbs=[CrashAt(3)], **kw).fit(10, 1e-2)
    seen = Epochs()
    resumed = toy_learner(tmp_path/'run', metrics=[ByEpoch(dice)], cbs=[seen], **kw)
    resumed.fit(10, 1e-2)
    assert seen.seen == [3, 4] and len(resumed.recorder.values) == 5
    assert _fit_state(resumed) == _fit_state(whole) and _fit_state(whole)[-1] == 1
    a, b = resumed.model.state_dict(), whole.model.state_dict()      # the best epoch's weights, loaded back
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the state of a fit that ended early says 4 epochs: the stopping epoch is not saved, a rerun repeats it
    assert torch.load(tmp_path/'run'/'resume.pth', weights_only=False)['epochs_done'] == 4
    again = toy_learner(tmp_path/'run', metrics=[ByEpoch(dice)], **kw)
    again.fit(10, 1e-2)
    assert _fit_state(again) == _fit_state(whole)


def test_resume_state_of_a_finished_fit_runs_no_epoch(tmp_path):
    learn = toy_learner(tmp_path, resume='resume.pth', patience=100)
    learn.fit(3, 1e-2)
    before = _fit_state(learn)
    learn.validate()                                    # the epoch events of a validation save nothing
    assert torch.load(tmp_path/'resume.pth', weights_only=False)['epochs_done'] == 3
    seen = Epochs()
    again = toy_learner(tmp_path, resume='resume.pth', patience=100, cbs=[seen])
    again.fit(3, 1e-2)
    assert seen.seen == [] and _fit_state(again) == before
    a, b = again.model.state_dict(), learn.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob('.*'))               # no temporary file left by the per-epoch saves


def test_resume_state_needs_a_seg_learner(tmp_path):
    from fastai.learner import Learner
    from spseg.train import ResumeState
    learn = Learner(toy_dls(), TinySeg(), ce, path=tmp_path, cbs=[ResumeState(tmp_path/'r.pth')])
    with pytest.raises(TypeError, match='SegLearner'): learn.fit(1)
