"The house rules, checked: one module per notebook, imports flow one way, one home per idea, one name per thing."
import ast, json, re
from collections import defaultdict
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT/'spseg'

def _exports():
    "`{module: notebook stem}` from each notebook's `#| default_exp`, in the notebooks' reading order."
    out = {}
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)
            if m: out[m.group(1)] = nb.stem; break
    return out

EXPORTS = _exports()
ORDER = list(EXPORTS)           # sorted by notebook name = reading order

def _tree(mod): return ast.parse((PKG/f'{mod}.py').read_text())

def _all(mod):
    for n in _tree(mod).body:
        if isinstance(n, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in n.targets):
            return [e.value for e in n.value.elts]
    return []

def test_every_module_comes_from_one_notebook():
    modules = sorted(p.stem for p in PKG.glob('*.py') if p.stem not in ('__init__', '_modidx'))
    assert sorted(EXPORTS) == modules

@pytest.mark.parametrize('mod', ORDER)
def test_module_states_its_job_in_its_first_line(mod):
    doc = ast.get_docstring(_tree(mod))
    assert doc and len(doc.splitlines()[0]) > 20, f'spseg/{mod}.py has no one-line statement of its job'

def test_no_public_name_in_two_modules():
    homes = defaultdict(list)
    for mod in ORDER:
        for name in _all(mod): homes[name].append(mod)
    assert {n: m for n, m in homes.items() if len(m) > 1} == {}

@pytest.mark.parametrize('mod', ORDER)
def test_imports_flow_one_way(mod):
    "A module imports only modules of notebooks that come before its own."
    later = set(ORDER[ORDER.index(mod):])
    used = {n.module.split('.')[0] for n in ast.walk(_tree(mod))
            if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    assert used & later == set()

def _source_without_core(): return {m: (PKG/f'{m}.py').read_text() for m in ORDER if m != 'core'}

def test_one_home_for_atomic_writes_and_hashes():
    for mod, text in _source_without_core().items():
        assert 'mkstemp' not in text and 'NamedTemporaryFile' not in text, f'{mod} writes temporary files itself'
        assert 'hashlib' not in text, f'{mod} hashes by itself (use spseg.core.short_hash / digest)'
        assert '.tmp' not in text, f'{mod} names temporary files itself'

def test_no_module_decides_the_modality_by_a_class_test_or_a_string():
    for mod, text in _source_without_core().items():
        assert not re.search(r'isinstance\([^)]*(VirTuesEncoder|CellViTEncoder)\)', text), mod
        assert not re.search(r"modality\s*==|==\s*'(sp|he)'", text), mod
        assert not re.search(r"__name__\s*==\s*'(VirTuesEncoder|CellViTEncoder)'", text), mod

def test_readme_lists_every_chapter():
    readme = (ROOT/'README.md').read_text()
    for mod, nb in EXPORTS.items(): assert f'| `{nb}` | `spseg.{mod}` |' in readme, f'{nb} missing from the README table'
