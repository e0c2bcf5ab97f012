"Checkpoints: official VirTues and HIPT/CellViT files round-trip; bad files fail naming the file and the keys."
import argparse, json, struct
from functools import partial
import pytest, torch
from spseg.data import MARKERS
from spseg.encoders import VirTuesEncoder, CellViTEncoder
from spseg.checkpoints import (load_virtues, save_virtues, load_cellvit_vit256, save_cellvit_vit256, write_safetensors,
                               read_safetensors, official_virtues_key, load_esm_embeddings, CheckpointError,
                               MARKER_UNIPROT)

def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

def _virtues_file(tmp_path):
    torch.manual_seed(0)
    e = torch.randn(16, 640)
    e[MARKERS.index('CD45RO')] = e[MARKERS.index('CD45')]     # same UniProt id
    enc = VirTuesEncoder('paper', esm=e)
    d = tmp_path/'esm'
    d.mkdir(exist_ok=True)
    for m, v in zip(MARKERS, e): torch.save(v.clone(), d/f'{MARKER_UNIPROT[m]}.pt')
    sd = {official_virtues_key(k): v for k, v in enc.state_dict().items()}
    sd.update({'decoder.layers.0.weight': torch.randn(8, 8), 'decoder.out.bias': torch.zeros(64)})  # MAE decoder
    return enc, sd, d

def test_virtues_roundtrip_paper(tmp_path):
    enc, sd, esm_dir = _virtues_file(tmp_path)
    assert 'encoder.encoder.0.encoder_layer.multi_head_attention.pos_emb.rope1d.sin' in sd
    assert sd['encoder.prior_embedding_encoder.weight'].shape == (512, 640)
    write_safetensors(sd, tmp_path/'model.safetensors')
    got = load_virtues(tmp_path/'model.safetensors', esm_dir=esm_dir)
    assert got.cfg == enc.cfg and _same(got, enc)
    torch.testing.assert_close(got.marker_prior, enc.marker_prior)
    x = torch.randn(1, 16, 16, 16)
    with torch.no_grad(): torch.testing.assert_close(got.eval()(x)[0], enc.eval()(x)[0])

def test_virtues_tiny_learned_markers(tmp_path):
    enc = VirTuesEncoder('tiny', marker_names=MARKERS[::2])
    got = load_virtues(save_virtues(enc, tmp_path/'t.safetensors'))
    assert _same(got, enc) and got.marker_names == MARKERS[::2]

def test_virtues_patch4_roundtrip(tmp_path):
    "The patch size is read off the file too (patch_encoder takes p*p pixels)."
    enc = VirTuesEncoder('tiny', patch=4)
    got = load_virtues(save_virtues(enc, tmp_path/'p4.safetensors'))
    assert got.patch_size == 4 and got.token_grid(120) == 30 and _same(got, enc)

def test_save_is_atomic(tmp_path):
    p = write_safetensors({'a': torch.zeros(3)}, tmp_path/'a.safetensors')
    assert sorted(x.name for x in tmp_path.iterdir()) == ['a.safetensors'] and p == tmp_path/'a.safetensors'

def _expect_error(path, *words):
    load = partial(load_virtues, random_markers=True) if str(path).endswith('.safetensors') else load_cellvit_vit256
    with pytest.raises(CheckpointError) as e: load(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words: assert w in msg, (w, msg)

@pytest.mark.filterwarnings('ignore:.*marker identity is random')
def test_virtues_bad_checkpoints(tmp_path):
    _, sd, _ = _virtues_file(tmp_path)
    k_ff = 'encoder.encoder.5.encoder_layer.feedforward.3.weight'
    bad = dict(sd)
    bad[k_ff] = torch.zeros(512, 999)
    write_safetensors(bad, tmp_path/'shape.safetensors')
    _expect_error(tmp_path/'shape.safetensors', 'wrong shapes', k_ff, '(512, 999)', '(512, 1024)')
    bad = dict(sd)
    del bad['encoder.masked_token'], bad['encoder.encoder.3.encoder_layer.layernorm2.bias']
    write_safetensors(bad, tmp_path/'missing.safetensors')
    _expect_error(tmp_path/'missing.safetensors', 'missing keys', 'encoder.masked_token',
                  'encoder.encoder.3.encoder_layer.layernorm2.bias')
    bad = dict(sd)
    bad['encoder.cls_token'] = torch.zeros(512)
    write_safetensors(bad, tmp_path/'extra.safetensors')
    _expect_error(tmp_path/'extra.safetensors', 'unexpected keys', 'encoder.cls_token')
    (tmp_path/'junk.safetensors').write_bytes(b'PK\x03\x04 this is a zip, not safetensors')
    _expect_error(tmp_path/'junk.safetensors', 'not a readable safetensors file')
    _expect_error(tmp_path/'nothere.safetensors', 'missing file')
    write_safetensors({'decoder.x': torch.zeros(2)}, tmp_path/'nodec.safetensors')
    _expect_error(tmp_path/'nodec.safetensors', 'no encoder keys')

def test_virtues_rope_convention_checked(tmp_path):
    enc = VirTuesEncoder('tiny')
    sd = {official_virtues_key(k): v for k, v in enc.state_dict().items()}
    k = 'encoder.encoder.2.encoder_layer.multi_head_attention.pos_emb.rope1d.sin'
    sd[k] = sd[k].flip(-1)                                          # another layout of the same frequencies
    write_safetensors(sd, tmp_path/'rope.safetensors')
    _expect_error(tmp_path/'rope.safetensors', 'RoPE tables differ', k)

def test_safetensors_truncated(tmp_path):
    write_safetensors({'a': torch.zeros(100)}, tmp_path/'a.safetensors')
    data = (tmp_path/'a.safetensors').read_bytes()
    n = struct.unpack('<Q', data[:8])[0]
    assert json.loads(data[8:8 + n])['a']['dtype'] == 'F32'          # the published format, byte for byte
    (tmp_path/'a.safetensors').write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r'a\.safetensors: not a readable safetensors file'):
        read_safetensors(tmp_path/'a.safetensors')

def test_safetensors_shared_and_odd_tensors(tmp_path):
    base = torch.randn(4, 5)
    ts = dict(a=base, b=base[1], c=base.t(), d=torch.zeros(0, 2), e=torch.arange(3).to(torch.int16))
    back, meta = read_safetensors(write_safetensors(ts, tmp_path/'x.safetensors', metadata=dict(k=1)))
    for k, v in ts.items(): assert torch.equal(back[k], v) and back[k].dtype == v.dtype
    assert meta == dict(k='1')

def test_esm_missing_files(tmp_path):
    torch.save(torch.zeros(640), tmp_path/'P16284.pt')                       # CD31 only
    with pytest.raises(CheckpointError, match=r'missing ESM embedding file\(s\): CD45 \(P08575.pt\)'):
        load_esm_embeddings(tmp_path)
    torch.save(torch.zeros(12), tmp_path/'P16284.pt')
    with pytest.raises(CheckpointError, match='has shape'): load_esm_embeddings(tmp_path, marker_names=['CD31'])
    (tmp_path/'P16284.pt').write_bytes(b'not a tensor')
    with pytest.raises(CheckpointError, match='unreadable ESM embedding'): load_esm_embeddings(tmp_path, ['CD31'])

def _vit(preset='paper'):
    torch.manual_seed(0)
    return CellViTEncoder(preset)

def test_vit_hipt_roundtrip(tmp_path):
    vit = _vit()
    sd = vit.state_dict()
    assert sd['pos_embed'].shape == (1, 197, 384) and sd['blocks.0.attn.qkv.weight'].shape == (1152, 384)
    assert sd['blocks.0.mlp.fc1.weight'].shape == (1536, 384)
    assert sd['patch_embed.proj.weight'].shape == (384, 3, 16, 16)
    teacher = {f'module.backbone.{k}': v for k, v in sd.items()}
    teacher.update({'module.head.mlp.0.weight': torch.randn(2048, 384),
                    'module.head.last_layer.weight_v': torch.randn(10, 256)})
    ck = {'teacher': teacher, 'student': {}, 'args': argparse.Namespace(arch='vit_small'), 'epoch': 3}
    torch.save(ck, tmp_path/'vit256_small_dino.pth')
    assert _same(load_cellvit_vit256(tmp_path/'vit256_small_dino.pth'), vit)

def test_vit_cellvit_checkpoint(tmp_path):
    vit = _vit('tiny')
    msd = {f'encoder.{k}': v for k, v in vit.state_dict().items()}
    msd.update({'encoder.head.weight': torch.randn(19, 64), 'encoder.head.bias': torch.zeros(19),
                'decoder0.0.block.0.weight': torch.randn(32, 3, 3, 3)})
    torch.save({'model_state_dict': msd, 'arch': 'CellViT256', 'config': {'data.num_classes': 6}},
               tmp_path/'CellViT-256.pth')
    got = load_cellvit_vit256(tmp_path/'CellViT-256.pth')
    assert got.cfg.dim == 64 and _same(got, vit)
    assert _same(load_cellvit_vit256(save_cellvit_vit256(vit, tmp_path/'again.pth')), vit)

def test_vit_bad_checkpoints(tmp_path):
    sd = _vit('tiny').state_dict()
    bad = dict(sd)
    bad['blocks.1.mlp.fc1.weight'] = torch.zeros(3, 64)
    torch.save({'teacher': bad}, tmp_path/'shape.pth')
    _expect_error(tmp_path/'shape.pth', 'wrong shapes', 'blocks.1.mlp.fc1.weight')
    bad = dict(sd)
    del bad['norm.weight']
    torch.save({'teacher': bad}, tmp_path/'missing.pth')
    _expect_error(tmp_path/'missing.pth', 'missing keys', 'norm.weight')
    bad = dict(sd)
    bad['dist_token'] = torch.zeros(1, 1, 64)
    torch.save({'teacher': bad}, tmp_path/'extra.pth')
    _expect_error(tmp_path/'extra.pth', 'unexpected keys', 'dist_token')
    (tmp_path/'junk.pth').write_bytes(b'garbage' * 10)
    _expect_error(tmp_path/'junk.pth', 'unreadable checkpoint')
    torch.save({'optimizer': {}}, tmp_path/'other.pth')
    _expect_error(tmp_path/'other.pth', '"teacher"', 'model_state_dict')

def test_virtues_without_markers_is_an_error(tmp_path):
    "An official file (no learned marker table) without its ESM directory fails, naming the file; random is opt-in."
    _, sd, _ = _virtues_file(tmp_path)
    write_safetensors(sd, tmp_path/'official.safetensors')
    with pytest.raises(CheckpointError, match=r'official\.safetensors: no ESM marker embeddings'):
        load_virtues(tmp_path/'official.safetensors')
    with pytest.warns(UserWarning, match='marker identity is random'):
        enc = load_virtues(tmp_path/'official.safetensors', random_markers=True)
    assert enc.in_chans == 16
