"Encoders: shapes, parameter counts, the modality interface both encoders share, bad inputs."
import pytest, torch
from spseg.data import MARKERS
from spseg.encoders import VirTuesEncoder, CellViTEncoder, encoder_params, he_for_vit, HE_SCALE

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
    assert encoder_params(v) == 34_008_064            # without the marker table (learned: +16*640)
    assert encoder_params(v, skip=()) == 34_008_064 + 16 * 640
    assert encoder_params(vit) == 21_665_664          # CellViT's 21,672,979 adds its 19-class tissue head: 384*19+19
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

# ---------- the modality interface

def test_interface_attributes():
    with torch.device('meta'):
        v, t = VirTuesEncoder('paper'), CellViTEncoder('paper')
    assert (v.modality, v.in_chans, v.patch_size, v.embed_dim, v.input_scale) == ('sp', 16, 8, 512, 1)
    assert (t.modality, t.in_chans, t.patch_size, t.embed_dim, t.input_scale) == ('he', 3, 16, 384, HE_SCALE)
    assert v.state_names == ['final', 'skip4', 'skip8', 'skip12', 'skip16']
    assert t.state_names == ['final', 'skip3', 'skip6', 'skip9', 'skip12']
    assert v.token_grid(120) == t.token_grid(120) == 15
    assert VirTuesEncoder('tiny', marker_names=MARKERS[2:9]).in_chans == 7
    assert CellViTEncoder('tiny', input_scale=1).token_grid(256) == 16

@pytest.mark.parametrize('make', [lambda: VirTuesEncoder('tiny'), lambda: CellViTEncoder('tiny')])
def test_states_and_input(make):
    "`states` stacks [final] + skips of the encoder's own image as `embed` gives them; `encoder_input` is that image."
    torch.manual_seed(0)
    enc = make().eval()
    sp, he = torch.randn(2, 16, 120, 120), torch.randn(2, 3, 120, 120)
    x = enc.encoder_input(sp=sp, he=he)
    assert x.shape == (2, enc.in_chans, 120 * enc.input_scale, 120 * enc.input_scale)
    with torch.no_grad():
        s = enc.states(sp=sp, he=he)
        final, skips = enc.embed(x)
    g = enc.token_grid(120)
    assert s.shape == (2, len(enc.state_names), enc.embed_dim, g, g)
    torch.testing.assert_close(s, torch.stack([final, *skips], 1))

def test_encoder_input_is_the_he_resize():
    t = CellViTEncoder('tiny')
    he = torch.randn(1, 3, 120, 120)
    torch.testing.assert_close(t.encoder_input(he=he), he_for_vit(he, HE_SCALE))
    sp = torch.randn(1, 16, 120, 120)
    assert VirTuesEncoder('tiny').encoder_input(sp=sp, he=he) is sp

def test_missing_modality():
    with pytest.raises(ValueError, match="VirTuesEncoder reads 'sp' images: pass sp="):
        VirTuesEncoder('tiny').states(he=torch.randn(1, 3, 120, 120))
    with pytest.raises(ValueError, match="CellViTEncoder reads 'he' images: pass he="):
        CellViTEncoder('tiny').encoder_input(sp=torch.randn(1, 16, 120, 120))

@pytest.mark.parametrize('patch,tile,grid', [(4, 120, 30), (8, 120, 15), (2, 24, 12), (16, 240, 15)])
def test_virtues_patch_sizes(patch, tile, grid):
    enc = VirTuesEncoder('tiny', patch=patch).eval()
    assert enc.patch_size == patch and enc.token_grid(tile) == grid
    with torch.no_grad(): s = enc.states(sp=torch.randn(1, 16, tile, tile))
    assert s.shape == (1, 5, 64, grid, grid)

def test_token_grid_refuses_partial_patches():
    msg = 'a 120-px tile is 120 px at input scale ×1, not a multiple of the 16-px patch'
    with pytest.raises(ValueError, match=msg):
        VirTuesEncoder('tiny', patch=16).token_grid(120)
    with pytest.raises(ValueError, match='a 100-px tile is 200 px at input scale ×2, not a multiple of the 16-px'):
        CellViTEncoder('tiny').token_grid(100)

def test_bad_inputs():
    enc = VirTuesEncoder('tiny')
    with pytest.raises(ValueError, match='not a multiple of the 8-px patch'): enc(torch.randn(1, 16, 100, 100))
    with pytest.raises(ValueError, match='outside 1..4'): enc(torch.randn(1, 16, 16, 16), depths=(5,))
    with pytest.raises(ValueError, match='unknown marker'): enc(torch.randn(1, 1, 16, 16), markers=['CD99'])
    with pytest.raises(ValueError, match='esm must be'): VirTuesEncoder('tiny', esm=torch.zeros(16, 64))
    with pytest.raises(ValueError, match='unknown preset'): CellViTEncoder('huge')
    with pytest.raises(ValueError, match='not a multiple of the 16-px patch'):
        CellViTEncoder('tiny')(torch.randn(1, 3, 40, 40))

# ---------- fusion: both encoders on one tile

from spseg.encoders import FusionEncoder, FusionConfig, fusion_encoder

def _fusion(seed=0):
    torch.manual_seed(seed)
    return fusion_encoder('tiny').eval()

def test_fusion_interface():
    with torch.device('meta'): f = fusion_encoder('paper')
    assert (f.modality, f.modalities, f.in_chans, f.patch_size, f.input_scale) == ('sp+he', ('sp', 'he'), 19, 8, 1)
    assert f.embed_dim == 512 + 384 and f.token_grid(120) == f.sp.token_grid(120) == f.he.token_grid(120) == 15
    assert f.state_names == f.sp.state_names and set(f.parts) == {'sp', 'he'}
    assert f.cfg == FusionConfig(f.sp.cfg, f.he.cfg, (1, HE_SCALE))
    assert encoder_params(f) == encoder_params(f.sp) + encoder_params(f.he)
    for e in (f.sp, f.he): assert e.modalities == (e.modality,) and e.parts == {e.modality: e}

def test_fusion_states_are_the_parts_states():
    "Exactly: each part runs on its own image at its own scale, as it would alone."
    f = _fusion()
    sp, he = torch.randn(3, 16, 120, 120), torch.randn(3, 3, 120, 120)
    x = f.encoder_input(sp=sp, he=he)
    assert x.shape == (3, 19, 120, 120) and torch.equal(x, torch.cat([sp, he], 1))
    with torch.no_grad(): s, ssp, she = f.states(sp=sp, he=he), f.sp.states(sp=sp), f.he.states(he=he)
    assert s.shape == (3, 5, 128, 15, 15)
    assert torch.equal(s, torch.cat([ssp, she], 2))
    assert torch.equal(s[:, :, :64], ssp) and torch.equal(s[:, :, 64:], she)

def test_fusion_refuses_mismatched_parts():
    vit = CellViTEncoder('tiny')
    with pytest.raises(ValueError, match='VirTuesEncoder and CellViTEncoder make different token grids'):
        FusionEncoder(VirTuesEncoder('tiny', patch=4), vit)
    with pytest.raises(ValueError, match='one token covers 8 and 16 tile px'):
        FusionEncoder(VirTuesEncoder('tiny'), CellViTEncoder('tiny', input_scale=1))
    with pytest.raises(ValueError, match='takes an SP then an H&E encoder'):
        FusionEncoder(vit, VirTuesEncoder('tiny'))
    with pytest.raises(ValueError, match='takes an SP then an H&E encoder'):
        FusionEncoder(VirTuesEncoder('tiny'), VirTuesEncoder('tiny'))
    with pytest.raises(ValueError, match='different numbers of states'):
        FusionEncoder(VirTuesEncoder('tiny'), CellViTEncoder('tiny', skip_blocks=(4,)))

def test_fusion_refuses_bad_inputs():
    f = _fusion()
    sp, he = torch.randn(1, 16, 120, 120), torch.randn(1, 3, 120, 120)
    with pytest.raises(ValueError, match="FusionEncoder reads 'sp' and 'he' images: pass he="): f.states(sp=sp)
    with pytest.raises(ValueError, match="FusionEncoder reads 'sp' and 'he' images: pass sp="): f.encoder_input(he=he)
    with pytest.raises(ValueError, match='FusionEncoder reads 19 channels, got 20'): f(torch.randn(1, 20, 120, 120))
    with pytest.raises(ValueError, match='not a multiple of the 8-px patch'): f.token_grid(100)

def test_fusion_feeds_the_decoder():
    "decoder_for reads the fusion's width, channels and patch; the decoder gives logits at the tile's 120×120 grid."
    from spseg.decoder import decoder_for
    from spseg.train import DecoderOnStates, EncoderDecoder
    f = _fusion()
    dec = decoder_for(f, 'tiny')
    assert (dec.embed_dim, dec.in_chans, dec.patch_size) == (128, 19, 8)
    sp, he = torch.randn(2, 16, 120, 120), torch.randn(2, 3, 120, 120)
    head = DecoderOnStates(dec, f.input_scale).eval()
    with torch.no_grad():
        s = f.states(sp=sp, he=he)
        out = head(f.encoder_input(sp=sp, he=he), *s[:, 1:].unbind(1), s[:, 0])
        end = EncoderDecoder(f, dec).eval()(sp, he)
    assert out and all(v.shape[0] == 2 and v.shape[-2:] == (120, 120) for v in out.values())
    for k in out: torch.testing.assert_close(end[k], out[k])
