"Run configs, results folders and grids of `spseg.experiments` on a tiny synthetic cohort."
import json, math, shutil, warnings
import numpy as np, pytest, torch
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
from spseg.data import IGNORE_INDEX, N_CLASSES
from spseg.synthetic import make_cohort
from spseg.metrics import per_class_dice
from fastai.callback.core import Callback
from spseg.train import DecoderOnStates, EncoderDecoder
import spseg.experiments as E
from spseg.experiments import (RunConfig, preset_config, make_encoder, make_decoder, make_model, run_experiment,
                               finished_run, study_grid, results_table, majority_baseline, STUDIES, STUDY_RESULTS)

torch.set_num_threads(2)


def test_config_json_roundtrip():
    c = preset_config('tiny', name='x', root='/data/c', gamma=0.45, fold=2, split='quarter', variant='masked')
    back = RunConfig.from_json(c.to_json())
    assert back == c and back.hash == c.hash and len(c.hash) == 12 and c.run_name == f'x-{c.hash}'
    assert RunConfig(seed=1).hash != RunConfig(seed=2).hash
    with pytest.raises(ValueError, match='bogus'): RunConfig.from_json(json.dumps({'bogus': 1}))


def test_study_grids():
    assert len(study_grid('loss', '/c')) == 8 and len(study_grid('augmentation', '/c')) == 6
    assert {c.variant for c in study_grid('decoder', '/c', 'paper')} == {'baseline', 'boundary', 'global', 'masked'}
    p = study_grid('skip', '/c', 'paper')
    assert {(c.epochs, c.bs, c.lr, c.patience) for c in p} == {(30, 128, 5e-4, 30)}
    inst = study_grid('instance', '/c')
    assert [(c.encoder, c.task, c.split, c.fold) for c in inst] == [('cellvit', 'instance', 'sequential', None),
                                                                    ('virtues', 'instance', 'sequential', None)]
    assert set(STUDY_RESULTS) == set(STUDIES)
    assert STUDY_RESULTS['instance'][('cellvit',)] == (0.0566, 0.7170, 0.4178)
    assert STUDY_RESULTS['instance'][('virtues',)] == (0.0743, 0.7156, 0.4827)


def test_majority_baseline():
    target = torch.tensor([[0, 0, 1, 1, 1, 4, IGNORE_INDEX, IGNORE_INDEX]])
    b = majority_baseline([80, 20] + [0] * 8, target)
    assert int(b.sum()) == 6 and int(b[:, 0].sum()) == 6        # background everywhere, padding left out
    assert per_class_dice(b)[0] == pytest.approx(2 * 2 / (2 * 2 + 4))


def test_model_follows_the_encoder():
    "The decoder's width, channels and patch, and the score scale, come from the encoder; fine-tuning wraps both."
    for name, want in dict(virtues=(16, 8, 1), cellvit=(3, 16, 2)).items():
        cfg = preset_config('tiny', encoder=name)
        enc = make_encoder(cfg)
        dec = make_decoder(cfg, enc)
        assert (dec.embed_dim, dec.in_chans, dec.patch_size) == (enc.embed_dim, *want[:2])
        model = make_model(cfg, enc)
        assert isinstance(model, DecoderOnStates) and model.score_scale == want[2]
        assert isinstance(make_model(preset_config('tiny', encoder=name, finetune_encoder=True), enc), EncoderDecoder)
    assert set(make_decoder(preset_config('tiny', variant='boundary'), enc).heads) == {'types', 'boundary'}
    with pytest.raises(ValueError, match='uni'): make_encoder(preset_config('tiny', encoder='uni'))


def test_results_table_instance():
    cfgs = study_grid('instance', '/c')
    res = [dict(hv_mse=0.07, binary_dice=0.8, best_valid_loss=5.0),
           dict(hv_mse=0.06, binary_dice=0.7, best_valid_loss=6.0)]
    t = results_table('instance', list(zip(cfgs, res))).set_index('encoder')
    assert list(t.index) == ['cellvit', 'virtues']
    assert t.loc['virtues', 'Avg HV MSE'] == 0.06 and t.loc['cellvit', 'study Dice'] == 0.7170
    assert t.loc['virtues', 'study best loss'] == 0.4827


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
    assert math.isfinite(m['best_valid_loss']) and m['best_valid_loss'] > 0
    assert not list((tmp_path/'runs').glob('.*.partial'))
    # resume: a finished run is read back, not trained again
    monkeypatch.setattr(E, '_fit', lambda *a, **k: pytest.fail('a finished run was recomputed'))
    assert run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches') == res
    assert finished_run(cfg, tmp_path/'runs') == res
    assert finished_run(RunConfig(**{**cfg.__dict__, 'seed': 9}), tmp_path/'runs') is None
    tab = results_table('skip', [(cfg, res)])
    assert tab.loc[0, 'study'] == '0.4787 ± 0.0492'


def test_interrupted_run_is_redone(cohort, tmp_path):
    cfg = preset_config('tiny', name='int', root=str(cohort), epochs=1)
    partial = tmp_path/'runs'/f'.{cfg.run_name}.partial'
    partial.mkdir(parents=True)
    (partial/'junk').write_text('x')
    run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches')
    assert not partial.exists() and (tmp_path/'runs'/cfg.run_name/'metrics.json').is_file()


class Crash(Exception): pass


class CrashAt(Callback):
    "Raise `Crash` at the first training batch of epoch `epoch`."
    def __init__(self, epoch): self.epoch_ = epoch
    def after_batch(self):
        if self.training and self.iter == 0 and self.epoch == self.epoch_: raise Crash('crash')


class Epochs(Callback):
    "The epochs the fits of the learners built while it is installed enter."
    seen = []
    def before_epoch(self): Epochs.seen.append(self.epoch)


def _with_cbs(monkeypatch, *cbs):
    "Make `run_experiment`'s learners carry the extra callbacks `cbs`."
    learner = E.seg_learner
    def with_cbs(*a, **k): return learner(*a, **{**k, 'cbs': list(k.get('cbs') or []) + list(cbs)})
    monkeypatch.setattr(E, 'seg_learner', with_cbs)


def test_partial_run_of_the_same_config_is_resumed(cohort, tmp_path, monkeypatch):
    cfg = preset_config('tiny', name='res', root=str(cohort), epochs=2, patience=2, gamma=0.45, augment=True)
    whole = run_experiment(cfg, tmp_path/'a', cache_dir=tmp_path/'caches')
    with monkeypatch.context() as m:
        _with_cbs(m, CrashAt(1))
        with pytest.raises(Crash): run_experiment(cfg, tmp_path/'b', cache_dir=tmp_path/'caches')
    partial = tmp_path/'b'/f'.{cfg.run_name}.partial'
    assert torch.load(partial/E.RESUME_FILE, weights_only=False)['epochs_done'] == 1
    Epochs.seen = []
    _with_cbs(monkeypatch, Epochs())
    res = run_experiment(cfg, tmp_path/'b', cache_dir=tmp_path/'caches')
    assert Epochs.seen == [1]                                     # resumed, not started over
    assert {k: v for k, v in res.items() if k != 'seconds'} == {k: v for k, v in whole.items() if k != 'seconds'}
    assert not partial.exists() and not (tmp_path/'b'/cfg.run_name/E.RESUME_FILE).exists()
    # a .partial folder of another config (here: the same name and hash folder, another seed) is started over
    other = tmp_path/'c'/f'.{cfg.run_name}.partial'
    shutil.copytree(tmp_path/'b'/cfg.run_name, other)
    (other/'config.json').write_text(RunConfig(**{**cfg.__dict__, 'seed': 9}).to_json())
    (other/'junk').write_text('x')
    Epochs.seen = []
    assert run_experiment(cfg, tmp_path/'c', cache_dir=tmp_path/'caches')['mean_dice'] == whole['mean_dice']
    assert Epochs.seen == [0, 1] and not (tmp_path/'c'/cfg.run_name/'junk').exists()


@pytest.mark.parametrize('kw', [dict(task='instance'), dict(encoder='cellvit'),
                                dict(finetune_encoder=True, augment=True),
                                dict(variant='masked', gamma=0.45, augment=True)])
def test_run_variants(cohort, tmp_path, kw):
    cfg = preset_config('tiny', name='v', root=str(cohort), epochs=1, **kw)
    res = run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches')
    assert (tmp_path/'runs'/cfg.run_name/'metrics.json').is_file()
    if kw.get('task') == 'instance':
        assert {'binary_dice', 'hv_mse'} <= set(res) and res['hv_mse'] >= 0
        assert res['monitor']['name'] == 'valid_loss'
        assert res['monitor']['best'] == pytest.approx(res['best_valid_loss'])
    else:
        assert 0 <= res['mean_dice'] <= 1 and res['monitor']['name'] == 'mean_dice'


def test_augmented_run_keeps_the_encoder_frozen_and_uses_all_three_augmentations(cohort, tmp_path, monkeypatch):
    "Table 5's augmentation: raw tiles through the frozen encoder, with flips/rotations, H&E jitter and channel dropout."
    import spseg.augment as A
    calls = dict(dihedral=0, jitter=0, dropout=0)
    def counting(name, fn):
        def f(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return f
    for name, attr in dict(dihedral='dihedral_batch', jitter='jitter_he_batch', dropout='channel_dropout').items():
        monkeypatch.setattr(A, attr, counting(name, getattr(A, attr)))
    cfg = preset_config('tiny', name='aug', root=str(cohort), epochs=1, augment=True)
    enc = make_encoder(cfg)
    model = make_model(cfg, enc)
    assert isinstance(model, EncoderDecoder) and model.freeze_encoder
    assert not any(p.requires_grad for p in model.encoder.parameters())
    run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches')
    n_batches = 1                                           # 4 training tiles, batch size 4
    assert calls == dict(dihedral=n_batches, jitter=n_batches, dropout=n_batches)
    best = torch.load(tmp_path/'runs'/cfg.run_name/'best.pth', weights_only=True)
    for k, v in enc.state_dict().items(): assert torch.equal(best[f'encoder.{k}'], v), k   # the encoder did not move
    assert not (tmp_path/'caches').exists()                 # no cache: states are computed on the augmented tiles


def test_large_splits_are_read_lazily(cohort, tmp_path):
    "Above the preload budget `run_data` keeps no items in memory and serves the same items from the files."
    cfg = preset_config('tiny', name='lazy', root=str(cohort), split='holdout')
    enc = make_encoder(cfg)
    eager, *_ = E.run_data(cfg, tmp_path/'c', enc)
    lazy, *_ = E.run_data(cfg, tmp_path/'c', enc, preload_bytes=0)
    assert eager.items is not None and lazy.items is None and len(lazy) == len(eager)
    for i in range(len(eager)):
        for a, b in zip(lazy[i], eager[i]): assert torch.equal(a, b)
