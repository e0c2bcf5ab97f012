"Decoder: output shapes for every patch size and all options, CellViT structure, decoders for encoders, bad inputs."
import pytest, torch
from spseg.decoder import (CellViTDecoder, decoder_preset, decoder_for, n_params, params_by_part, trunk_layout,
                           cellvit_to_spseg_keys, upsample_plan, CELLVIT_BRANCHES, PATCH_SIZES)
from spseg.encoders import VirTuesEncoder, CellViTEncoder

HEADS3 = dict(types=10, binary=2, hv=2)

def _inputs(patch, grid=3, embed=32, chans=16, b=2):
    x = torch.randn(b, chans, grid * patch, grid * patch)
    return x, [torch.randn(b, embed, grid, grid) for _ in range(4)]

CONFIGS = [  # (patch, chans, skips, shared, attention): each option seen with several patch sizes
    (8, 16, True, False, None), (16, 3, True, False, None), (8, 16, False, False, None), (16, 3, False, True, None),
    (8, 16, True, True, 'global'), (16, 3, True, False, 'global'), (8, 16, True, False, 'masked'),
    (16, 3, False, True, 'masked'), (8, 16, False, True, 'masked'), (4, 16, True, False, None),
    (2, 16, True, False, None), (4, 16, False, True, 'masked'), (2, 5, True, True, 'global'),
    (4, 3, True, False, 'masked')]

@pytest.mark.parametrize('patch,chans,skips,shared,attention', CONFIGS)
def test_output_shapes(patch, chans, skips, shared, attention):
    heads = dict(HEADS3, boundary=1)
    dec = CellViTDecoder(heads, embed_dim=32, patch_size=patch, in_chans=chans, skips=skips,
                         shared_trunk=shared, attention=attention, width=0.125)
    x, z = _inputs(patch, chans=chans)
    out = dec(x if skips else None, z)
    H = 3 * patch
    for h, c in heads.items(): assert out[h].shape == (2, c, H, H), h
    fg = [k for k in out if k.endswith('_foreground')]
    assert len(fg) == (0 if attention != 'masked' else 1 if shared else 3)
    for k in fg: assert out[k].shape == (2, 1, H, H)
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    # masked attention may see no foreground
    assert all(p.grad is not None for n, p in dec.named_parameters() if 'masked_attention' not in n)

def test_tile_sizes():
    "120×120 SP tiles give 15×15 tokens; 240×240 H&E at 16 px gives the same grid."
    dec8 = CellViTDecoder(dict(types=10), embed_dim=16, patch_size=8, in_chans=16, width=0.125)
    x, z = torch.randn(1, 16, 120, 120), [torch.randn(1, 16, 15, 15)] * 4
    assert dec8(x, z)['types'].shape == (1, 10, 120, 120)
    dec16 = CellViTDecoder(dict(types=10), embed_dim=16, patch_size=16, in_chans=3, width=0.125)
    assert dec16(torch.randn(1, 3, 240, 240), z)['types'].shape == (1, 10, 240, 240)

def test_noskip_uses_only_final_embedding():
    dec = CellViTDecoder(dict(types=10), embed_dim=16, patch_size=8, skips=False, width=0.125).eval()
    x, z = _inputs(8, embed=16)
    a = dec(None, z)['types']
    z2 = [torch.randn_like(s) for s in z[:3]] + [z[3]]
    assert torch.equal(a, dec(x, z2)['types'])
    assert torch.equal(a, dec(None, z[3])['types'])
    assert not any(n.startswith('decoder') for n, _ in dec.named_children())

def test_skips_matter():
    dec = CellViTDecoder(dict(types=10), embed_dim=16, patch_size=8, width=0.125).eval()
    x, z = _inputs(8, embed=16)
    z2 = [torch.randn_like(z[0])] + z[1:]
    assert not torch.equal(dec(x, z)['types'], dec(x, z2)['types'])

def test_cellvit_parameter_count():
    "CellViT-256, PanNuke branches: 46,750,349 total minus 21,672,979 for the encoder (with its tissue head)."
    dec = CellViTDecoder(dict(binary=2, hv=2, types=6), embed_dim=384, patch_size=16, in_chans=3)
    assert n_params(dec) == 25_077_370
    parts = params_by_part(dec)
    assert list(parts) == ['decoder0', 'decoder1', 'decoder2', 'decoder3',
                           'binary_decoder', 'hv_decoder', 'types_decoder']
    assert parts['binary_decoder'] == parts['hv_decoder'] == parts['types_decoder'] - 4 * 65

def test_cellvit_module_names():
    dec = CellViTDecoder(dict(types=6), embed_dim=384, patch_size=16, in_chans=3)
    names = [n for n, _ in dec.types_decoder.named_children()]
    assert names == ['bottleneck_upsampler', 'decoder3_upsampler', 'decoder2_upsampler', 'decoder1_upsampler',
                     'decoder0_header']
    sd = dec.state_dict()
    for k in ['decoder0.0.block.0.weight', 'decoder1.2.block.1.weight', 'decoder3.0.block.2.running_mean',
              'types_decoder.bottleneck_upsampler.weight', 'types_decoder.decoder3_upsampler.3.weight',
              'types_decoder.decoder0_header.2.weight']:
        assert k in sd, k
    assert sd['types_decoder.bottleneck_upsampler.weight'].shape == (384, 312, 2, 2)   # ConvTranspose2d(384→312)
    assert sd['types_decoder.decoder0_header.2.weight'].shape == (6, 64, 1, 1)

def test_cellvit_key_mapping():
    dec = CellViTDecoder(dict(binary=2, hv=2, types=6), embed_dim=384, patch_size=16, in_chans=3, width=0.125)
    back = {f'{v}_decoder': f'{k}_decoder' for k, v in CELLVIT_BRANCHES.items()}
    rename = lambda k: '.'.join([back.get(k.split('.')[0], k.split('.')[0])] + k.split('.')[1:])
    theirs = {rename(k): v for k, v in dec.state_dict().items()}
    theirs['encoder.head.weight'] = torch.zeros(19, 384)
    mapped = cellvit_to_spseg_keys(theirs)
    assert set(mapped) == set(dec.state_dict())
    dec.load_state_dict(mapped)

def test_8px_replaces_one_transposed_conv_per_stage():
    dec = CellViTDecoder(dict(types=10), embed_dim=512, patch_size=8, width=0.125)
    conv_t = lambda m: sum(isinstance(l, torch.nn.ConvTranspose2d) for l in m.modules())
    assert [conv_t(getattr(dec, f'decoder{i}')) for i in (1, 2, 3)] == [2, 1, 0]
    assert not isinstance(dec.types_decoder.bottleneck_upsampler, torch.nn.ConvTranspose2d)
    assert dec.types_decoder.bottleneck_upsampler.kernel_size == (1, 1)
    assert conv_t(dec.types_decoder) == 3
    dec16 = CellViTDecoder(dict(types=10), embed_dim=512, patch_size=16, width=0.125)
    assert [conv_t(getattr(dec16, f'decoder{i}')) for i in (1, 2, 3)] == [3, 2, 1] and conv_t(dec16.types_decoder) == 4

@pytest.mark.parametrize('patch,paths,trunk', [(16, [3, 2, 1], 4), (8, [2, 1, 0], 3), (4, [1, 0, 0], 2),
                                               (2, [0, 0, 0], 1)])
def test_transposed_convs_per_patch_size(patch, paths, trunk):
    "Each halving of the patch turns the earliest remaining doubling (trunk and skip paths alike) into a 1×1 conv."
    dec = CellViTDecoder(dict(types=10), embed_dim=32, patch_size=patch, width=0.125)
    conv_t = lambda m: sum(isinstance(l, torch.nn.ConvTranspose2d) for l in m.modules())
    assert [conv_t(getattr(dec, f'decoder{i}')) for i in (1, 2, 3)] == paths and conv_t(dec.types_decoder) == trunk
    assert 2 ** sum(upsample_plan(patch)) == patch

def test_8px_is_the_studys_adaptation():
    "Same parameter names and shapes as before the generalisation: 8 px keeps only the bottleneck and first deconvs."
    dec = CellViTDecoder(dict(binary=2, hv=2, types=6), embed_dim=384, patch_size=8, in_chans=3)
    # a 2×2 transposed conv replaced by a 1×1 conv saves 3 weights per (in, out) pair: 3 trunk bottlenecks, 3 paths
    assert n_params(dec) == 25_077_370 - 3 * (3 * 384 * 312) - 3 * 384 * (256 + 256 + 312) == 23_049_850
    sd = dec.state_dict()
    assert sd['types_decoder.bottleneck_upsampler.weight'].shape == (312, 384, 1, 1)
    assert sd['decoder1.0.block.0.weight'].shape == (256, 384, 1, 1)
    assert sd['types_decoder.decoder3_upsampler.3.weight'].shape == (312, 256, 2, 2)

def test_decoder_for_encoders():
    "decoder_for takes embed_dim, in_chans and patch_size from the encoder; logits come at the encoder's input size."
    cases = [(VirTuesEncoder('tiny', patch=4), 120), (VirTuesEncoder('tiny'), 120),
             (VirTuesEncoder('tiny', patch=16), 240), (CellViTEncoder('tiny'), 120)]
    for enc, tile in cases:
        enc.eval()
        sp, he = torch.randn(1, 16, tile, tile), torch.randn(1, 3, tile, tile)
        dec = decoder_for(enc, heads=dict(types=10, binary=2)).eval()
        assert (dec.embed_dim, dec.in_chans, dec.patch_size) == (enc.embed_dim, enc.in_chans, enc.patch_size)
        with torch.no_grad():
            s = enc.states(sp=sp, he=he)
            out = dec(enc.encoder_input(sp=sp, he=he), s)
            listed = dec(enc.encoder_input(sp=sp, he=he), [*s[:, 1:].unbind(1), s[:, 0]])
        side = tile * enc.input_scale
        assert out['types'].shape == (1, 10, side, side) and out['binary'].shape == (1, 2, side, side)
        assert torch.equal(out['types'], listed['types'])
    assert decoder_for(VirTuesEncoder('tiny'), 'paper', heads=dict(types=10)).widths == decoder_preset(
        'paper', embed_dim=64).widths
    with pytest.raises(ValueError, match='come.s. from the encoder'): decoder_for(VirTuesEncoder('tiny'), in_chans=3)

def test_shared_trunk_is_smaller():
    sep = CellViTDecoder(HEADS3, embed_dim=64, width=0.25)
    shr = CellViTDecoder(HEADS3, embed_dim=64, width=0.25, shared_trunk=True)
    assert list(trunk_layout(HEADS3, True)) == ['shared']
    t = n_params(sep.types_decoder)
    assert n_params(sep) - n_params(shr) == pytest.approx(2 * t, rel=0.01)

def test_presets():
    tiny = decoder_preset('tiny', embed_dim=64, heads=dict(types=10))
    paper = decoder_preset('paper', embed_dim=64, heads=dict(types=10))
    assert n_params(tiny) < n_params(paper) / 10

@pytest.mark.parametrize('bad,msg', [
    (dict(patch_size=14), 'patch_size'), (dict(patch_size=32), r'\(2, 4, 8, 16\)'),
    (dict(attention='local'), 'attention'), (dict(heads=dict(boundary=1)), 'auxiliary')])
def test_bad_config(bad, msg):
    with pytest.raises(ValueError, match=msg): CellViTDecoder(**{'embed_dim': 16, **bad})

def test_bad_inputs():
    dec = CellViTDecoder(dict(types=10), embed_dim=16, patch_size=8, width=0.125)
    x, z = _inputs(8, embed=16)
    with pytest.raises(ValueError, match='x_img is needed'): dec(None, z)
    with pytest.raises(ValueError, match='x_img has shape'): dec(x[..., :-8], z)
    with pytest.raises(ValueError, match='one shape'): dec(x, z[:3] + [torch.randn(2, 16, 4, 4)])
    with pytest.raises(ValueError, match='4 encoder states'): dec(x, z[:2])
