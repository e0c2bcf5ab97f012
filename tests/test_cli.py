"End-to-end: the `spseg` command as `make demo` runs it, on a small cohort."
import json, subprocess, sys
from pathlib import Path
from spseg.data import list_tissues, load_tissue, CLASSES

def run(*args, cwd=None):
    return subprocess.run([sys.executable, '-c', 'import sys; from spseg.cli import main; sys.exit(main(sys.argv[1:]))', *args], capture_output=True, text=True, cwd=cwd, timeout=600)

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

