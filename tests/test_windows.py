"`sp_window`/`he_window` (spseg.data) give exactly what the two copies they replaced gave, edges and all."
import numpy as np, pytest, tifffile, torch
from hypothesis import given, settings, strategies as st
from spseg.data import (MARKERS, N_MARKERS, SPStats, load_tissue, write_tissue, normalise_he, normalise_sp, sp_window,
                        he_window, sp_percentile, _sp_tile, _he_tile)
from spseg.inference import read_windows, tissue_norm

H, W = 37, 53

# ---- the copies as they were before the merge: spseg.data's tile readers and spseg.inference's block readers ----

def _inside(t, y, x, s):
    H, W = t.shape
    return max(0, min(s, H - y)), max(0, min(s, W - x))

def old_sp_tile(t, stats, y, x, s):
    (H, W), (vh, vw) = t.shape, _inside(t, y, x, s)
    sp = np.zeros((N_MARKERS, s, s), np.float32)
    if not (vh and vw and t.sp_raw is not None): return sp
    cy0, cx0, cy1, cx1 = max(y - 1, 0), max(x - 1, 0), min(y + s + 1, H), min(x + s + 1, W)
    norm = normalise_sp(t.sp_region(cy0, cx0, cy1, cx1), *stats.for_tissue(t.id))
    sp[:, :vh, :vw] = norm[:, y - cy0:y - cy0 + vh, x - cx0:x - cx0 + vw]
    return sp

def old_he_tile(t, y, x, s):
    vh, vw = _inside(t, y, x, s)
    he = np.zeros((3, s, s), np.float32)
    if vh and vw and t.he is not None: he[:, :vh, :vw] = normalise_he(t.he_region(y, x, y + vh, x + vw))
    return he

def old_sp_block(t, norm, y0, x0, y1, x1):
    (H, W), out = t.shape, np.zeros((N_MARKERS, y1 - y0, x1 - x0), np.float32)
    vy, vx = min(y1, H), min(x1, W)
    if t.sp_raw is None or norm is None or vy <= y0 or vx <= x0: return out
    cy, cx = max(y0 - 1, 0), max(x0 - 1, 0)
    sp = normalise_sp(t.sp_region(cy, cx, min(y1 + 1, H), min(x1 + 1, W)), *norm)
    out[:, :vy - y0, :vx - x0] = sp[:, y0 - cy:vy - cy, x0 - cx:vx - cx]
    return out

def old_he_block(t, y0, x0, y1, x1):
    (H, W), out = t.shape, np.zeros((3, y1 - y0, x1 - x0), np.float32)
    vy, vx = min(y1, H), min(x1, W)
    if t.he is not None and vy > y0 and vx > x0:
        out[:, :vy - y0, :vx - x0] = normalise_he(t.he_region(y0, x0, vy, vx))
    return out


@pytest.fixture(scope='module')
def tissues(tmp_path_factory):
    "A tissue with H&E and 19-channel uint16 SP (markers shuffled among extras, zlib-tiled), and an SP-only one."
    d, rng = tmp_path_factory.mktemp('win'), np.random.default_rng(0)
    names = ['Hoechst', 'AF1'] + MARKERS[::-1] + ['Argo550']
    sp = rng.gamma(2, 400, (19, H, W)).astype(np.uint16)
    he = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    write_tissue(d/'both', he, None, None)
    tifffile.imwrite(d/'both'/'sp.tif', sp, tile=(16, 16), compression='zlib', photometric='minisblack',
                     metadata={'axes': 'CYX', 'Channel': {'Name': names}})
    write_tissue(d/'sp_only', None, sp[17:1:-1], None)                      # the markers in order
    ts = [load_tissue(d/k, require=()) for k in ('both', 'sp_only')]
    stats = SPStats([], {t.id: sp_percentile(t).tolist() for t in ts}, list(rng.normal(5, 1, 16)),
                    list(rng.uniform(0.5, 2, 16)))
    return ts, stats


def test_the_fixture_reads_the_markers_out_of_order(tissues):
    (both, sp_only), _ = tissues
    assert both.sp_order != list(range(N_MARKERS)) and sp_only.sp_order == list(range(N_MARKERS))
    np.testing.assert_array_equal(both.sp, sp_only.sp)


corner = st.tuples(st.integers(0, H + 5), st.integers(0, W + 5))

@settings(max_examples=80, deadline=None)
@given(c=corner, s=st.integers(1, 70), which=st.integers(0, 1))
def test_tiles_equal_the_old_tile_readers(tissues, c, s, which):
    ts, stats = tissues
    t, (y, x) = ts[which], c
    np.testing.assert_array_equal(_sp_tile(t, stats, y, x, s), old_sp_tile(t, stats, y, x, s))
    np.testing.assert_array_equal(_he_tile(t, y, x, s), old_he_tile(t, y, x, s))


@settings(max_examples=80, deadline=None)
@given(c=corner, h=st.integers(1, 60), w=st.integers(1, 80), which=st.integers(0, 1), no_norm=st.booleans())
def test_windows_equal_the_old_block_readers(tissues, c, h, w, which, no_norm):
    ts, stats = tissues
    t, (y0, x0) = ts[which], c
    norm = None if no_norm else stats.for_tissue(t.id)
    y1, x1 = y0 + h, x0 + w
    np.testing.assert_array_equal(sp_window(t, norm, y0, x0, y1, x1), old_sp_block(t, norm, y0, x0, y1, x1))
    np.testing.assert_array_equal(he_window(t, y0, x0, y1, x1), old_he_block(t, y0, x0, y1, x1))


def test_read_windows_equals_the_old_blocks_cut(tissues):
    "`read_windows` on the new functions gives, window by window, the old block readers' numbers."
    (t, _), stats = tissues
    norm = tissue_norm(t, stats)
    corners = [(0, 0), (0, 16), (0, 40), (24, 8), (30, 50)]                    # two rows, windows past the edges
    sp, he = read_windows(t, corners, 20, norm)
    for k, (y, x) in enumerate(corners):
        assert torch.equal(sp[k], torch.from_numpy(old_sp_block(t, norm, y, x, y + 20, x + 20)))
        assert torch.equal(he[k], torch.from_numpy(old_he_block(t, y, x, y + 20, x + 20)))
    assert sp[4, :, 7:].abs().sum() == 0 and he[4, :, :, 3:].abs().sum() == 0 and sp[4, :, :7, :3].abs().sum() > 0


def test_a_window_is_the_whole_image_normalised_and_cropped(tissues):
    (t, _), stats = tissues
    norm = stats.for_tissue(t.id)
    whole = normalise_sp(t.sp, *norm)
    np.testing.assert_allclose(sp_window(t, norm, 5, 7, 30, 50), whole[:, 5:30, 7:50], atol=1e-5)
    np.testing.assert_allclose(sp_window(t, norm, 0, 0, H, W), whole, atol=1e-5)
