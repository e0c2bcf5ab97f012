"Pretraining: MAE steps learn, masks hide what they hide, learners pick the model's loss, resuming, the probe."
import numpy as np, pytest, torch
from conftest import two_tissue_cohort
from spseg.data import sp_stats, list_tissues, write_tissue, TileDataset, IGNORE_INDEX
from spseg.encoders import VirTuesEncoder, CellViTEncoder
from spseg.pretrain import (VirTuesMAE, ViTMAE, mse_all_pixels, mse_masked_patches, tile_bank, BankTiles, mae_learner,
                            fit_resumable, probe_tokens, linear_probe)

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
        loss = mse_all_pixels(mae(x))
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

def test_virtues_mae_patch4():
    mae = VirTuesMAE(VirTuesEncoder('tiny', patch=4))
    pred, target = mae(torch.randn(1, 16, 24, 24))
    assert pred.shape == target.shape == (1, 16, 6, 6, 16)

def test_vit_mae_step():
    torch.manual_seed(0)
    mae = ViTMAE(CellViTEncoder('tiny'))
    pred, target, masked = mae(torch.randn(2, 3, 64, 64))
    assert pred.shape == target.shape == (2, 16, 768) and masked.sum(1).tolist() == [12, 12]
    mse_masked_patches((pred, target, masked)).backward()

def test_each_mae_names_its_loss():
    assert VirTuesMAE.loss_func is mse_all_pixels and ViTMAE.loss_func is mse_masked_patches
    bank = torch.randn(6, 16, 32, 32).half()
    learn = mae_learner(VirTuesMAE(VirTuesEncoder('tiny')), BankTiles(bank[:4]), BankTiles(bank[4:], False), bs=2)
    assert learn.loss_func is mse_all_pixels

@pytest.fixture
def cohort(tmp_path):
    paths = two_tissue_cohort(tmp_path/'cohort', 240, 120)
    return TileDataset(paths, sp_stats(tmp_path/'cohort', ['t0']), margin=0)

def test_tile_bank_and_bank_tiles(cohort):
    sp, he = tile_bank(cohort, [0, 3], 'sp'), tile_bank(cohort, modality='he')
    assert sp.shape == (2, 16, 120, 120) and sp.dtype == torch.float16 and he.shape == (4, 3, 120, 120)
    x, y = BankTiles(he, augment=False, scale=2)[1]
    assert x is y and x.shape == (3, 240, 240)
    torch.manual_seed(0)
    assert BankTiles(sp, crop=40)[0][0].shape == (16, 40, 40)

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
