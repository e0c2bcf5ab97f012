"Whole-tissue prediction of `spseg.inference`: a run's model loaded back, tiles stitched exactly, edges cropped."
import warnings
import numpy as np, pytest, torch, torch.nn as nn
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')
from spseg.data import (TileDataset, SPStats, list_tissues, load_tissue, sp_stats, tile_grid, hv_map, write_tissue)
from spseg.decoder import decoder_for
from spseg.train import EncoderDecoder
from spseg.synthetic import make_cohort
from spseg.metrics import confusion
from spseg.experiments import preset_config, run_experiment, run_data, make_encoder
from spseg.inference import (run_config, load_run_model, activate, tile_layout, predict_batches, paste,
                             predict_tissues, window_starts, window_plan, tissue_norm, read_windows, tile_model,
                             predict_tissue, typed_nuclei)

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


# ---- whole tissues without seams (predict_tissue) ----

class Convs(nn.Module):
    "Four 3×3 convolutions on (SP, H&E): a translation-equivariant model seeing 4 px each way; three heads."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(19, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 14, 3, padding=1))
    def forward(self, sp, he):
        y = self.body(torch.cat([sp, he], 1))
        return dict(types=y[:, :10], binary=y[:, 10:12], hv=y[:, 12:])


@pytest.fixture(scope='module')
def stats(cohort): return sp_stats(cohort, [p.name for p in list_tissues(cohort)])


@pytest.fixture(scope='module')
def tissue(cohort): return load_tissue(list_tissues(cohort)[0])


@pytest.mark.parametrize('h,w,tile,margin', [(250, 170, 120, 16), (100, 333, 120, 8), (120, 121, 64, 0),
                                             (1000, 7, 40, 19)])
def test_window_plan_covers_the_tissue_once_with_margin_context(h, w, tile, margin):
    plan = window_plan(h, w, tile, margin)
    cover = np.zeros((h, w), int)
    for y, x, y0, y1, x0, x1 in plan:
        cover[y0:y1, x0:x1] += 1
        assert y <= y0 < y1 <= y + tile and x <= x0 < x1 <= x + tile
        assert (y0 == 0 or y0 - y >= margin) and (y1 == h or y + tile - y1 >= margin)
        assert (x0 == 0 or x0 - x >= margin) and (x1 == w or x + tile - x1 >= margin)
    assert (cover == 1).all()
    if margin == 0: assert np.array_equal(plan[:, :2], tile_grid(h, w, tile))
    with pytest.raises(ValueError, match='margin'): window_starts(h, tile, tile // 2)


def test_windows_read_as_training_tiles(tissue, stats):
    "On the tile grid, a window's SP (own p99, run mean/std, 1-px-halo blur) and H&E are TileDataset's."
    ds = TileDataset([tissue], stats)
    corners = [(0, 0), (120, 120), (240, 0), (0, 120)]
    sp, he = read_windows(tissue, corners, 120, tissue_norm(tissue, stats))
    for k, c in enumerate(corners):
        sp_t, he_t, *_ = ds[ds.tiles.index((0, *c))]
        assert torch.allclose(sp[k], sp_t, atol=1e-5) and torch.equal(he[k], he_t)


def test_no_seams_inside_and_plain_tiling_has_them(tissue, stats):
    conv, m = Convs(), 8
    whole = predict_tissue(conv, tissue, stats, tile=250, margin=0)          # one window: all the context
    over = predict_tissue(conv, tissue, stats, 120, m, bs=4)
    plain = predict_tissue(conv, tissue, stats, 120, 0, bs=4)
    inner = (slice(None), slice(m, -m), slice(m, -m))
    for k in ('types', 'binary', 'hv'):
        assert over[k].shape == (whole[k].shape[0], 250, 170) and over[k].dtype == np.float32
        assert np.allclose(over[k][inner], whole[k][inner], atol=1e-5)
    seam = np.abs(plain['hv'] - whole['hv']).max(0)
    assert seam[118:122, m:-m].max() > 1e-3 and seam[m:-m, 118:122].max() > 1e-3
    assert seam[m:110, m:110].max() < 1e-5


def test_threads_apply_to_the_call_only_and_change_no_number(tissue, stats):
    conv, before = Convs(), torch.get_num_threads()
    seen = []
    conv.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    one = predict_tissue(conv, tissue, stats, threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before
    default = predict_tissue(conv, tissue, stats)
    assert all(np.allclose(one[k], default[k], atol=1e-5) for k in default)


def seam_ratio(m, plan):
    "Mean step between neighbouring pixels across the inner edges of the plan's boxes, over the mean step elsewhere."
    r = []
    for axis, col in ((1, 2), (2, 4)):
        step = np.abs(np.diff(m, axis=axis)).mean(tuple(a for a in range(m.ndim) if a != axis))
        at = np.isin(np.arange(len(step)), np.array(sorted(set(plan[:, col].tolist()) - {0})) - 1)
        r.append((step[at].mean(), step[~at].mean()))
    at, other = np.mean(r, 0)
    return at / other


def test_real_model_default_margin_is_seamless_against_more_context(tissue, stats):
    "Tiny VirTues + decoder: margin 8 (default) agrees with margin 40 to 1e-4 and its box edges step like the rest."
    cfg = preset_config('tiny')
    enc = make_encoder(cfg)
    torch.manual_seed(1)
    model = EncoderDecoder(enc, decoder_for(enc, 'tiny', heads=dict(types=10, binary=2, hv=2), width=cfg.width)).eval()
    ref = predict_tissue(model, tissue, stats, margin=40)
    for m, seamless in ((None, True), (0, False)):
        maps = predict_tissue(model, tissue, stats, bs=8) if m is None else predict_tissue(model, tissue, stats, margin=m)
        plan = window_plan(250, 170) if m is None else window_plan(250, 170, 120, m)
        for k in ('types', 'binary', 'hv'):
            gap, r, r_ref = np.abs(maps[k] - ref[k]).max(), seam_ratio(maps[k], plan), seam_ratio(ref[k], plan)
            if seamless: assert gap < 1e-4 and abs(r - r_ref) < 0.05, (k, gap, r, r_ref)
            else: assert gap > 1e-3 and r > 2 * r_ref, (k, gap, r, r_ref)     # plain tiling: visible seams


def test_real_model_pixels_come_from_the_window_whose_centre_holds_them(tissue, stats):
    cfg = preset_config('tiny')
    enc = make_encoder(cfg)
    torch.manual_seed(1)
    model = EncoderDecoder(enc, decoder_for(enc, 'tiny', heads=dict(types=10, binary=2, hv=2), width=cfg.width)).eval()
    maps = predict_tissue(model, tissue, stats, bs=5)
    norm = tissue_norm(tissue, stats)
    for y, x, y0, y1, x0, x1 in window_plan(250, 170)[[0, 3, 5]]:
        sp, he = read_windows(tissue, [(y, x)], 120, norm, ('sp',))
        with torch.no_grad(): out = activate(model(sp, he))
        for k, v in out.items():
            assert np.allclose(maps[k][:, y0:y1, x0:x1], v[0, :, y0 - y:y1 - y, x0 - x:x1 - x].numpy(), atol=1e-5)
    small = predict_tissue(model, tissue, stats, bs=3, heads=('types', 'hv'), argmax=('types',))
    assert set(small) == {'types', 'types_prob', 'hv'}
    assert small['types'].dtype == np.uint8 and small['types_prob'].dtype == np.float16
    assert np.array_equal(small['types'], maps['types'].argmax(0))
    assert np.allclose(small['types_prob'], maps['types'].max(0), atol=2e-3)


def test_tile_model_joins_a_cached_state_model_to_its_encoder(cohort, tmp_path):
    cfg = preset_config('tiny', name='inf', root=str(cohort), split='holdout', epochs=1)
    enc = make_encoder(cfg)
    from spseg.experiments import make_model
    heads = make_model(cfg, enc)
    m = tile_model(heads, enc)
    assert isinstance(m, EncoderDecoder) and m.head.decoder is heads.decoder and tile_model(m) is m
    with pytest.raises(ValueError, match='encoder'): tile_model(heads)


class Oracle(nn.Module):
    "Pixelwise: binary from the red channel, HV from green/blue, class logits from the first 10 SP channels."
    def forward(self, sp, he):
        return dict(types=sp[:, :10] * 20, binary=torch.cat([-he[:, :1], he[:, :1]], 1) * 20, hv=he[:, 1:])


def test_typed_nuclei_finds_nuclei_cut_by_window_borders_whole(tissue, tmp_path):
    inst_gt, mask = np.asarray(tissue.inst), np.asarray(tissue.mask)
    hv = hv_map(inst_gt)
    he = np.stack([(inst_gt > 0) * 255, (hv[0] + 1) * 127.5, (hv[1] + 1) * 127.5], -1).round().astype(np.uint8)
    sp = (np.arange(16)[:, None, None] == mask[None]).astype(np.float32)
    ot = load_tissue(write_tissue(tmp_path/'o', he, sp, None), require=())
    assert not ot.labelled                                             # prediction needs no labels
    st = SPStats([], {}, [0.0] * 16, [1.0] * 16)
    compact = typed_nuclei(predict_tissue(Oracle(), ot, st, bs=4, p99=np.ones(16), argmax=('types',)))
    full = typed_nuclei({**predict_tissue(Oracle(), ot, st, bs=4, p99=np.ones(16), heads=('types',)),
                         **predict_tissue(Oracle(), ot, st, bs=4, p99=np.ones(16), heads=('binary', 'hv'))})
    inst, table, tmap = compact
    assert np.array_equal(inst, full[0]) and np.array_equal(tmap, full[2]) and tmap.dtype == np.uint8
    assert (table['type'] == full[1]['type']).all() and (table['type_prob'] <= full[1]['type_prob'] + 2e-3).all()
    seams = set(window_plan(250, 170)[:, 2].tolist()) - {0}             # kept-box edges of the 250-px side
    assert seams == {112, 216}                                         # margin 8 by default
    cut = [i for i in np.unique(inst_gt) if i and (inst_gt == i).sum() >= 30
           and any(np.isin(np.nonzero(inst_gt == i)[a], [e - 1 for e in seams]).any()
                   and np.isin(np.nonzero(inst_gt == i)[a], list(seams)).any() for a in (0,))]
    assert cut, 'no nucleus across a window border in the test tissue'
    for i in cut:
        best = np.bincount(inst[inst_gt == i]).argmax()
        assert best > 0 and (inst[inst_gt == i] == best).sum() >= 0.8 * (inst_gt == i).sum()
