"Atomic writes leave a whole file or none; short hashes are canonical."
import json, signal, subprocess, sys, textwrap
import numpy as np, pytest, torch
from hypothesis import given, strategies as st
from spseg.core import (atomic_path, atomic_write_bytes, atomic_write_text, atomic_write_json, atomic_torch_save,
                        atomic_np_save, atomic_imwrite, short_hash, digest)

WRITERS = {
    'bytes': "atomic_write_bytes(target, chunks())",
    'text': "atomic_write_text(target, ''.join(c.decode() for c in chunks()))",
    'json': "atomic_write_json(target, [c.decode() for c in chunks()])",
    'torch': "atomic_torch_save([c for c in chunks()], target)",
    'numpy': "atomic_np_save(target, np.frombuffer(b''.join(chunks()), np.uint8))",
    'tiff': "atomic_imwrite(target, np.frombuffer(b''.join(chunks()), np.uint8).reshape(-1, 1000))",
}

def _child(target, call, stall_rename=False):
    """A child process writing `target` with `call`; it prints 'writing' once inside the write: while streaming the
    payload, or (`stall_rename`) with the whole file written to its temporary name, just before the rename."""
    return textwrap.dedent(f'''
        import os, time, numpy as np
        from spseg.core import *
        target = {str(target)!r}
        if {stall_rename!r}:
            real_replace = os.replace
            def stalled_replace(a, b):
                print('writing', flush=True)
                time.sleep(60)
                real_replace(a, b)
            os.replace = stalled_replace
        def chunks():
            for i in range(400):
                if i == 3 and not {stall_rename!r}: print('writing', flush=True)
                time.sleep(0.01)
                yield b'x' * 10_000
        {call}
        print('done', flush=True)''')

@pytest.mark.parametrize('kind,stall_rename', [('bytes', False)] + [(k, True) for k in sorted(WRITERS)])
def test_killed_writer_leaves_no_file_under_final_name(tmp_path, kind, stall_rename):
    "SIGKILL while the payload streams in, or after it is all written but before the rename: no file under the name."
    target = tmp_path/'out'/f'result.{kind}'
    p = subprocess.Popen([sys.executable, '-c', _child(target, WRITERS[kind], stall_rename)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == 'writing'
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not target.exists()
    left = [x.name for x in target.parent.iterdir()]
    assert len(left) == 1 and all(n.startswith(f'.{target.name}.') and n.endswith('.tmp') for n in left)
    again = subprocess.run([sys.executable, '-c', _child(target, WRITERS[kind])], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert [x.name for x in target.parent.iterdir()] == [target.name]     # the rerun removed the dead writer's temporary

@pytest.mark.parametrize('kind', sorted(WRITERS))
def test_finished_writer_leaves_only_the_file(tmp_path, kind):
    target = tmp_path/f'result.{kind}'
    out = subprocess.run([sys.executable, '-c', _child(target, WRITERS[kind])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [x.name for x in tmp_path.iterdir()] == [target.name]

def test_raising_block_removes_temporary_and_keeps_old_file(tmp_path):
    target = tmp_path/'a.json'
    atomic_write_json(target, {'v': 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, broken')
            raise RuntimeError('interrupted')
    assert json.loads(target.read_text()) == {'v': 1}
    assert [x.name for x in tmp_path.iterdir()] == ['a.json']

def test_json_is_strict(tmp_path):
    p = atomic_write_json(tmp_path/'m.json', {'d': np.array([0.5, np.nan]), 'n': np.int64(3)})
    assert json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f'non-strict JSON constant {c}')) == \
        {'d': [0.5, None], 'n': 3}

def test_round_trips(tmp_path):
    atomic_torch_save({'w': torch.ones(2)}, tmp_path/'w.pth')
    assert torch.equal(torch.load(tmp_path/'w.pth')['w'], torch.ones(2))
    atomic_np_save(tmp_path/'a.npy', np.arange(4))
    assert np.load(tmp_path/'a.npy').tolist() == [0, 1, 2, 3]
    assert atomic_write_text(tmp_path/'t.txt', 'é').read_text(encoding='utf-8') == 'é'

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5) |
                           st.floats(allow_nan=False, allow_infinity=False),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
                           max_leaves=10)

@given(json_values)
def test_short_hash_ignores_key_order(v):
    d = {'a': v, 'b': [v]}
    assert short_hash(d) == short_hash(dict(reversed(list(d.items()))))
    assert len(short_hash(d)) == 12

@given(st.binary(max_size=64), st.integers(0, 64))
def test_digest_of_chunks_equals_digest_of_whole(b, k):
    assert digest([b[:k], b[k:]]) == digest(b)

def test_written_files_get_the_usual_permissions(tmp_path):
    "mkstemp makes private files; a finished result must have the mode a plain open() would give it."
    import os
    mask = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path/'r.txt', 'x')
        assert p.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
