"Encoders: shapes, parameter counts, official checkpoint loading, bad checkpoints, MAE step, embedding cache."
import argparse, json, struct, warnings
import numpy as np, pytest, torch
from spseg.data import MARKERS, write_tissue, sp_stats, list_tissues
from spseg.encoders import (VirTuesEncoder, CellViTEncoder, VirTuesMAE, ViTMAE, mse_all_pixels, mse_masked_patches,
                            load_virtues, save_virtues, load_cellvit_vit256, write_safetensors, read_safetensors,
                            official_virtues_key, CheckpointError, MARKER_UNIPROT, n_params, build_cache,
                            EmbeddingCache, CacheMismatch, cache_bytes_per_tissue, weights_hash)

# ---------- shapes and counts (paper shapes on the meta device: no memory, no arithmetic)

@pytest.mark.parametrize('preset,dim', [('tiny', 64), ('paper', 512)])
def test_virtues_shapes(preset, dim):
    with torch.device('meta'):
        enc = VirTuesEncoder(preset)
        pss, skips = enc(torch.empty(2, 16, 120, 120))
    assert pss.shape == (2, dim, 15, 15)
    assert [s.shape for s in skips] == [(2, dim, 15, 15)] * 4

@pytest.mark.parametrize('preset,dim', [('tiny', 64), ('paper', 384)])
def test_vit_shapes(preset, dim):
    with torch.device('meta'):
        enc = CellViTEncoder(preset)
        cls, zs = enc(torch.empty(2, 3, 240, 240))
        final, _ = enc.embed(torch.empty(1, 3, 256, 256))
    assert cls.shape == (2, dim) and [z.shape for z in zs] == [(2, dim, 15, 15)] * 4
    assert final.shape == (1, dim, 16, 16)

def test_paper_counts_and_rope():
    with torch.device('meta'):
        v, vit = VirTuesEncoder('paper'), CellViTEncoder('paper')
    assert n_params(v) == 34_008_064            # without the marker table (learned: +16*640)
    assert n_params(v, skip=()) == 34_008_064 + 16 * 640
    assert n_params(vit) == 21_665_664          # CellViT's 21,672,979 adds its 19-class tissue head: 384*19+19
    for i, b in enumerate(v.blocks):
        att = b.multi_head_attention
        assert hasattr(att, 'pos_emb') == (i % 2 == 0)
        if i % 2 == 0: assert att.pos_emb.rope1d.sin.shape == att.pos_emb.rope1d.cos.shape == (1200, 32)

def test_paper_forward_small_input():
    "Real arithmetic at paper width on a small image (2×3 patches)."
    enc = VirTuesEncoder('paper').eval()
    with torch.no_grad(): pss, skips = enc(torch.randn(1, 3, 16, 24), markers=MARKERS[:3])
    assert pss.shape == (1, 512, 2, 3) and torch.isfinite(pss).all()
    assert torch.allclose(pss.mean(1), torch.zeros(1, 2, 3), atol=1e-4)   # final LayerNorm (unit affine at init)

# ---------- official checkpoints

def _virtues_file(tmp_path, esm=True, **kw):
    torch.manual_seed(0)
    e = torch.randn(16, 640)
    e[MARKERS.index('CD45RO')] = e[MARKERS.index('CD45')]     # same UniProt id
    enc = VirTuesEncoder('paper', esm=e)
    d = tmp_path/'esm'; d.mkdir(exist_ok=True)
    for m, v in zip(MARKERS, e): torch.save(v.clone(), d/f'{MARKER_UNIPROT[m]}.pt')
    sd = {official_virtues_key(k): v for k, v in enc.state_dict().items()}
    sd.update({'decoder.layers.0.weight': torch.randn(8, 8), 'decoder.out.bias': torch.zeros(64)})  # MAE decoder: ignored
    return enc, sd, d

def test_virtues_roundtrip_paper(tmp_path):
    enc, sd, esm_dir = _virtues_file(tmp_path)
    assert 'encoder.encoder.0.encoder_layer.multi_head_attention.pos_emb.rope1d.sin' in sd
    assert sd['encoder.prior_embedding_encoder.weight'].shape == (512, 640)
    write_safetensors(sd, tmp_path/'model.safetensors')
    got = load_virtues(tmp_path/'model.safetensors', esm_dir=esm_dir)
    assert got.cfg == enc.cfg
    for k, v in enc.state_dict().items(): assert torch.equal(got.state_dict()[k], v), k
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad(): torch.testing.assert_close(got.eval()(x)[0], enc.eval()(x)[0])

def test_virtues_tiny_learned_markers(tmp_path):
    enc = VirTuesEncoder('tiny')
    save_virtues(enc, tmp_path/'t.safetensors')
    got = load_virtues(tmp_path/'t.safetensors')
    assert weights_hash(got) == weights_hash(enc) and got.marker_names == MARKERS

def _expect_error(path, *words):
    with pytest.raises(CheckpointError) as e: load_virtues(path) if str(path).endswith('.safetensors') else load_cellvit_vit256(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words: assert w in msg, (w, msg)

def test_virtues_bad_checkpoints(tmp_path):
    _, sd, _ = _virtues_file(tmp_path)
    k_ff = 'encoder.encoder.5.encoder_layer.feedforward.3.weight'
    bad = dict(sd); bad[k_ff] = torch.zeros(512, 999)
    write_safetensors(bad, tmp_path/'shape.safetensors')
    _expect_error(tmp_path/'shape.safetensors', 'wrong shapes', k_ff, '(512, 999)', '(512, 1024)')
    bad = dict(sd); del bad['encoder.masked_token']; del bad['encoder.encoder.3.encoder_layer.layernorm2.bias']
    write_safetensors(bad, tmp_path/'missing.safetensors')
    _expect_error(tmp_path/'missing.safetensors', 'missing keys', 'encoder.masked_token', 'encoder.encoder.3.encoder_layer.layernorm2.bias')
    bad = dict(sd); bad['encoder.cls_token'] = torch.zeros(512)
    write_safetensors(bad, tmp_path/'extra.safetensors')
    _expect_error(tmp_path/'extra.safetensors', 'unexpected keys', 'encoder.cls_token')
    (tmp_path/'junk.safetensors').write_bytes(b'PK\x03\x04 this is a zip, not safetensors')
    _expect_error(tmp_path/'junk.safetensors', 'not a readable safetensors file')
    _expect_error(tmp_path/'nothere.safetensors', 'missing file')
    write_safetensors({'decoder.x': torch.zeros(2)}, tmp_path/'nodec.safetensors')
    _expect_error(tmp_path/'nodec.safetensors', 'no encoder keys')

def test_safetensors_truncated(tmp_path):
    write_safetensors({'a': torch.zeros(100)}, tmp_path/'a.safetensors')
    data = (tmp_path/'a.safetensors').read_bytes()
    (tmp_path/'a.safetensors').write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="tensor 'a' is malformed"): read_safetensors(tmp_path/'a.safetensors')
    n = struct.unpack('<Q', data[:8])[0]
    assert json.loads(data[8:8 + n])['a']['dtype'] == 'F32'

def test_esm_missing_files(tmp_path):
    from spseg.encoders import load_esm_embeddings
    torch.save(torch.zeros(640), tmp_path/'P16284.pt')                       # CD31 only
    with pytest.raises(CheckpointError, match=r'missing ESM embedding file\(s\): CD45 \(P08575.pt\)'): load_esm_embeddings(tmp_path)
    torch.save(torch.zeros(12), tmp_path/'P16284.pt')
    with pytest.raises(CheckpointError, match='has shape'): load_esm_embeddings(tmp_path, marker_names=['CD31'])

def _vit_sd(preset='paper'):
    torch.manual_seed(0)
    return CellViTEncoder(preset)

def test_vit_hipt_roundtrip(tmp_path):
    vit = _vit_sd()
    sd = vit.state_dict()
    assert sd['pos_embed'].shape == (1, 197, 384) and sd['blocks.0.attn.qkv.weight'].shape == (1152, 384)
    assert sd['blocks.0.mlp.fc1.weight'].shape == (1536, 384) and sd['patch_embed.proj.weight'].shape == (384, 3, 16, 16)
    teacher = {f'module.backbone.{k}': v for k, v in sd.items()}
    teacher.update({'module.head.mlp.0.weight': torch.randn(2048, 384), 'module.head.last_layer.weight_v': torch.randn(10, 256)})
    torch.save({'teacher': teacher, 'student': {}, 'args': argparse.Namespace(arch='vit_small'), 'epoch': 3}, tmp_path/'vit256_small_dino.pth')
    got = load_cellvit_vit256(tmp_path/'vit256_small_dino.pth')
    for k, v in sd.items(): assert torch.equal(got.state_dict()[k], v), k

def test_vit_cellvit_checkpoint(tmp_path):
    vit = _vit_sd('tiny')
    msd = {f'encoder.{k}': v for k, v in vit.state_dict().items()}
    msd.update({'encoder.head.weight': torch.randn(19, 64), 'encoder.head.bias': torch.zeros(19),
                'decoder0.0.block.0.weight': torch.randn(32, 3, 3, 3)})
    torch.save({'model_state_dict': msd, 'arch': 'CellViT256', 'config': {'data.num_classes': 6}}, tmp_path/'CellViT-256.pth')
    got = load_cellvit_vit256(tmp_path/'CellViT-256.pth')
    assert got.cfg.dim == 64 and weights_hash(got) == weights_hash(vit)

def test_vit_bad_checkpoints(tmp_path):
    sd = _vit_sd('tiny').state_dict()
    bad = dict(sd); bad['blocks.1.mlp.fc1.weight'] = torch.zeros(3, 64)
    torch.save({'teacher': bad}, tmp_path/'shape.pth'); _expect_error(tmp_path/'shape.pth', 'wrong shapes', 'blocks.1.mlp.fc1.weight')
    bad = dict(sd); del bad['norm.weight']
    torch.save({'teacher': bad}, tmp_path/'missing.pth'); _expect_error(tmp_path/'missing.pth', 'missing keys', 'norm.weight')
    bad = dict(sd); bad['dist_token'] = torch.zeros(1, 1, 64)
    torch.save({'teacher': bad}, tmp_path/'extra.pth'); _expect_error(tmp_path/'extra.pth', 'unexpected keys', 'dist_token')
    (tmp_path/'junk.pth').write_bytes(b'garbage' * 10); _expect_error(tmp_path/'junk.pth', 'unreadable checkpoint')
    torch.save({'optimizer': {}}, tmp_path/'other.pth'); _expect_error(tmp_path/'other.pth', '"teacher"', 'model_state_dict')

# ---------- MAE

def test_virtues_mae_step():
    torch.manual_seed(0)
    mae = VirTuesMAE(VirTuesEncoder('tiny'))
    x = torch.randn(2, 16, 32, 32)
    mask = mae.sample_mask(2, 16, 4, 4)
    frac = mask.float().mean((2, 3))
    assert ((frac >= 0.5) & (frac <= 1)).all()
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(1)                     # the same mask every step: a pure optimisation check
        loss = mse_all_pixels(mae(x)); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0]
    # masked tokens excluded from attention: changing a masked patch does not change the PSS grid
    enc = mae.encoder.eval()
    m = torch.zeros(1, 16, 4, 4, dtype=torch.bool); m[0, 3, 1, 2] = True
    y = x[:1].clone(); y[0, 3, 8:16, 16:24] += 5
    with torch.no_grad(): torch.testing.assert_close(enc(x[:1], mask=m)[0], enc(y, mask=m)[0])

def test_vit_mae_step():
    torch.manual_seed(0)
    mae = ViTMAE(CellViTEncoder('tiny'))
    pred, target, masked = mae(torch.randn(2, 3, 64, 64))
    assert pred.shape == target.shape == (2, 16, 768) and masked.sum(1).tolist() == [12, 12]
    mse_masked_patches((pred, target, masked)).backward()

# ---------- cache

@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        m = np.zeros((240, 200), np.uint8); m[10:30, 10:40] = 2; m[150:170, 100:130] = 4
        write_tissue(tmp_path/'cohort'/f't{i}', rng.integers(0, 255, (240, 200, 3), dtype=np.uint8),
                     rng.integers(0, 3000, (16, 240, 200), dtype=np.uint16), m)
    paths = list_tissues(tmp_path/'cohort')
    return paths, sp_stats(tmp_path/'cohort', ['t0'])

def _enc(seed=0):
    torch.manual_seed(seed); return VirTuesEncoder('tiny', esm=torch.zeros(16, 640))

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
    assert EmbeddingCache(tmp_path/'c').ids == ['t0', 't1']

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
    with pytest.raises(CacheMismatch, match='weights_hash'): build_cache(tmp_path/'c', paths, _enc(seed=1), st, on_mismatch='raise')
    st2 = sp_stats(tmp_path/'cohort', ['t0', 't1'])
    with pytest.raises(CacheMismatch, match='normalisation'): build_cache(tmp_path/'c', paths, _enc(), st2, on_mismatch='raise')
    with pytest.raises(CacheMismatch, match='tile'): build_cache(tmp_path/'c', paths, _enc(), st, tile=64, on_mismatch='raise')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        c = build_cache(tmp_path/'c', paths[:1], _enc(seed=1), st)
    assert any('rebuilding' in str(x.message) for x in w) and c.ids == ['t0']

def test_cache_vit(tmp_path, cohort):
    paths, st = cohort
    c = build_cache(tmp_path/'v', paths[:1], CellViTEncoder('tiny'), st, bs=4)
    assert c.tissue('t0').shape == (4, 5, 64, 15, 15)
    assert c.manifest['normalisation']['resize'] == 'bilinear x2'
