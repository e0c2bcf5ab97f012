"Whole-tissue prediction of `spseg.inference`: a run's model loaded back, tiles stitched exactly, edges cropped."
import warnings
import numpy as np, pytest, torch, torch.nn as nn
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
from spseg.data import TileDataset, list_tissues, sp_stats
from spseg.synthetic import make_cohort
from spseg.metrics import confusion
from spseg.experiments import preset_config, run_experiment, run_data, make_encoder
from spseg.inference import (run_config, load_run_model, activate, tile_layout, predict_batches, paste,
                             predict_tissues)

torch.set_num_threads(2)


class Toy(nn.Module):
    "A model on raw tiles `(sp, he)`: 10-class logits from SP, an HV map from RGB, a 1-channel logit head."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.types, self.hv, self.boundary = nn.Conv2d(16, 10, 3, padding=1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 1, 1)
    def forward(self, sp, he): return dict(types=self.types(sp), hv=self.hv(he), boundary=self.boundary(he))


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
    "Three tissues of 250×170 px: 3×2 tiles of 120 px each, the last row 10 px and the last column 50 px inside."
    root = tmp_path_factory.mktemp('cohort')
    make_cohort(root, n_tissues=3, size=(250, 170), seed=2, progress=False)
    return root


@pytest.fixture(scope='module')
def raw_ds(cohort):
    paths = list_tissues(cohort)
    return TileDataset(paths, sp_stats(cohort, [p.name for p in paths]))


def test_paste_crops_at_the_edge():
    canvas = np.zeros((2, 5, 7), np.float32)
    tile = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    paste(canvas, tile, 2, 4)
    assert np.array_equal(canvas[:, 2:, 4:], tile[:, :3, :3])
    assert canvas[:, :2].sum() == 0 and canvas[:, :, :4].sum() == 0
    paste(canvas, tile, 0, 0)
    assert np.array_equal(canvas[:, :4, :4], tile)


def test_activate():
    out = activate(dict(types=torch.randn(2, 10, 3, 3), hv=torch.randn(2, 2, 3, 3) * 5, fg=torch.randn(2, 1, 3, 3)))
    assert torch.allclose(out['types'].sum(1), torch.ones(2, 3, 3))
    assert out['hv'].abs().max() > 1 and ((out['fg'] > 0) & (out['fg'] < 1)).all()


def test_stitching_reproduces_tile_outputs_exactly(raw_ds):
    maps = predict_tissues(Toy(), raw_ds, bs=4)
    tissues, layout, s = tile_layout(raw_ds)
    assert list(maps) == [t.id for t in tissues] and len(layout) == 3 * 6
    tile_out = {}
    for idx, out in predict_batches(Toy(), raw_ds, bs=4):
        for k, i in enumerate(idx): tile_out[i] = {h: v[k].numpy() for h, v in out.items()}
    for i, (ti, y, x) in enumerate(layout):
        t = tissues[ti]
        vh, vw = min(s, t.shape[0] - y), min(s, t.shape[1] - x)
        for head, m in maps[t.id].items():
            assert m.dtype == np.float32 and m.shape == (tile_out[i][head].shape[0], 250, 170)
            assert np.array_equal(m[:, y:y + vh, x:x + vw], tile_out[i][head][:, :vh, :vw])
    # every pixel of every tissue was written (softmax sums to 1 everywhere), padding dropped
    for t in tissues: assert np.allclose(maps[t.id]['types'].sum(0), 1, atol=1e-5)


def test_padded_edge_tile_is_cropped(raw_ds):
    "The bottom-right tile of a tissue: its 10×50 px inside the tissue are kept, the 110/70 px of padding dropped."
    maps = predict_tissues(Toy(), raw_ds, bs=5, heads=('hv',))
    tissues, layout, _ = tile_layout(raw_ds)
    i = layout.index((0, 240, 120))
    sp, he, *_ = raw_ds[i]
    with torch.no_grad(): hv = Toy()(sp[None], he[None])['hv'][0].numpy()
    m = maps[tissues[0].id]
    assert set(m) == {'hv'} and m['hv'].shape == (2, 250, 170)
    assert np.allclose(m['hv'][:, 240:, 120:], hv[:, :10, :50], atol=1e-5)
    assert not np.allclose(hv[:, 10:, 50:], 0)                    # the model did output something on the padding


def test_batch_size_does_not_matter(raw_ds):
    a, b = predict_tissues(Toy(), raw_ds, bs=1), predict_tissues(Toy(), raw_ds, bs=7)
    for tid in a:
        for head in a[tid]: assert np.allclose(a[tid][head], b[tid][head], atol=1e-5)


def test_load_run_model_and_predict_the_held_out_tissue(cohort, tmp_path):
    cfg = preset_config('tiny', name='inf', root=str(cohort), split='holdout', epochs=1)
    res = run_experiment(cfg, tmp_path/'runs', cache_dir=tmp_path/'caches')
    run_dir = tmp_path/'runs'/cfg.run_name
    assert run_config(run_dir) == cfg
    enc = make_encoder(cfg)
    model = load_run_model(run_dir, enc)
    saved = torch.load(run_dir/'best.pth', weights_only=True)
    assert not model.training and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    _, valid, *_ = run_data(cfg, tmp_path/'caches', enc)
    maps = predict_tissues(model, valid)
    (t,) = tile_layout(valid)[0]
    assert maps[t.id]['types'].shape == (10, 250, 170)
    cm = confusion(torch.from_numpy(maps[t.id]['types'].argmax(0)), torch.from_numpy(np.array(t.mask)))
    assert np.asarray(cm).tolist() == res['confusion']             # stitched tissue = the run's tile-wise scoring
    with pytest.raises(FileNotFoundError, match='config.json'): load_run_model(tmp_path)
    (tmp_path/'unfinished').mkdir()
    (tmp_path/'unfinished'/'config.json').write_text(cfg.to_json())
    with pytest.raises(FileNotFoundError, match='best.pth'): load_run_model(tmp_path/'unfinished')
