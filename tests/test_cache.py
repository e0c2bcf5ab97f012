"Embedding cache: build and read, resume after an interruption, invalidation, both encoders, the manifest."
import json, warnings
import numpy as np, pytest, torch
from conftest import two_tissue_cohort
from spseg.data import write_tissue, sp_stats, list_tissues
from spseg.encoders import VirTuesEncoder, CellViTEncoder
from spseg.cache import (build_cache, cache_manifest, EmbeddingCache, CacheMismatch, cache_bytes_per_tissue,
                         weights_hash, CACHE_FORMAT)

@pytest.fixture
def cohort(tmp_path):
    paths = two_tissue_cohort(tmp_path/'cohort', 240, 200)
    return paths, sp_stats(tmp_path/'cohort', ['t0'])

def _enc(seed=0, **kw):
    torch.manual_seed(seed)
    return VirTuesEncoder('tiny', esm=torch.zeros(16, 640), **kw)

def test_cache_build_read(tmp_path, cohort):
    paths, st = cohort
    c = build_cache(tmp_path/'c', paths, _enc(), st, bs=3)
    assert c.ids == ['t0', 't1'] and c.tissue('t0').shape == (4, 5, 64, 15, 15)     # 240×200 -> 2×2 tiles (padded)
    assert c.tissue('t0').dtype == np.float16 and isinstance(c.tissue('t0'), np.memmap)
    assert c.read('t1', 3, states=['final']).shape == (1, 64, 15, 15)
    assert c.tile_index('t1', 120, 120, (240, 200)) == 3
    assert (tmp_path/'c'/'t0.npy').stat().st_size == cache_bytes_per_tissue(64, n_tiles=4) + 128
    man = json.loads((tmp_path/'c'/'manifest.json').read_text())
    assert man['encoder'] == 'VirTuesEncoder' and man['dtype'] == 'float16' and man['shape'] == [5, 64, 15, 15]
    assert (man['format'], man['modality'], man['input_scale'], man['patch_size']) == (CACHE_FORMAT, 'sp', 1, 8)
    assert EmbeddingCache(tmp_path/'c').ids == ['t0', 't1']
    with pytest.raises(KeyError, match="'t9' is not in the cache"): c.tissue('t9')
    with pytest.raises(FileNotFoundError, match='no cache manifest'): EmbeddingCache(tmp_path/'nothing')

def test_cache_equals_states(tmp_path, cohort):
    "A cached tile is the encoder's `states` of that tile, in float16."
    paths, st = cohort
    from spseg.data import TileDataset
    enc = _enc().eval()
    c = build_cache(tmp_path/'c', paths[:1], enc, st, bs=4, amp=False)   # float32, as the reference below
    sp, he = (torch.from_numpy(a)[None] for a in TileDataset(paths[:1], st, margin=0).read(2)[:2])
    with torch.no_grad(): ref = enc.states(sp=sp, he=he)[0].numpy()
    np.testing.assert_allclose(c.read('t0', 2), ref.astype(np.float16).astype(np.float32), rtol=0, atol=1e-6)

def test_manifest_reads_the_encoder(cohort):
    _, st = cohort
    m4 = cache_manifest(_enc(patch=4), st)
    assert (m4['patch_size'], m4['shape']) == (4, [5, 64, 30, 30])
    mv = cache_manifest(CellViTEncoder('tiny'), st)
    assert (mv['modality'], mv['input_scale'], mv['patch_size'], mv['shape']) == ('he', 2, 16, [5, 64, 15, 15])
    assert mv['states'] == ['final', 'skip1', 'skip2', 'skip3', 'skip4'] and 'stats' not in mv['normalisation']
    assert cache_manifest(CellViTEncoder('tiny', input_scale=4), st)['shape'][-1] == 30
    with pytest.raises(ValueError, match='not a multiple of the 16-px patch'): cache_manifest(_enc(patch=16), st)

def test_weights_hash_is_content():
    a, b = _enc(0), _enc(1)
    assert weights_hash(a) != weights_hash(b)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b) and len(weights_hash(a)) == 16

def test_cache_resume(tmp_path, cohort):
    paths, st = cohort
    enc, n = _enc(), [0]
    orig = enc.embed
    def embed(x):
        n[0] += 1
        if n[0] == 4: raise RuntimeError('boom')   # t0: calls 1-2; t1: call 3 done, call 4 fails
        return orig(x)
    enc.embed = embed
    with pytest.raises(RuntimeError): build_cache(tmp_path/'c', paths, enc, st, bs=2)
    assert (tmp_path/'c'/'t0.npy').exists() and not (tmp_path/'c'/'t1.npy').exists()
    assert (tmp_path/'c'/'t1.partial.npy').exists()
    done = []
    c = build_cache(tmp_path/'c', paths, _enc(), st, bs=2, progress=lambda t, d, n: done.append((t, d)))
    assert done == [('t1', 4)]                                  # only the last batch is computed
    full = build_cache(tmp_path/'ref', paths, _enc(), st, bs=2)
    np.testing.assert_array_equal(np.asarray(c.tissue('t1')), np.asarray(full.tissue('t1')))
    assert not list((tmp_path/'c').glob('*.partial.npy')) and not list((tmp_path/'c').glob('*.progress.json'))

def test_cache_invalidation(tmp_path, cohort):
    paths, st = cohort
    build_cache(tmp_path/'c', paths, _enc(), st)
    with pytest.raises(CacheMismatch, match='weights_hash'):
        build_cache(tmp_path/'c', paths, _enc(seed=1), st, on_mismatch='raise')
    st2 = sp_stats(tmp_path/'cohort', ['t0', 't1'])
    with pytest.raises(CacheMismatch, match='normalisation'):
        build_cache(tmp_path/'c', paths, _enc(), st2, on_mismatch='raise')
    with pytest.raises(CacheMismatch, match='tile'):
        build_cache(tmp_path/'c', paths, _enc(), st, tile=64, on_mismatch='raise')
    with pytest.raises(ValueError, match='on_mismatch'):
        build_cache(tmp_path/'c', paths, _enc(), st, on_mismatch='mix')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        c = build_cache(tmp_path/'c', paths[:1], _enc(seed=1), st)
    assert any('rebuilding' in str(x.message) for x in w) and c.ids == ['t0']

def test_cache_vit(tmp_path, cohort):
    paths, st = cohort
    c = build_cache(tmp_path/'v', paths[:1], CellViTEncoder('tiny'), st, bs=4)
    assert c.tissue('t0').shape == (4, 5, 64, 15, 15)
    assert (c.manifest['modality'], c.manifest['input_scale']) == ('he', 2)
    with pytest.raises(CacheMismatch, match='encoder'):
        build_cache(tmp_path/'v', paths[:1], _enc(), st, on_mismatch='raise')

# ---------- the fusion encoder

def _fusion(seed=0):
    from spseg.encoders import fusion_encoder
    torch.manual_seed(seed)
    return fusion_encoder('tiny')

def test_fusion_manifest(cohort):
    _, st = cohort
    f = _fusion()
    m = cache_manifest(f, st)
    assert (m['encoder'], m['modality'], m['input_scale'], m['patch_size']) == ('FusionEncoder', 'sp+he', 1, 8)
    assert m['shape'] == [5, 128, 15, 15] and m['config']['input_scales'] == [1, 2]
    ms, mh = cache_manifest(f.sp, st), cache_manifest(f.he, st)
    assert m['normalisation'] == {**ms['normalisation'], **mh['normalisation']}
    assert {'sp', 'he', 'stats', 'markers'} <= set(m['normalisation'])
    assert m['normalisation']['stats'] == ms['normalisation']['stats']
    for single in (ms, mh): assert m['weights_hash'] != single['weights_hash'] and m['modality'] != single['modality']
    st2 = sp_stats(cohort[0][0].parent, ['t0', 't1'])
    assert cache_manifest(f, st2)['normalisation'] != m['normalisation']      # the SP statistics are in it

def test_fusion_cache_round_trip(tmp_path, cohort):
    "A fusion cache holds `states` of each normalised tile pair; it never passes for a single encoder's cache."
    from spseg.data import TileDataset
    paths, st = cohort
    f = _fusion().eval()
    c = build_cache(tmp_path/'f', paths, f, st, bs=4, amp=False)         # float32, as the reference below
    assert c.ids == ['t0', 't1'] and c.tissue('t1').shape == (4, 5, 128, 15, 15)
    ds = TileDataset(paths[1:], st, margin=0)
    sp, he = (torch.from_numpy(np.stack([ds.read(k)[j] for k in range(4)])) for j in (0, 1))
    with torch.no_grad(): ref = f.states(sp=sp, he=he).numpy().astype(np.float16)
    np.testing.assert_array_equal(np.asarray(c.tissue('t1')), ref)
    with pytest.raises(CacheMismatch, match='modality'):
        build_cache(tmp_path/'f', paths, f.sp, st, on_mismatch='raise')

def test_fusion_cache_feeds_training(tmp_path, cohort):
    "CachedTiles gives the decoder the 19-channel tile pair and the 128-wide cached states."
    from spseg.data import TileDataset
    from spseg.decoder import decoder_for
    from spseg.train import CachedTiles, DecoderOnStates
    paths, st = cohort
    f = _fusion().eval()
    c = build_cache(tmp_path/'f', paths[:1], f, st, bs=4)
    ds = CachedTiles(c, TileDataset(paths[:1], st), f)
    x_img, *z, mask, inst, hv = ds[0]
    assert x_img.shape == (19, 120, 120) and [s.shape for s in z] == [(128, 15, 15)] * 5
    head = DecoderOnStates(decoder_for(f, 'tiny'), f.input_scale).eval()
    with torch.no_grad(): out = head(x_img[None], *(s[None] for s in z))
    assert all(v.shape[-2:] == mask.shape[-2:] == (120, 120) for v in out.values())
