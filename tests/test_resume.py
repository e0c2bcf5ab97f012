"""A run SIGKILLed mid-epoch and started again resumes from its last epoch and ends as if it had never been killed.

Each case runs three child processes on one small cohort: the run uninterrupted; the same run killed (SIGKILL, from
inside, at a training batch in the middle of its second epoch: nothing of the run gets to react); and the same call
again, which must resume. The killed run must leave nothing half-written under a final name; the resumed one must run
only the epochs that were not finished, and end with the uninterrupted run's metrics and history (CPU, same seed:
equal within 1e-6; only the times differ)."""
import json, math, subprocess, sys
import pandas as pd, pytest, torch
from spseg.synthetic import make_cohort
from spseg.experiments import RESUME_FILE, RunConfig, preset_config

EPOCHS, KILL_AT = 3, (1, 1)   # epoch 1 (the second), after its training batch 1 (of 3)

# The child: `spseg train` (`spseg.cli.train`) or `run_experiment`, with two test hooks added to the learner's
# callbacks by wrapping `spseg.experiments.seg_learner`: one that SIGKILLs the process at a batch, one that logs
# which epochs the process enters. Nothing in the package knows about them.
CHILD = r'''
import json, os, signal, sys, warnings
warnings.filterwarnings('ignore')
import torch
torch.set_num_threads(1)
from fastai.callback.core import Callback
import spseg.experiments as E
args = json.loads(sys.argv[1])

class KillAt(Callback):
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_batch(self):
        if self.training and (self.epoch, self.iter) == self.at: os.kill(os.getpid(), signal.SIGKILL)

class LogEpochs(Callback):
    def before_epoch(self):
        with open(args['epochs_log'], 'a') as f: f.write(f'{self.epoch}\n')

hooks = [LogEpochs()] + ([KillAt(*args['kill_at'])] if args['kill_at'] else [])
learner = E.seg_learner
E.seg_learner = lambda *a, **k: learner(*a, **{**k, 'cbs': list(k.get('cbs') or []) + hooks})
if args['via'] == 'cli':
    from spseg.cli import train
    train(args['cohort'], args['out'], epochs=args['epochs'], cache=args['cache'])
else:
    E.run_experiment(E.RunConfig.from_json(args['cfg']), args['out'], cache_dir=args['cache'])
'''


def _child(args, log, kill_at=None):
    "Run the child on `args`; returns its exit code and the epochs it entered."
    if log.exists(): log.unlink()
    p = subprocess.run([sys.executable, '-c', CHILD, json.dumps({**args, 'kill_at': kill_at, 'epochs_log': str(log)})],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode in (0, -9), p.stderr[-3000:]
    return p.returncode, [int(l) for l in log.read_text().split()] if log.exists() else []


def _close(a, b, path='', skip=('seconds',)):
    "Assert the JSON values `a` and `b` equal, numbers within 1e-6, the keys `skip` aside."
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in skip: _close(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)): _close(x, y, f'{path}[{i}]')
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=0, abs_tol=1e-6), (path, a, b)
    else: assert a == b, (path, a, b)


def _history(d): return pd.read_csv(d/'history.csv')


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
    "Four tissues of 240² (three to train, 12 tiles: 3 batches of the tiny preset's 4), and a cache folder to share."
    d = tmp_path_factory.mktemp('resume')
    make_cohort(d/'cohort', n_tissues=4, size=240, seed=3, progress=False)
    return d


def _runs(via, cfg, root, name):
    "`(child args, the run folder its metrics land in, the .partial folder it works in)` for the output `name`."
    out = root/name
    if via == 'cli':
        work = out.parent/f'.{out.name}.work'
        return (dict(via=via, cohort=str(cfg.root), out=str(out), epochs=cfg.epochs, cache=str(root/'caches')), out,
                work/f'.{cfg.run_name}.partial')
    return (dict(via=via, cfg=cfg.to_json(), out=str(out), cache=str(root/'caches')), out/cfg.run_name,
            out/f'.{cfg.run_name}.partial')


CASES = {'spseg-train': ('cli', {}), 'gamma-augment': ('experiment', dict(gamma=0.85, augment=True))}


@pytest.mark.parametrize('case', list(CASES))
def test_killed_run_resumes_to_the_same_results(cohort, case):
    via, kw = CASES[case]
    # the config `spseg train` runs (holdout split, tiny preset), with the case's changes
    cfg = preset_config('tiny', name='semantic-virtues', root=str((cohort/'cohort').absolute()), epochs=EPOCHS,
                        split='holdout', **kw)
    log = cohort/f'{case}.epochs'
    ref_args, ref_run, _ = _runs(via, cfg, cohort, f'{case}-whole')
    assert _child(ref_args, log) == (0, list(range(EPOCHS)))

    args, run, partial = _runs(via, cfg, cohort, f'{case}-killed')
    assert _child(args, log, kill_at=KILL_AT) == (-9, [0, 1])
    # nothing half-written under a final name: no run folder yet; in the work folder, whole files of epoch 0
    assert not run.exists()
    assert RunConfig.from_json((partial/'config.json').read_text()) == cfg
    st = torch.load(partial/RESUME_FILE, map_location='cpu', weights_only=False)
    assert st['epochs_done'] == 1 and st['history'] == (partial/'history.csv').read_text()
    assert len(_history(partial)) == 1
    torch.load(partial/'best.pth', map_location='cpu', weights_only=True)
    assert not list(partial.glob('.*')) and not (partial/'metrics.json').exists()

    # the same call again: resumes at epoch 1, ends as the uninterrupted run
    assert _child(args, log) == (0, list(range(KILL_AT[0], EPOCHS)))
    assert not partial.exists() and not (run/RESUME_FILE).exists()
    got, ref = (json.loads((d/'metrics.json').read_text()) for d in (run, ref_run))
    _close(got, ref)
    assert got['epochs_run'] == EPOCHS
    h, h_ref = _history(run), _history(ref_run)
    assert list(h.columns) == list(h_ref.columns)
    _close(h.drop(columns='time').to_dict('list'), h_ref.drop(columns='time').to_dict('list'))
    a, b = (torch.load(d/'best.pth', weights_only=True) for d in (run, ref_run))
    assert set(a) == set(b) and all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6) for k in a)
