"Pretraining: MAE steps learn, masks hide what they hide, targets, resuming, checkpoints in the published formats, the CLI."
import subprocess, sys
import numpy as np, pytest, torch
from fastai.callback.core import Callback
from conftest import two_tissue_cohort
from spseg.data import sp_stats, TileDataset, IGNORE_INDEX
from spseg.encoders import VirTuesEncoder, CellViTEncoder
from spseg.checkpoints import load_virtues, load_cellvit_vit256, read_safetensors, official_virtues_key
from spseg.pretrain import (VirTuesMAE, ViTMIM, ViTToSP, mse_recon, patch_targets, neighbourhoods, tile_bank, BankTiles,
                            mae_learner, fit_resumable, probe_tokens, linear_probe, pretrain_encoder,
                            ResumableCheckpoint)

def test_virtues_mae_step():
    torch.manual_seed(0)
    mae = VirTuesMAE(VirTuesEncoder('tiny'))
    x = torch.randn(2, 16, 32, 32)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(1)                     # the same mask every step: a pure optimisation check
        loss = mse_recon(mae(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # masked tokens excluded from attention: changing a masked patch does not change the PSS grid
    enc = mae.encoder.eval()
    m = torch.zeros(1, 16, 4, 4, dtype=torch.bool)
    m[0, 3, 1, 2] = True
    y = x[:1].clone()
    y[0, 3, 8:16, 16:24] += 5
    with torch.no_grad(): torch.testing.assert_close(enc(x[:1], mask=m)[0], enc(y, mask=m)[0])

def test_virtues_mask_ratio_and_whole_channels():
    torch.manual_seed(0)
    mae = VirTuesMAE(VirTuesEncoder('tiny'), ratio=(.3, .6), channel_p=0)
    frac = mae.sample_mask(8, 16, 10, 10).float().mean((2, 3))
    assert (frac >= .3).all() and (frac <= .6).all()
    mae.channel_p = 1.
    assert mae.sample_mask(2, 16, 4, 4).all()

def test_virtues_mae_patch4_and_targets():
    mae = VirTuesMAE(VirTuesEncoder('tiny', patch=4), target='pixels')
    x = torch.randn(1, 16, 24, 24)
    pred, target = mae(x)
    assert pred.shape == target.shape == (1, 16, 6, 6, 16)
    assert torch.equal(target[0, 2, 1, 3], x[0, 2, 4:8, 12:16].reshape(-1))
    means = patch_targets(x, 4)
    assert torch.allclose(means[0, 2, 1, 3], x[0, 2, 4:8, 12:16].mean().expand(16))

def test_vit_mim_step():
    torch.manual_seed(0)
    mae = ViTMIM(CellViTEncoder('tiny'))
    x = torch.randn(2, 3, 64, 64)
    pred, target = mae(x)
    assert pred.shape == target.shape == (2, 16, 432)
    assert torch.equal(target, neighbourhoods(x, 16))
    mse_recon((pred, target)).backward()
    assert mae.encoder.patch_embed.proj.weight.grad.abs().sum() > 0

def test_vit_to_sp_reads_he_and_predicts_the_markers():
    torch.manual_seed(0)
    mae = ViTToSP(CellViTEncoder('tiny'), k=3)
    x = torch.randn(2, 19, 64, 64)
    pred, target = mae(x)
    assert pred.shape == target.shape == (2, 16, 16 * 9)
    centre = target.view(2, 16, 16, 3, 3)[:, 5, :, 1, 1]                      # token (1, 1): its own 16-px patch
    assert torch.allclose(centre, x[:, 3:, 16:32, 16:32].mean((-2, -1)), atol=1e-6)
    y = x.clone()
    y[:, 3:] += torch.randn_like(y[:, 3:])                                    # other markers: same prediction
    assert torch.equal(mae(y)[0], pred)
    y[:, :3] += 1                                                             # other H&E: another prediction
    assert not torch.allclose(mae(y)[0], pred)

def test_vit_to_sp_learns_markers_that_follow_the_stain():
    "When a marker is the H&E's first channel averaged per patch, a few steps make the prediction closer."
    torch.manual_seed(0)
    mae = ViTToSP(CellViTEncoder('tiny'))
    he = torch.randn(4, 3, 32, 32)
    x = torch.cat([he, he[:, :1].expand(-1, 16, -1, -1)], 1)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = mse_recon(mae(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

def test_each_mae_names_its_loss():
    assert VirTuesMAE.loss_func is mse_recon and ViTMIM.loss_func is mse_recon
    bank = torch.randn(6, 16, 32, 32).half()
    learn = mae_learner(VirTuesMAE(VirTuesEncoder('tiny')), BankTiles(bank[:4]), BankTiles(bank[4:], False), bs=2)
    assert learn.loss_func is mse_recon
    assert ViTToSP.loss_func is mse_recon

@pytest.fixture
def cohort_dir(tmp_path):
    two_tissue_cohort(tmp_path/'cohort', 240, 120)
    return tmp_path/'cohort'

@pytest.fixture
def cohort(cohort_dir):
    return TileDataset(sorted(cohort_dir.iterdir()), sp_stats(cohort_dir, ['t0']), margin=0)

def test_tile_bank_and_bank_tiles(cohort):
    sp, he = tile_bank(cohort, [0, 3], 'sp'), tile_bank(cohort, modality='he')
    assert sp.shape == (2, 16, 120, 120) and sp.dtype == torch.float16 and he.shape == (4, 3, 120, 120)
    x, y = BankTiles(he, augment=False, scale=2)[1]
    assert x is y and x.shape == (3, 240, 240)
    torch.manual_seed(0)
    assert BankTiles(sp, crop=40)[0][0].shape == (16, 40, 40)
    paired = tile_bank(cohort, [0, 3], ('he', 'sp'))
    assert paired.shape == (2, 19, 120, 120) and torch.equal(paired[:, 3:], sp) and torch.equal(paired[:, :3], he[[0, 3]])
    torch.manual_seed(1)
    x = BankTiles(paired, crop=48)[0][0]                                       # one crop, flip and turn for both
    views = lambda t: {(y0, x0, f, r): torch.rot90(c.flip(-1) if f else c, r, (-2, -1))
                       for y0 in range(0, 73, 8) for x0 in range(0, 73, 8) for f in (0, 1) for r in range(4)
                       for c in [t[:, y0:y0 + 48, x0:x0 + 48].float()]}
    found = [k for k, v in views(paired[0, :3]).items() if torch.equal(v, x[:3])]
    assert found and torch.equal(views(paired[0, 3:])[found[0]], x[3:])

def test_fit_resumable(tmp_path):
    bank = torch.randn(6, 16, 32, 32).half()
    def learner():
        torch.manual_seed(0)
        return mae_learner(VirTuesMAE(VirTuesEncoder('tiny')), BankTiles(bank[:4]), BankTiles(bank[4:], False), bs=2)
    ck = tmp_path/'ck.pth'
    with (l1 := learner()).no_bar(): assert fit_resumable(l1, 1, 1e-3, ck) == 1
    with (l2 := learner()).no_bar(): assert fit_resumable(l2, 2, 1e-3, ck) == 1
    assert torch.load(ck, weights_only=False)['epochs_done'] == 2
    assert [p.name for p in tmp_path.iterdir()] == ['ck.pth']
    with (l3 := learner()).no_bar(): assert fit_resumable(l3, 2, 1e-3, ck, meta='other run') == 2

@pytest.mark.parametrize('make,step', [(lambda: VirTuesEncoder('tiny'), 8), (lambda: CellViTEncoder('tiny'), 8),
                                       (lambda: VirTuesEncoder('tiny', patch=4), 4)])
def test_probe_tokens(cohort, make, step):
    "Each token is labelled by the class at the centre of its tile area, whatever the encoder's patch and scale."
    f, y = probe_tokens(make(), cohort, [0, 1], bs=1)
    g = 120 // step
    assert f.shape == (2 * g * g, 64) and y.shape == (2 * g * g,)
    want = np.stack([cohort.read(i)[2][step // 2::step, step // 2::step] for i in (0, 1)]).reshape(-1)
    assert np.array_equal(y.numpy(), want)

def test_linear_probe_ignores_padding():
    torch.manual_seed(0)
    x = torch.randn(500, 4)
    y = (x[:, 0] > 0).long()
    y[::5] = IGNORE_INDEX
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) > 0.9

# ---- pretrain_encoder: checkpoints in the published formats, resuming ------------------------------------------

def test_virtues_checkpoint_has_official_keys_and_round_trips(cohort_dir, tmp_path):
    res = pretrain_encoder(cohort_dir, 'virtues', tmp_path/'v.safetensors', epochs=1, split=None)
    sd, meta = read_safetensors(res['path'])
    ours = res['encoder'].state_dict()
    assert set(sd) == {official_virtues_key(k) for k in ours}
    assert 'encoder.encoder.3.encoder_layer.feedforward.3.weight' in sd and 'encoder.marker_embedding' in sd
    loaded = load_virtues(res['path'])
    assert loaded.state_dict().keys() == ours.keys()
    assert all(torch.equal(loaded.state_dict()[k], ours[k]) for k in ours)
    fresh = VirTuesEncoder('tiny')                  # it trained: the weights are not a fresh initialisation's
    assert not torch.equal(fresh.patch_encoder.weight, loaded.patch_encoder.weight)

@pytest.mark.parametrize('recipe', ['cellvit', 'cellvit-mim'])
def test_cellvit_checkpoint_round_trips(cohort_dir, tmp_path, recipe):
    res = pretrain_encoder(cohort_dir, recipe, tmp_path/'vit.pth', epochs=1, split=None)
    loaded, ours = load_cellvit_vit256(res['path']).state_dict(), res['encoder'].state_dict()
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)

class Crash(Callback):
    "Fail after the first epoch, once the state file is written."
    order = ResumableCheckpoint.order + 1
    def after_epoch(self):
        if self.epoch == 0: raise RuntimeError('crash')

def test_resumed_pretraining_continues(cohort_dir, tmp_path):
    out = tmp_path/'v.safetensors'
    state = tmp_path/'.v.safetensors.pretrain.pth'
    with pytest.raises(RuntimeError, match='crash'):
        pretrain_encoder(cohort_dir, out=out, epochs=3, split=None, cbs=[Crash()])
    assert not out.exists() and state.exists()
    st = torch.load(state, weights_only=False)
    assert st['epochs_done'] == 1 and st['n_epoch'] == 3
    res = pretrain_encoder(cohort_dir, out=out, epochs=3, split=None)
    assert (res['epochs'], res['trained']) == (3, 2)
    assert out.exists() and not state.exists()
    saved = {k: v for k, v in st['model'].items() if k.startswith('encoder.')}
    assert any(not torch.equal(v, res['encoder'].state_dict()[k[len('encoder.'):]]) for k, v in saved.items())
    # a finished checkpoint is kept, not trained again
    assert pretrain_encoder(cohort_dir, out=out, epochs=3, split=None)['trained'] == 0

def test_unknown_encoder_is_an_error(cohort_dir, tmp_path):
    with pytest.raises(ValueError, match='encoder must be one of'):
        pretrain_encoder(cohort_dir, 'resnet', tmp_path/'x.pth', epochs=1)

def test_cli_pretrain_writes_a_loadable_checkpoint(cohort_dir, tmp_path):
    out = tmp_path/'cli.safetensors'
    code = 'import sys; from spseg.cli import main; sys.exit(main(sys.argv[1:]))'
    r = subprocess.run([sys.executable, '-c', code, 'pretrain', str(cohort_dir), '--encoder', 'virtues', '--out', str(out),
                        '--minutes', '0.01', '--split', 'all'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    enc = load_virtues(out)
    assert enc.cfg.dim == 64 and enc.marker_names == VirTuesEncoder('tiny').marker_names
