"End-to-end: the `spseg` command as `make demo` runs it, on a small cohort."
import json, subprocess, sys
from pathlib import Path
from spseg.data import list_tissues, load_tissue, CLASSES

def run(*args, cwd=None):
    code = 'import sys; from spseg.cli import main; sys.exit(main(sys.argv[1:]))'
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, cwd=cwd, timeout=600)

def test_demo_end_to_end(tmp_path):
    r = run('demo', '--out', str(tmp_path/'out'), '--n-tissues', '3', '--size', '400')
    assert r.returncode == 0, r.stderr
    assert 'all 3 tissues load and validate' in r.stdout
    for c in CLASSES: assert c in r.stdout
    assert (tmp_path/'out'/'overview.png').stat().st_size > 10_000
    rows = json.loads((tmp_path/'out'/'shares.json').read_text())
    assert [r['class'] for r in rows] == CLASSES
    assert abs(sum(r['cohort_pct'] for r in rows) - 100) < 1e-6
    assert len(list_tissues(tmp_path/'out'/'cohort')) == 3

def test_cohort_command(tmp_path):
    r = run('cohort', str(tmp_path/'c'), '--n-tissues', '2', '--size', '200', '--seed', '3')
    assert r.returncode == 0, r.stderr
    paths = list_tissues(tmp_path/'c')
    assert len(paths) == 2 and load_tissue(paths[1]).shape == (200, 200)

def test_no_command_is_an_error():
    r = run()
    assert r.returncode == 2 and 'required' in r.stderr


# ---- spseg train / spseg predict on a tiny synthetic cohort ------------------------------------------------------
import shutil, time
import numpy as np, pandas as pd, pytest, tifffile
from spseg.synthetic import make_cohort
from spseg.cli import RUN_FILES, main
from spseg.export import OUTPUT_FILES

@pytest.fixture(scope='module')
def job(tmp_path_factory):
    "4 tissues of 240², a semantic and an instance run of 1 epoch, an unlabelled copy of the held-out tissue."
    d = tmp_path_factory.mktemp('job')
    make_cohort(d/'cohort', n_tissues=4, size=240, seed=0, progress=False)
    for task in ('semantic', 'instance'):
        r = run('train', str(d/'cohort'), '--out', str(d/task), '--task', task, '--epochs', '1')
        assert r.returncode == 0, r.stderr
    shutil.copytree(d/'cohort'/'tissue_003', d/'new', ignore=shutil.ignore_patterns('mask.tif', 'inst.tif'))
    return d

def check_outputs(d):
    "The five outputs of one tissue exist and name the same nuclei."
    assert sorted(p.name for p in d.iterdir() if p.name != 'scores.json') == sorted(OUTPUT_FILES.values())
    inst = tifffile.imread(d/'instances.ome.tif')
    feats = json.loads((d/'nuclei.geojson').read_text())['features']
    ids = sorted(f['properties']['id'] for f in feats)
    assert ids == np.unique(inst[inst > 0]).tolist() == sorted(pd.read_parquet(d/'cells.parquet')['id'])
    return ids

def test_train_makes_a_run_folder(job):
    for task in ('semantic', 'instance'):
        assert {p.name for p in (job/task).iterdir()} == set(RUN_FILES)
    assert not list(job.glob('.*.work'))
    m = json.loads((job/'semantic'/'metrics.json').read_text())
    assert 0 <= m['mean_dice'] <= 1 and m['epochs_run'] == 1
    stats = json.loads((job/'semantic'/'sp_stats.json').read_text())
    assert stats['train_ids'] == ['tissue_000', 'tissue_001', 'tissue_002']

def test_train_rerun_reuses_the_run(job):
    before = (job/'semantic'/'best.pth').stat().st_mtime_ns
    r = run('train', str(job/'cohort'), '--out', str(job/'semantic'), '--epochs', '1')
    assert r.returncode == 0, r.stderr
    assert 'epoch' not in r.stdout and (job/'semantic'/'best.pth').stat().st_mtime_ns == before

def test_predict_unlabelled_and_evaluate(job):
    r = run('predict', str(job/'semantic'), str(job/'new'), str(job/'cohort'/'tissue_003'), '--out', str(job/'out'),
            '--evaluate')
    assert r.returncode == 0, r.stderr
    assert check_outputs(job/'out'/'new') == check_outputs(job/'out'/'tissue_003')
    assert not (job/'out'/'new'/'scores.json').exists()
    s = json.loads((job/'out'/'tissue_003'/'scores.json').read_text())
    assert list(s['per_class_dice']) == CLASSES and {'bpq', 'aji', 'det_f1'} <= set(s)
    m = json.loads((job/'semantic'/'metrics.json').read_text())
    assert abs(s['mean_dice'] - m['mean_dice']) < 1e-6      # the held-out tissue is the run's validation split

def test_predict_with_both_runs(job):
    r = run('predict', str(job/'semantic'), str(job/'instance'), str(job/'new'), '--out', str(job/'out2'))
    assert r.returncode == 0, r.stderr
    check_outputs(job/'out2'/'new')

def test_wrong_channel_count_exits_2(job, tmp_path):
    bad = shutil.copytree(job/'new', tmp_path/'bad')
    tifffile.imwrite(bad/'sp.tif', tifffile.imread(bad/'sp.tif')[:12])
    r = run('predict', str(job/'semantic'), str(bad), '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith('spseg predict: error:')]   # (import warnings aside)
    assert len(errors) == 1 and str(bad/'sp.tif') in errors[0]

@pytest.mark.parametrize('args, path', [
    (('predict', '{semantic}', '{job}/nowhere'), '{job}/nowhere'),
    (('predict', '{job}/cohort', '{new}'), '{job}/cohort'),
    (('predict', '{job}/norun', '{new}'), '{job}/norun'),
    (('train', '{job}/nocohort'), '{job}/nocohort'),
    (('train', '{job}/cohort', '--weights', '{job}/none.safetensors'), '{job}/none.safetensors')])
def test_bad_input_exits_2(job, tmp_path, capsys, args, path):
    f = lambda s: s.format(job=job, semantic=job/'semantic', new=job/'new')
    assert main([f(a) for a in args] + ['--out', str(tmp_path/'o')]) == 2
    err = capsys.readouterr().err
    assert f(path) in err and len(err.strip().splitlines()) == 1
