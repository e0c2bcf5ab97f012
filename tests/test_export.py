"The outputs people open: GeoJSON, cell table, OME-TIFF maps and AnnData agree with the label image; writes are atomic."
import json
import numpy as np, pandas as pd, pytest
import shapely, tifffile
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage as ndi
from spseg.data import CLASSES, CLASS_COLOURS, MARKERS
from spseg.instance import instance_table
from spseg.synthetic import make_tissue
from spseg.export import (OUTPUT_FILES, write_outputs, nucleus_polygons, nuclei_geojson, cell_table, marker_means,
                          read_ome_classes, write_type_map, label_runs, row_convex, run_outlines, outer_polygon)


@pytest.fixture(scope='module')
def tissue(): return make_tissue(256, 3)


@pytest.fixture(scope='module')
def outputs(tissue, tmp_path_factory):
    table = instance_table(tissue.inst, tissue.mask)
    return write_outputs(tmp_path_factory.mktemp('out')/'t', tissue.inst, tissue.mask, table, tissue.sp), table


def _pixels_inside(poly, shape):
    "Boolean (H, W): pixels whose centre lies inside `poly` (pixel-corner coordinates)."
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return shapely.contains_xy(poly, xx + 0.5, yy + 0.5)


def _filled_pieces(mask):
    "Each largest 4-connected piece of `mask`, holes filled (what a nucleus's polygon should cover)."
    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel())[1:]
    return [ndi.binary_fill_holes(lab == k + 1) for k in np.flatnonzero(sizes == sizes.max())]


# --- GeoJSON ---------------------------------------------------------------------------------------------------------

def test_all_five_outputs_written(outputs):
    paths, _ = outputs
    assert set(paths) == set(OUTPUT_FILES)
    assert sorted(p.name for p in paths['types'].parent.iterdir()) == sorted(OUTPUT_FILES.values())


def test_geojson_one_valid_polygon_per_nucleus(outputs, tissue):
    paths, table = outputs
    fc = json.loads(paths['nuclei'].read_text())
    assert fc['type'] == 'FeatureCollection'
    ids = [f['properties']['id'] for f in fc['features']]
    assert sorted(ids) == np.unique(tissue.inst[tissue.inst > 0]).tolist()
    for f in fc['features']:
        geom = shapely.geometry.shape(f['geometry'])
        assert f['geometry']['type'] == 'Polygon' and geom.is_valid and geom.area > 0
        ring = f['geometry']['coordinates'][0]
        assert ring[0] == ring[-1]
        p = f['properties']
        assert p['objectType'] == 'detection'
        assert p['classification']['name'] in CLASSES and len(p['classification']['color']) == 3
        assert 0 <= p['type_prob'] <= 1


def test_geojson_matches_label_image(outputs, tissue):
    paths, table = outputs
    inst = tissue.inst
    fc = json.loads(paths['nuclei'].read_text())
    areas = dict(zip(table.id, table.area))
    poly_area = pixel_area = centroids_inside = 0
    for f in fc['features']:
        i, geom = f['properties']['id'], shapely.geometry.shape(f['geometry'])
        inside = _pixels_inside(geom, inst.shape)
        assert inside.sum() == geom.area                                     # vertices are pixel corners
        assert any((inside == piece).all() for piece in _filled_pieces(inst == i))
        row = table.set_index('id').loc[i]
        assert f['properties']['classification']['name'] == CLASSES[int(row.type)]
        centroids_inside += geom.contains(shapely.Point(row.x + 0.5, row.y + 0.5))
        poly_area, pixel_area = poly_area + geom.area, pixel_area + areas[i]
    assert abs(poly_area / pixel_area - 1) < 0.02
    assert centroids_inside >= 0.95 * len(fc['features'])


def test_single_pixel_and_corner_touching_nuclei():
    inst = np.zeros((5, 6), np.int32)
    inst[0, 0] = 1                                                           # single pixel at the image's corner
    inst[2, 2] = inst[3, 3] = 2                                              # two pieces touching at a corner
    inst[1:4, 5] = 3
    polys = nucleus_polygons(inst)
    assert sorted(polys) == [1, 2, 3] and all(p.is_valid for p in polys.values())
    assert polys[1].bounds == (0, 0, 1, 1) and polys[2].area == 1 and polys[3].area == 3


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.int32, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 4)))
def test_any_label_image_gives_one_valid_polygon_per_id(inst):
    "Random labels (pieces, holes, corner contacts, single pixels): one valid polygon per id, covering a filled piece."
    polys = nucleus_polygons(inst)
    assert sorted(polys) == np.unique(inst[inst > 0]).tolist()
    for i, p in polys.items():
        assert p.is_valid and p.geom_type == 'Polygon'
        assert any((_pixels_inside(p, inst.shape) == piece).all() for piece in _filled_pieces(inst == i))


def test_direct_outlines_equal_the_union_of_pixels(tissue):
    "The fast path (row-convex nuclei outlined from their runs) gives the same polygons as the union of their pixels."
    ids, rows, x0, x1 = runs = label_runs(tissue.inst)
    fast = row_convex(*runs)
    assert fast.mean() > 0.5
    for i, p in zip(*run_outlines(ids[fast], rows[fast], x0[fast], x1[fast])):
        k = ids == i
        union = outer_polygon(shapely.union_all(shapely.box(x0[k], rows[k], x1[k], rows[k] + 1)))
        assert p.is_valid and p.exterior.is_ccw and p.equals(union)
        assert len(p.exterior.coords) == len(union.exterior.coords)          # no vertex on a straight edge


def test_empty_tissue(tmp_path):
    anndata = pytest.importorskip('anndata')
    paths = write_outputs(tmp_path, np.zeros((20, 30), np.int32), np.zeros((20, 30), np.uint8),
                          sp=np.zeros((16, 20, 30), np.uint16))
    assert json.loads(paths['nuclei'].read_text()) == {'type': 'FeatureCollection', 'features': []}
    assert len(pd.read_parquet(paths['cells'])) == 0 and anndata.read_h5ad(paths['h5ad']).shape == (0, 16)


def test_label_runs_cover_every_pixel_once():
    inst = np.random.default_rng(0).integers(0, 5, (20, 30))
    ids, rows, x0, x1 = label_runs(inst)
    back = np.zeros_like(inst)
    for i, r, a, b in zip(ids, rows, x0, x1):
        assert (back[r, a:b] == 0).all()
        back[r, a:b] = i
    assert (back == inst).all()


# --- the cell table --------------------------------------------------------------------------------------------------

def test_table_matches_label_image(outputs, tissue):
    paths, _ = outputs
    inst, sp = tissue.inst, tissue.sp
    cells = pd.read_parquet(paths['cells'])
    ids = np.unique(inst[inst > 0])
    assert len(cells) == len(ids) and sorted(cells.id) == ids.tolist()
    com = np.array(ndi.center_of_mass(np.ones_like(inst), inst, cells.id))
    np.testing.assert_allclose(cells[['y_px', 'x_px']].to_numpy(), com, atol=1e-6)
    np.testing.assert_allclose(cells[['x_um', 'y_um']].to_numpy(), cells[['x_px', 'y_px']].to_numpy() * 0.325)
    assert (cells.area_px.to_numpy() == ndi.sum(np.ones_like(inst), inst, cells.id)).all()
    np.testing.assert_allclose(cells.area_um2, cells.area_px * 0.325 ** 2)
    direct = np.stack([ndi.mean(sp[c].astype(np.float64), inst, cells.id) for c in range(len(MARKERS))], 1)
    np.testing.assert_allclose(cells[MARKERS].to_numpy(), direct, rtol=1e-5)
    assert list(cells.class_name.cat.categories) == CLASSES
    assert (cells.class_name.astype(str) == [CLASSES[k] for k in cells.class_id]).all()


def test_classes_are_the_majority_and_pixel_size_is_an_option(tissue):
    inst, types = tissue.inst, tissue.mask
    cells = cell_table(inst, instance_table(inst, types), mpp=0.5)
    assert not set(MARKERS) & set(cells.columns)
    np.testing.assert_allclose(cells.y_um, cells.y_px * 0.5)
    np.testing.assert_allclose(cells.area_um2, cells.area_px * 0.25)
    i = int(cells.id[5])
    assert cells.class_id[5] == np.bincount(types[inst == i]).argmax()


def test_marker_means_with_ids_in_any_order(tissue):
    ids = np.unique(tissue.inst[tissue.inst > 0])[::-1][:7]
    m = marker_means(tissue.inst, tissue.sp, ids)
    for row, i in zip(m, ids): np.testing.assert_allclose(row, tissue.sp[:, tissue.inst == i].mean(1), rtol=1e-5)


# --- OME-TIFF --------------------------------------------------------------------------------------------------------

def test_ome_xml_validates_and_gives_back_the_class_names(outputs, tissue):
    ome_types = pytest.importorskip('ome_types')
    paths, _ = outputs
    with tifffile.TiffFile(paths['types']) as tif:
        ome = ome_types.from_xml(tif.ome_metadata)
        assert (tif.asarray() == tissue.mask).all() and tif.pages[0].dtype == np.uint8
    px = ome.images[0].pixels
    assert (px.size_x, px.size_y, px.physical_size_x) == (256, 256, 0.325)
    maps = {m.namespace: {int(kv.k): kv.value for kv in m.value.ms} for m in ome.structured_annotations.map_annotations}
    assert [maps['spseg/classes'][k] for k in range(len(CLASSES))] == CLASSES
    assert [maps['spseg/class-colours'][k] for k in range(len(CLASSES))] == CLASS_COLOURS
    assert [n for n, _ in read_ome_classes(paths['types']).values()] == CLASSES
    with tifffile.TiffFile(paths['instances']) as tif:
        ome_types.from_xml(tif.ome_metadata)
        assert tif.pages[0].dtype == np.int32 and (tif.asarray() == tissue.inst).all()
        assert len(tif.series[0].levels) == 1 and not tif.pages[0].is_tiled


def test_pyramid_above_threshold_preserves_labels(tissue, tmp_path):
    ome_types = pytest.importorskip('ome_types')
    paths = write_outputs(tmp_path, tissue.inst, tissue.mask, sp=tissue.sp, threshold=100, tile=32)
    for key, full in (('types', tissue.mask), ('instances', tissue.inst)):
        with tifffile.TiffFile(paths[key]) as tif:
            ome_types.from_xml(tif.ome_metadata)
            levels = [lvl.asarray() for lvl in tif.series[0].levels]
            assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 32
        assert [lvl.shape for lvl in levels] == [(256, 256), (128, 128), (64, 64), (32, 32)]
        for k, lvl in enumerate(levels):
            assert lvl.dtype == full.dtype and (lvl == full[::2 ** k, ::2 ** k]).all()
    assert [n for n, _ in read_ome_classes(paths['types']).values()] == CLASSES


def test_type_map_with_a_value_outside_the_classes_is_refused(tmp_path):
    with pytest.raises(ValueError, match='class ids'): write_type_map(tmp_path/'t.ome.tif', np.full((4, 4), 12))
    assert list(tmp_path.iterdir()) == []


# --- AnnData ---------------------------------------------------------------------------------------------------------

def test_h5ad_reads_back(outputs):
    anndata = pytest.importorskip('anndata')
    paths, _ = outputs
    ad, cells = anndata.read_h5ad(paths['h5ad']), pd.read_parquet(paths['cells'])
    assert ad.shape == (len(cells), len(MARKERS)) and list(ad.var_names) == MARKERS
    np.testing.assert_allclose(ad.X, cells[MARKERS].to_numpy())
    np.testing.assert_allclose(ad.obsm['spatial'], cells[['x_px', 'y_px']].to_numpy())
    np.testing.assert_allclose(ad.obsm['spatial_um'], cells[['x_um', 'y_um']].to_numpy())
    assert list(ad.obs_names) == [str(i) for i in cells.id]
    assert list(ad.obs.class_name.cat.categories) == CLASSES
    assert list(ad.uns['class_name_colors']) == CLASS_COLOURS and ad.uns['pixel_size_um'] == 0.325


def test_without_sp_no_marker_columns(tissue, tmp_path):
    anndata = pytest.importorskip('anndata')
    paths = write_outputs(tmp_path, tissue.inst, tissue.mask)
    assert anndata.read_h5ad(paths['h5ad']).shape[1] == 0
    assert not set(MARKERS) & set(pd.read_parquet(paths['cells']).columns)


# --- bad input and failed writes -------------------------------------------------------------------------------------

def _leftovers(folder): return sorted(p.name for p in folder.iterdir() if p.name not in OUTPUT_FILES.values())


def test_inconsistent_inputs_write_nothing(tissue, tmp_path):
    inst, types = tissue.inst, tissue.mask
    table = instance_table(inst, types)
    with pytest.raises(ValueError, match='table'): write_outputs(tmp_path/'a', inst, types, table.iloc[2:])
    with pytest.raises(ValueError, match='one shape'): write_outputs(tmp_path/'b', inst, types[:-1], table)
    with pytest.raises(ValueError, match='SP image'): write_outputs(tmp_path/'c', inst, types, table, tissue.sp[:3])
    assert list(tmp_path.iterdir()) == []


def test_failed_parquet_write_leaves_nothing_under_its_name(tissue, tmp_path, monkeypatch):
    def broken(self, path, *args, **kwargs):
        open(path, 'wb').write(b'PAR1 half a file')
        raise OSError('disk full')
    monkeypatch.setattr(pd.DataFrame, 'to_parquet', broken)
    with pytest.raises(OSError, match='disk full'): write_outputs(tmp_path, tissue.inst, tissue.mask, sp=tissue.sp)
    assert not (tmp_path/OUTPUT_FILES['cells']).exists() and _leftovers(tmp_path) == []


def test_failed_tiff_write_leaves_nothing_under_its_name(tissue, tmp_path, monkeypatch):
    real = tifffile.TiffWriter.write
    def broken(self, data, *args, **kwargs):
        real(self, data, *args, **kwargs)
        raise OSError('interrupted')
    monkeypatch.setattr(tifffile.TiffWriter, 'write', broken)
    with pytest.raises(OSError, match='interrupted'): write_outputs(tmp_path, tissue.inst, tissue.mask)
    assert list(tmp_path.iterdir()) == []


def test_rewriting_replaces_the_files(tissue, tmp_path):
    inst = tissue.inst
    write_outputs(tmp_path, inst, tissue.mask)
    fewer = np.where(inst == inst.max(), 0, inst)
    paths = write_outputs(tmp_path, fewer, tissue.mask)
    assert len(json.loads(paths['nuclei'].read_text())['features']) == len(np.unique(fewer)) - 1
    assert _leftovers(tmp_path) == []


def test_geojson_from_the_table_order(tissue):
    table = instance_table(tissue.inst, tissue.mask).sample(frac=1, random_state=0)
    fc = nuclei_geojson(tissue.inst, table)
    assert [f['properties']['id'] for f in fc['features']] == table.id.tolist()
