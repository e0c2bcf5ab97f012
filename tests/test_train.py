"Training protocol, scoring, configs and runs of `spseg.train` on tiny synthetic data."
import json, math, warnings
import numpy as np, pytest, torch, torch.nn as nn
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, Metric
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from spseg.data import IGNORE_INDEX, N_CLASSES
from spseg.synthetic import make_cohort
from spseg.train import (confusion, per_class_dice, pixel_shares, mean_dice, class_table, cosine_restart_lr, CosineRestarts,
                         BestCheckpoint, seg_learner, RunConfig, preset_config, run_experiment, finished_run, study_grid,
                         results_table, majority_baseline)

torch.set_num_threads(2)

# ---- a tiny model and data in the learner's format: xb = (x,), yb = (mask, inst, hv)
class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, N_CLASSES, 1))
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
    dls = toy_dls(seed=seed)
    return seg_learner(dls, TinySeg(), ce, path, **kwargs)


def test_determinism(tmp_path):
    runs = []
    for k in range(2):
        learn = toy_learner(tmp_path/f'r{k}')
        learn.fit(3, 1e-2)
        runs.append(([float(l) for l in learn.recorder.losses], learn.recorder.values))
    assert runs[0] == runs[1]
    other = toy_learner(tmp_path/'r2', seed=1); other.fit(3, 1e-2)
    assert [float(l) for l in other.recorder.losses] != runs[0][0]


def test_cosine_restart_curve(tmp_path):
    # the function against PyTorch's scheduler, T_mult 1 and 2
    for T_mult in (1, 2):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
        sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=20, T_mult=T_mult, eta_min=1e-6)
        for e in range(70):
            assert math.isclose(cosine_restart_lr(e, 5e-4, 20, 1e-6, T_mult), opt.param_groups[0]['lr'], rel_tol=1e-9)
            opt.step(); sch.step()
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


def test_metrics_hand_made():
    #            class 0: 2 true, class 1: 3 true, class 4: 1 true; 3 padding pixels predicted as class 7
    target = torch.tensor([[0, 0, 1, 1, 1, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2, 7, 7, 7]])
    cm = confusion(pred, target)
    assert cm.sum() == 6 and cm[:, 7].sum() == 0
    d = per_class_dice(cm)
    # class 0: TP 1, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 1 -> 2/3; class 2: FP 1 -> 0; class 4: FN 1 -> 0
    np.testing.assert_allclose(d[[0, 1, 2, 4]], [0.5, 2 / 3, 0, 0])
    assert np.isnan(d[[3, 5, 6, 7, 8, 9]]).all()               # absent from both: left out
    assert mean_dice(cm) == pytest.approx((0.5 + 2 / 3) / 4)
    gt, pr = pixel_shares(cm)
    np.testing.assert_allclose(gt[[0, 1, 4]], [100 * 2 / 6, 50, 100 / 6]); np.testing.assert_allclose(pr[[0, 1, 2]], [100 * 2 / 6, 50, 100 / 6])
    assert gt.sum() == pytest.approx(100) and pr.sum() == pytest.approx(100)
    t = class_table(cm)
    assert list(t.columns) == ['class', 'GT %', 'Pred %', 'Dice'] and t.iloc[-1]['Dice'] == pytest.approx(mean_dice(cm), abs=1e-4)
    # majority baseline: all background
    b = majority_baseline([80, 20] + [0] * 8, target)
    assert per_class_dice(b)[0] == pytest.approx(2 * 2 / (2 * 2 + 4))


def test_all_padding_and_perfect():
    t = torch.full((4, 4), IGNORE_INDEX)
    assert confusion(torch.zeros(4, 4, dtype=torch.long), t).sum() == 0 and math.isnan(mean_dice(confusion(t * 0, t)))
    y = torch.randint(0, N_CLASSES, (3, 8, 8))
    assert mean_dice(confusion(y, y)) == 1.0


def test_config_json_roundtrip():
    c = preset_config('tiny', name='x', root='/data/c', gamma=0.45, fold=2, split='quarter', variant='masked')
    back = RunConfig.from_json(c.to_json())
    assert back == c and back.hash == c.hash
    assert RunConfig(seed=1).hash != RunConfig(seed=2).hash
    with pytest.raises(ValueError, match='bogus'): RunConfig.from_json(json.dumps({'bogus': 1}))


def test_study_grids():
    assert len(study_grid('loss', '/c')) == 8 and len(study_grid('augmentation', '/c')) == 6
    assert {c.variant for c in study_grid('decoder', '/c', 'paper')} == {'baseline', 'boundary', 'global', 'masked'}
    p = study_grid('skip', '/c', 'paper')
    assert {(c.epochs, c.bs, c.lr, c.patience) for c in p} == {(30, 128, 5e-4, 30)}


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp('cohort')
    make_cohort(root, n_tissues=2, size=240, seed=3, progress=False)
    return root


def test_end_to_end_and_resume(cohort, tmp_path, monkeypatch):
    cfg = preset_config('tiny', name='e2e', root=str(cohort), epochs=2, patience=2)
    res = run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches')
    d = tmp_path/'runs'/cfg.run_name
    assert sorted(p.name for p in d.iterdir()) == ['best.pth', 'config.json', 'history.csv', 'metrics.json']
    assert RunConfig.from_json((d/'config.json').read_text()) == cfg
    m = json.loads((d/'metrics.json').read_text())
    assert m == res and m['config_hash'] == cfg.hash and 0 <= m['mean_dice'] <= 1
    assert len(m['per_class']['dice']) == N_CLASSES and sum(m['per_class']['gt_pct']) == pytest.approx(100)
    assert m['epochs_run'] == 2 and m['n_train_tiles'] == 4 and m['n_valid_tiles'] == 4
    assert not list((tmp_path/'runs').glob('.*.partial'))
    # resume: a finished run is read back, not trained again
    import spseg.train as T
    monkeypatch.setattr(T, '_model_and_dls', lambda *a, **k: pytest.fail('a finished run was recomputed'))
    assert run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches') == res
    assert finished_run(cfg, tmp_path/'runs') == res
    assert finished_run(RunConfig(**{**cfg.__dict__, 'seed': 9}), tmp_path/'runs') is None
    tab = results_table('skip', [(cfg, res)])
    assert tab.loc[0, 'study'] == '0.4787 ± 0.0492'


@pytest.mark.parametrize('kw', [dict(task='instance'), dict(encoder='cellvit'), dict(finetune_encoder=True, augment=True),
                                dict(variant='masked', gamma=0.45, augment=True)])
def test_run_variants(cohort, tmp_path, kw):
    cfg = preset_config('tiny', name='v', root=str(cohort), epochs=1, **kw)
    res = run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches')
    assert (tmp_path/'runs'/cfg.run_name/'metrics.json').is_file()
    if kw.get('task') == 'instance': assert {'binary_dice', 'hv_mse'} <= set(res) and res['hv_mse'] >= 0
    else: assert 0 <= res['mean_dice'] <= 1
