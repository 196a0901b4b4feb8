"""STAC backend: search, load, mask, composite, offsets and embeddings, without the internet.

Fixtures (built here with rasterio, no download): small COGs cut from the shared real FTW
Sentinel-2 scene (two dates of B04/B03/B02/B08, the second cloudy) plus a synthetic 20 m SCL,
and synthetic scenes for the offset rules; they are described as STAC items (``rio-stac``)
and served by a real STAC API (``rustac serve``, in-memory backend) on 127.0.0.1 with hrefs
pointing at the local files. Expected values come from numpy on the source arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyproj
import pytest
import rasterio
from affine import Affine

pystac = pytest.importorskip("pystac")
pytest.importorskip("pystac_client")
pytest.importorskip("odc.stac")
rio_stac = pytest.importorskip("rio_stac")

from torchgeo_dofa import stac  # noqa: E402
from torchgeo_dofa.api import (  # noqa: E402
    ModelError,
    SensorSpec,
    TemporalSpec,
    export_batch,
    get_embedding,
    get_embeddings_batch,
)
from torchgeo_dofa.spatial import BBox, PointBuffer  # noqa: E402

FTW = (
    Path(
        os.environ.get("TORCHGEO_DOFA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared")
    )
    / "data"
    / "sentinel2"
    / "ftw"
    / "inference-img.tif"
)
if not FTW.exists():
    FTW = Path("/work/shared/data/sentinel2/ftw/inference-img.tif")

COLLECTION = "sentinel-2-l2a"
UTM33 = "EPSG:32633"
SCL_ORIGIN = (359120.0, 5352340.0)  # a 20 m grid (multiples of 20) covering the FTW scene
ASSETS = {"B4": "red", "B3": "green", "B2": "blue", "B8": "nir"}
BANDS = ("B4", "B3", "B2", "B8")


def _cog(path: Path, array: np.ndarray, transform: Affine, crs: str = UTM33) -> Path:
    profile = {
        "driver": "COG",
        "width": array.shape[1],
        "height": array.shape[0],
        "count": 1,
        "dtype": array.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": 0,
        "blocksize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)
    return path


def _item(
    folder: Path,
    item_id: str,
    when: str,
    arrays: dict[str, np.ndarray],
    transform: Affine,
    scl: np.ndarray | None,
    scl_transform: Affine | None,
    properties: dict[str, Any],
) -> Any:
    """One STAC item with one COG per band (and a 20 m SCL), described by rio-stac."""
    folder = folder / item_id
    folder.mkdir(parents=True)
    paths = {key: _cog(folder / f"{key}.tif", arr, transform) for key, arr in arrays.items()}
    if scl is not None:
        assert scl_transform is not None
        paths["scl"] = _cog(folder / "scl.tif", scl, scl_transform)
    first = next(iter(paths))
    item = rio_stac.create_stac_item(
        str(paths[first]),
        input_datetime=datetime.fromisoformat(when).replace(tzinfo=UTC),
        collection=COLLECTION,
        properties=dict(properties),
        id=item_id,
        asset_name=first,
        asset_href=str(paths[first]),
        with_proj=True,
        with_raster=True,
    )
    for key, path in paths.items():
        if key == first:
            continue
        with rasterio.open(path) as src:
            extra = {
                **{f"proj:{k}": v for k, v in rio_stac.stac.get_projection_info(src).items()},
                "raster:bands": rio_stac.stac.get_raster_info(src),
            }
        item.add_asset(
            key, pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, extra_fields=extra)
        )
    return item


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not FTW.exists():
        pytest.skip(f"shared Sentinel-2 samples absent ({FTW})")
    root = tmp_path_factory.mktemp("stac")
    with rasterio.open(FTW) as src:
        raw = src.read().astype(np.uint16)  # (8, H, W): two dates x (B04, B03, B02, B08)
        transform = src.transform
    h, w = raw.shape[1:]
    d1, d2 = raw[:4], raw[4:]
    # a third date: the first one, brightened and stored with baseline 04.00's +1000
    d3_ref = np.clip(np.round(d1 * 1.07) + 13, 1, 20000).astype(np.uint16)
    d3_ref[d1 == 0] = 0
    d3 = np.where(d3_ref > 0, d3_ref + 1000, 0).astype(np.uint16)

    sh, sw = (h + 2) // 2, (w + 2) // 2  # 20 m SCL grid covering the scene
    scl_tf = Affine(20.0, 0.0, SCL_ORIGIN[0], 0.0, -20.0, SCL_ORIGIN[1])
    rows, cols = np.mgrid[0:sh, 0:sw]
    scl1 = np.full((sh, sw), 4, np.uint8)
    # (20 m cells; the ROI below covers 10 m rows/cols ~30..140, i.e. cells ~15..70)
    scl1[20:40, 30:70] = 8  # cloud, medium probability
    scl1[50:65, 12:30] = 3  # cloud shadow, overlapping the third date's no-data strip
    scl1[25:35, 5:15] = 11  # snow: kept by default
    scl2 = np.full((sh, sw), 5, np.uint8)
    blue2 = np.zeros((sh * 2, sw * 2), np.uint16)
    blue2[:h, 1 : w + 1] = d2[2]  # the 10 m grid starts 10 m right of the SCL's, same top
    cloudy = blue2.reshape(sh, 2, sw, 2).max(axis=(1, 3)) > 1500
    scl2[cloudy] = 9
    scl2[(rows + cols) % 17 == 0] = 10  # cirrus speckle
    scl2[50:60, 12:20] = 1  # saturated: with the two above, pixels without any valid date
    scl3 = np.full((sh, sw), 6, np.uint8)
    scl3[:, :20] = 0  # no data strip

    items = []
    specs = [  # id, acquisition, digital numbers, SCL, eo:cloud_cover, processing baseline
        ("S2A_T33_20210610", "2021-06-10T10:00:00", d1, scl1, 12.0, "03.00"),
        ("S2B_T33_20210705", "2021-07-05T10:00:00", d2, scl2, 45.0, "03.01"),
        ("S2A_T33_20220720", "2022-07-20T10:00:00", d3, scl3, 5.0, "04.00"),
        ("S2B_T33_20210720_cloudy", "2021-07-20T10:00:00", d1, scl1, 85.0, "03.00"),
        ("S2A_T33_20230601_late", "2023-06-01T10:00:00", d1, scl1, 1.0, "05.09"),
    ]
    for item_id, when, data, scl, cloud, baseline in specs:
        arrays = {ASSETS[b]: data[i] for i, b in enumerate(BANDS)}
        items.append(
            _item(
                root,
                item_id,
                when,
                arrays,
                transform,
                scl,
                scl_tf,
                {"eo:cloud_cover": cloud, "s2:processing_baseline": baseline},
            )
        )

    # synthetic offset scenes elsewhere (zone 33, ~45 N): 40 x 40 px at 10 m, one band set
    syn_tf = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4990000.0)
    syn_scl_tf = Affine(20.0, 0.0, 500000.0, 0.0, -20.0, 4990000.0)
    rng = np.random.default_rng(0)
    ref = rng.integers(300, 6000, size=(4, 40, 40)).astype(np.uint16)
    syn_scl = np.full((20, 20), 4, np.uint8)
    offsets: dict[str, tuple[str, dict[str, Any], int]] = {
        "syn_b0300": ("2021-05-01T10:00:00", {"s2:processing_baseline": "03.00"}, 0),
        "syn_b0400": ("2022-05-01T10:00:00", {"s2:processing_baseline": "04.00"}, 1000),
        "syn_b0400_applied": (
            "2022-05-02T10:00:00",
            {"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": True},
            0,
        ),
        "syn_proc_0509": ("2023-05-01T10:00:00", {"processing:version": "05.09"}, 1000),
        "syn_date_2022": ("2022-05-03T10:00:00", {}, 1000),
        "syn_date_2021": ("2021-05-03T10:00:00", {}, 0),
        # as Earth Search describes items it did not correct: the asset's raster:bands carry
        # scale 0.0001 / offset -0.1, which the loader must not apply on top of the DN rule
        "syn_es_not_applied": (
            "2022-05-04T10:00:00",
            {"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False},
            1000,
        ),
    }
    syn_items = {}
    for item_id, (when, props, add) in offsets.items():
        arrays = {ASSETS[b]: (ref[i] + add).astype(np.uint16) for i, b in enumerate(BANDS)}
        syn_items[item_id] = _item(
            root,
            item_id,
            when,
            arrays,
            syn_tf,
            syn_scl,
            syn_scl_tf,
            {"eo:cloud_cover": 1.0, **props},
        )
        if item_id == "syn_es_not_applied":
            for key in ASSETS.values():
                for band in syn_items[item_id].assets[key].extra_fields["raster:bands"]:
                    band.update(scale=0.0001, offset=-0.1)

    collection = pystac.Collection(
        id=COLLECTION,
        description="test Sentinel-2 L2A items",
        extent=pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
            pystac.TemporalExtent([[None, None]]),
        ),
    )
    all_items = items + list(syn_items.values())
    (root / "collection.json").write_text(json.dumps(collection.to_dict(include_self_link=False)))
    items_file = root / "items.json"
    items_file.write_text(json.dumps(pystac.ItemCollection(all_items).to_dict()))
    # the same items as a static catalog
    catalog = pystac.Catalog(id="local", description="local static catalog")
    static_collection = collection.clone()
    catalog.add_child(static_collection)
    for it in all_items:
        static_collection.add_item(it.clone())
    catalog.normalize_hrefs(str(root / "catalog"))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)

    # an ROI well inside the FTW scene, as a lon/lat box
    to_ll = pyproj.Transformer.from_crs(UTM33, "EPSG:4326", always_xy=True)
    lon0, lat0 = to_ll.transform(transform.c + 200, transform.f - 1400)
    lon1, lat1 = to_ll.transform(transform.c + 1300, transform.f - 300)
    return {
        "root": root,
        "items_file": items_file,
        "catalog": root / "catalog" / "catalog.json",
        "collection_file": root / "collection.json",
        "bbox": (lon0, lat0, lon1, lat1),
        "raw": {"d1": d1, "d2": d2, "d3": d3},
        "scl": {"d1": scl1, "d2": scl2, "d3": scl3},
        "offsets": {"d1": 0.0, "d2": 0.0, "d3": -1000.0},
        "transform": transform,
        "syn_ref": ref,
        "syn_items": syn_items,
        "syn_offsets": {k: -float(v[2]) for k, v in offsets.items()},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(scenes: dict[str, Any]) -> Any:
    exe = shutil.which("rustac") or str(Path(sys.executable).parent / "rustac")
    if not Path(exe).exists():
        pytest.skip(
            'rustac (the test STAC API) is not installed: pip install "torchgeo-dofa[test]"'
        )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            exe,
            "serve",
            "--addr",
            f"127.0.0.1:{port}",
            str(scenes["collection_file"]),
            str(scenes["items_file"]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("rustac serve did not start") from None
                time.sleep(0.05)
        print(f"rustac serve ready in {time.perf_counter() - start:.2f} s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------
# reference: numpy on the source arrays
# ----------------------------------------------------------------------------------------------


def _reference(scenes: dict[str, Any], grid: stac.StacGrid, dates: list[str], rule: str):
    """Expected composite on ``grid`` from the source arrays, computed with plain numpy."""
    a, _, c, _, e, f = grid.transform
    src = scenes["transform"]
    col0 = round((c - src.c) / 10)
    row0 = round((src.f - f) / 10)
    assert a == 10 and e == -10 and col0 >= 0 and row0 >= 0
    rows = np.arange(grid.height) + row0
    cols = np.arange(grid.width) + col0
    # 10 m pixel centres -> 20 m SCL cells
    ys = src.f - (rows + 0.5) * 10
    xs = src.c + (cols + 0.5) * 10
    srow = np.floor((SCL_ORIGIN[1] - ys) / 20).astype(int)
    scol = np.floor((xs - SCL_ORIGIN[0]) / 20).astype(int)
    layers = []
    for d in dates:
        dn = scenes["raw"][d][:, rows[:, None], cols[None, :]].astype(np.float64)
        scl = scenes["scl"][d][srow[:, None], scol[None, :]]
        ok = (dn != 0).all(axis=0) & ~np.isin(scl, stac.DEFAULT_SCL_MASK)
        value = dn + scenes["offsets"][d]
        value[:, ~ok] = np.nan
        layers.append(value)
    stack = np.stack(layers)
    if rule == "median":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
            return np.nanmedian(stack, axis=0)
    out = np.full(stack.shape[1:], np.nan)
    for layer in stack:
        take = np.isnan(out) & ~np.isnan(layer)
        out[take] = layer[take]
    return out


WINDOW = "2021-06-01/2022-12-31"
SYN_ROI = (15.001, 45.0605, 15.004, 45.0625)  # inside the synthetic scenes
EXPECTED = ["S2A_T33_20210610", "S2B_T33_20210705", "S2A_T33_20220720"]


# ----------------------------------------------------------------------------------------------
# search
# ----------------------------------------------------------------------------------------------


def test_search_api_bbox_date_cloud(scenes, server) -> None:
    items = stac.search_items(server, COLLECTION, scenes["bbox"], WINDOW, max_cloud=50)
    assert [it.id for it in items] == EXPECTED  # cloudy (85 %) and 2023 items dropped
    assert [it.id for it in stac.search_items(server, COLLECTION, scenes["bbox"], WINDOW)] == [
        "S2A_T33_20210610",
        "S2B_T33_20210705",
        "S2B_T33_20210720_cloudy",
        "S2A_T33_20220720",
    ]
    assert [
        it.id for it in stac.search_items(server, COLLECTION, scenes["bbox"], WINDOW, max_cloud=10)
    ] == ["S2A_T33_20220720"]
    # the synthetic scenes lie elsewhere: a bbox over them finds only them
    syn = stac.search_items(server, COLLECTION, (14.99, 45.05, 15.01, 45.07), "2021-01-01/..")
    assert {it.id for it in syn} == set(scenes["syn_items"])
    assert stac.search_items(server, "other-collection", scenes["bbox"], WINDOW) == []


@pytest.mark.parametrize("kind", ["items_file", "catalog"])
def test_search_local_sources_match_api(scenes, server, kind) -> None:
    items = stac.search_items(scenes[kind], COLLECTION, scenes["bbox"], WINDOW, max_cloud=50)
    assert [it.id for it in items] == EXPECTED
    # date-only end is inclusive of the whole day, like the API
    one_day = stac.search_items(scenes[kind], COLLECTION, scenes["bbox"], "2021-06-01/2021-06-10")
    api_day = stac.search_items(server, COLLECTION, scenes["bbox"], "2021-06-01/2021-06-10")
    assert [it.id for it in one_day] == [it.id for it in api_day] == ["S2A_T33_20210610"]


# ----------------------------------------------------------------------------------------------
# composite
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["median", "mosaic"])
def test_composite_equals_numpy(scenes, server, tmp_path, rule) -> None:
    items = stac.search_items(server, COLLECTION, scenes["bbox"], WINDOW, max_cloud=50)
    out = stac.composite_to_geotiff(
        items, scenes["bbox"], BANDS, tmp_path / "c.tif", composite=rule
    )
    grid = stac.stac_grid(scenes["bbox"])
    expected = _reference(scenes, grid, ["d1", "d2", "d3"], rule)
    with rasterio.open(out) as src:
        got = src.read()
        assert src.descriptions == ("B04", "B03", "B02", "B08")
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata)
        assert src.crs.to_epsg() == 32633
        assert tuple(src.transform)[:6] == grid.transform
        tags = src.tags()
    assert got.shape == (4, grid.height, grid.width) == expected.shape
    assert grid.height > 50 and grid.width > 50
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    # the masks bite: some pixels have no valid date, most have one or more
    assert 0 < np.isnan(expected[0]).mean() < 0.2
    assert json.loads(tags["STAC_ITEM_IDS"]) == EXPECTED
    assert json.loads(tags["STAC_ITEM_OFFSETS"]) == [0.0, 0.0, -1000.0]
    assert tags["STAC_COMPOSITE"].startswith(rule)
    assert json.loads(tags["STAC_SCL_MASK"]) == [0, 1, 3, 8, 9, 10]
    # a region larger than the memory budget: composited in windows (3 dates x 5 assets x
    # 8 bytes x 40 x 40 px), the same pixels and tags as in one piece
    windows = stac._composite_windows(grid, 3 * 5 * 8, 3 * 5 * 8 * 40 * 40)
    assert len(windows) >= 9 and windows[1] == (0, 40, 40, 40)
    pieces = stac.composite_to_geotiff(
        items,
        scenes["bbox"],
        BANDS,
        tmp_path / "w.tif",
        composite=rule,
        window_bytes=3 * 5 * 8 * 40 * 40,
    )
    with rasterio.open(pieces) as src:
        np.testing.assert_array_equal(src.read(), got)
        assert src.tags() == tags
        assert tuple(src.transform)[:6] == grid.transform


def test_materialised_file_reads_as_local_input(scenes, server, tmp_path) -> None:
    from torchgeo_dofa.datasets import Sentinel2SR

    path = stac.materialise(
        BBox(*scenes["bbox"]), WINDOW, server, bands=BANDS, max_cloud=50, out_dir=tmp_path
    )
    again = stac.materialise(
        BBox(*scenes["bbox"]), WINDOW, server, bands=BANDS, max_cloud=50, out_dir=tmp_path
    )
    assert again == path and len(list(tmp_path.glob("*.tif"))) == 1  # cached
    ds = Sentinel2SR(str(path))  # no options: band names from the descriptions
    assert sorted(ds.bands) == sorted(BANDS)  # (in Sentinel-2 order)
    assert ds.index.offset_source.tolist() == ["none (not an ESA product name, no metadata found)"]
    with rasterio.open(path) as src:
        assert src.tags()["STAC_SOURCE"] == server
        assert src.tags()["STAC_COLLECTION"] == COLLECTION
    # helper-113: a request of other dates (or cloud limit) finding the same items reused
    # the file, whose STAC_DATETIME / STAC_MAX_CLOUD (copied into embed's outputs) said the
    # first request's
    wider = stac.materialise(
        BBox(*scenes["bbox"]), "2021-01-01/2022-12-31", server, bands=BANDS, max_cloud=50,
        out_dir=tmp_path,
    )  # fmt: skip
    cloudier = stac.materialise(
        BBox(*scenes["bbox"]), WINDOW, server, bands=BANDS, max_cloud=60, out_dir=tmp_path
    )
    assert len({path, wider, cloudier}) == 3
    for file, when, cloud in ((wider, "2021-01-01/2022-12-31", "50"), (cloudier, WINDOW, "60")):
        with rasterio.open(file) as src:
            assert src.tags()["STAC_DATETIME"].startswith(when.split("/")[0]), src.tags()
            assert src.tags()["STAC_MAX_CLOUD"] == cloud


# ----------------------------------------------------------------------------------------------
# offsets
# ----------------------------------------------------------------------------------------------


def test_offset_rule_per_item(scenes, tmp_path) -> None:
    ref = scenes["syn_ref"].astype(np.float32)
    for item_id, item in scenes["syn_items"].items():
        value, rule = stac.item_offset(item)
        assert value == scenes["syn_offsets"][item_id], (item_id, rule)
        out = stac.composite_to_geotiff(
            [item],
            SYN_ROI,
            BANDS,
            tmp_path / f"{item_id}.tif",
            composite="mosaic",
            crs=UTM33,
        )
        with rasterio.open(out) as src:
            got = src.read()
            col0 = round((src.transform.c - 500000) / 10)
            row0 = round((4990000 - src.transform.f) / 10)
        expected = ref[:, row0 : row0 + got.shape[1], col0 : col0 + got.shape[2]]
        assert got.shape[1] > 5 and got.shape[2] > 5
        np.testing.assert_array_equal(got, expected, err_msg=item_id)


# ----------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------


def _regions(scenes: dict[str, Any]) -> list[Any]:
    lon0, lat0, lon1, lat1 = scenes["bbox"]
    return [
        BBox(*scenes["bbox"]),
        PointBuffer(lon=(lon0 + lon1) / 2, lat=(lat0 + lat1) / 2, buffer_m=400),
    ]


def _numpy_embedding(scenes, spatial, sensor, output: str) -> np.ndarray:
    """The embedding of the numpy composite (no STAC, no GeoTIFF) through backend='tensor'."""
    pixels = _reference(scenes, stac.stac_grid(spatial), ["d1", "d2", "d3"], "median")
    return get_embedding(
        "dofa",
        input_chw=pixels.astype(np.float32),
        sensor=sensor,
        backend="tensor",
        weights=None,
        device="cpu",
        output=output,
    ).data


@pytest.mark.parametrize("which", [0, 1], ids=["bbox", "point"])
def test_stac_backend_equals_numpy_composite(scenes, server, tmp_path, monkeypatch, which) -> None:
    monkeypatch.setenv("TORCHGEO_DOFA_STAC_CACHE", str(tmp_path))
    spatial = _regions(scenes)[which]
    sensor = SensorSpec(bands=BANDS, cloudy_pct=50)
    got = get_embedding(
        "dofa",
        spatial=spatial,
        temporal=TemporalSpec.range("2021-06-01", "2023-01-01"),
        sensor=sensor,
        backend="stac",
        stac_url=server,
        collection=COLLECTION,
        weights=None,
        device="cpu",
        output="grid",
    )
    want = _numpy_embedding(scenes, spatial, sensor, "grid")
    assert got.data.shape == want.shape == (768, 14, 14)
    np.testing.assert_array_equal(np.isnan(got.data), np.isnan(want))
    np.testing.assert_allclose(got.data, want, rtol=0, atol=1e-5, equal_nan=True)
    assert got.meta["backend"] == "stac"
    assert got.meta["stac"]["item_ids"] == EXPECTED
    assert got.meta["stac"]["item_offsets"] == [0.0, 0.0, -1000.0]
    assert got.meta["stac"]["composite"].startswith("median")
    assert got.meta["crs"] == "EPSG:32633"
    if which == 1:
        assert got.meta["input_size_hw"] == [80, 80]  # 2 x 400 m at 10 m


def test_stac_batch_and_export(scenes, server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHGEO_DOFA_STAC_CACHE", str(tmp_path / "cache"))
    regions = _regions(scenes)
    sensor = SensorSpec(bands=BANDS, cloudy_pct=50)
    temporal = TemporalSpec.range("2021-06-01", "2023-01-01")
    common: dict[str, Any] = {"weights": None, "device": "cpu", "sensor": sensor}
    batch = get_embeddings_batch(
        "dofa", spatials=regions, temporal=temporal, stac_url=server, **common
    )  # backend "auto" picks stac from stac_url
    assert [e.meta["backend"] for e in batch] == ["stac", "stac"]
    for emb, region in zip(batch, regions, strict=True):
        want = _numpy_embedding(scenes, region, sensor, "pooled")
        np.testing.assert_allclose(emb.data, want, rtol=0, atol=1e-5)
    summary = export_batch(
        spatials=regions[:1],
        temporal=temporal,
        models=["dofa"],
        out_path=tmp_path / "emb.parquet",
        backend="stac",
        stac_url=server,
        **common,
    )
    assert summary.rows == 1 and not summary.failed
    table = gpd.read_parquet(tmp_path / "emb.parquet")
    assert table["backend"].tolist() == ["stac"]
    np.testing.assert_allclose(np.asarray(table["embedding"][0]), batch[0].data, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# errors: one line, before anything is written
# ----------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_missing_asset_is_one_line(scenes, tmp_path) -> None:
    item = scenes["syn_items"]["syn_b0300"].clone()
    item.assets.pop("nir")
    with pytest.raises(stac.StacError) as info:
        stac.composite_to_geotiff([item], SYN_ROI, BANDS, tmp_path / "x.tif")
    assert "no asset for band B8" in _one_line(info.value) and "'nir'" in str(info.value)
    assert str(info.value).endswith(
        "choose bands the collection provides, e.g. bands=['B4', 'B3', 'B2']"
    )
    assert not (tmp_path / "x.tif").exists()

    no_scl = scenes["syn_items"]["syn_b0300"].clone()
    no_scl.assets.pop("scl")
    with pytest.raises(stac.StacError) as info:
        stac.composite_to_geotiff([no_scl], SYN_ROI, BANDS, tmp_path / "x.tif")
    text = _one_line(info.value)
    assert text.startswith("item syn_b0300 has no asset for the SCL scene classification")
    assert "mask_scl=()" in text and "choose bands" not in text

    gone = scenes["syn_items"]["syn_b0300"].clone()
    gone.assets["red"].href = str(tmp_path / "does-not-exist.tif")
    with pytest.raises(stac.StacError) as info:
        stac.composite_to_geotiff([gone], SYN_ROI, BANDS, tmp_path / "y.tif")
    assert "cannot read assets of item syn_b0300" in _one_line(info.value)
    assert not list(tmp_path.glob("*.tif"))


def test_missing_band_hint_names_bands_in_python_and_the_cli(
    scenes, tmp_path, monkeypatch, capsys
) -> None:
    """The items have no B5: the hint is ``bands=`` from Python, ``--bands`` from the CLI."""
    from torchgeo_dofa.cli import main

    monkeypatch.setenv("TORCHGEO_DOFA_STAC_CACHE", str(tmp_path / "cache"))
    hint = "choose bands the collection provides, e.g. "
    with pytest.raises(stac.StacError) as info:  # DOFA's 9 bands by default
        stac.materialise(scenes["bbox"], WINDOW, scenes["items_file"], max_cloud=50)
    text = _one_line(info.value)
    assert "has no asset for band B5" in text and "--bands" not in text
    assert text.endswith(hint + "bands=['B4', 'B3', 'B2', 'B8']")
    with pytest.raises(stac.StacError) as info:
        get_embedding(
            "dofa", spatial=BBox(*scenes["bbox"]), stac_url=scenes["items_file"], weights=None,
            temporal=TemporalSpec.range("2021-06-01", "2023-01-01"),
            sensor=SensorSpec(bands=("B4", "B5", "B8"), cloudy_pct=50),
        )  # fmt: skip
    assert _one_line(info.value).endswith(
        hint + "bands=['B4', 'B8'] (get_embedding takes them as sensor=SensorSpec(bands=[...]))"
    )
    bbox = [str(v) for v in scenes["bbox"]]
    out = tmp_path / "out"
    code = main(
        ["embed", "--stac", str(scenes["items_file"]), "--collection", COLLECTION, "--bbox",
         *bbox, "--datetime", WINDOW, "--max-cloud", "50", "--weights", "none", "--no-progress",
         "-o", str(out)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no asset for band B5" in err
    assert err.endswith(hint + "--bands B4 B3 B2 B8\n") and "bands=" not in err
    assert not list((tmp_path / "cache").glob("*.tif"))


def test_unreachable_api_is_one_line(scenes, tmp_path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(stac.StacUnavailableError) as info:
        stac.search_items(url, COLLECTION, scenes["bbox"], WINDOW)
    assert f"cannot search the STAC API at {url}" in _one_line(info.value)
    with pytest.raises(stac.StacUnavailableError) as info:
        stac.search_items(tmp_path / "nope.json", COLLECTION, scenes["bbox"], WINDOW)
    assert "neither an http(s) URL nor an existing file" in _one_line(info.value)


def test_no_items_is_lookup_error(scenes, server, tmp_path) -> None:
    with pytest.raises(LookupError, match="widen the dates or raise max_cloud"):
        stac.materialise(scenes["bbox"], "2019-01-01/2019-02-01", server, out_dir=tmp_path)
    assert not list(tmp_path.glob("*.tif"))


def test_missing_extra_is_one_line(scenes, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pystac_client", None)  # as if not installed
    with pytest.raises(stac.StacUnavailableError) as info:
        stac.search_items("http://127.0.0.1:9", COLLECTION, scenes["bbox"], WINDOW)
    assert 'pip install "torchgeo-dofa[stac]"' in _one_line(info.value)
    assert "'pystac_client'" in str(info.value)


def test_bad_arguments(scenes, tmp_path) -> None:
    items = [scenes["syn_items"]["syn_b0300"]]
    with pytest.raises(stac.StacError, match="unknown composite 'mean'"):
        stac.composite_to_geotiff(items, SYN_ROI, BANDS, tmp_path / "a.tif", composite="mean")
    with pytest.raises(stac.StacError, match="unknown SCL classes"):
        stac.composite_to_geotiff(items, SYN_ROI, BANDS, tmp_path / "a.tif", mask_scl=(12,))
    with pytest.raises(ValueError, match="not Sentinel-2 bands"):
        stac.composite_to_geotiff(items, SYN_ROI, ["B4", "NDVI"], tmp_path / "a.tif")
    with pytest.raises(stac.StacError, match="ends before it starts"):
        stac.search_items(scenes["items_file"], COLLECTION, None, "2022-01-02/2022-01-01")
    with pytest.raises(ModelError, match="needs stac_url"):
        get_embedding("dofa", spatial=BBox(*SYN_ROI), backend="stac", weights=None)
    assert not list(tmp_path.glob("*.tif"))


def test_cli_embeds_a_stac_composite(scenes, server, tmp_path, monkeypatch, capsys) -> None:
    from torchgeo_dofa.cli import main

    monkeypatch.setenv("TORCHGEO_DOFA_STAC_CACHE", str(tmp_path / "cache"))
    bbox = [str(v) for v in scenes["bbox"]]
    args = ["embed", "--stac", server, "--collection", COLLECTION, "--bbox", *bbox,
            "--bands", *BANDS, "--max-cloud", "50", "--weights", "none", "--seed", "0",
            "--no-progress"]  # fmt: skip
    # dates are required: a one-line error, nothing written
    assert main([*args, "-o", str(tmp_path / "none")]) == 2
    assert "--stac needs --bbox" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    out = tmp_path / "out"
    assert main([*args, "--datetime", "2021-06-01/2022-12-31", "-o", str(out)]) == 0
    grids = list(out.glob("*_grid.tif"))
    assert len(grids) == 1 and len(list(out.glob("*_pooled.parquet"))) == 1
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == sorted([grids[0].name, grids[0].name.replace("_grid.tif", "_pooled.parquet")])
    with rasterio.open(grids[0]) as emb:
        tags = emb.tags()
        assert emb.crs.to_epsg() == 32633
    assert json.loads(tags["bands"]) == list(BANDS)
    assert all(item in tags["stac_item_ids"] for item in EXPECTED)
    # the grid equals the local pipeline run on the cached composite itself
    composite = next((tmp_path / "cache").glob("*.tif"))
    assert main(["embed", str(composite), "-o", str(tmp_path / "local"), "--weights", "none",
                 "--seed", "0", "--bands", *BANDS, "--no-progress"]) == 0  # fmt: skip
    with (
        rasterio.open(grids[0]) as a,
        rasterio.open(next((tmp_path / "local").glob("*_grid.tif"))) as b,
    ):
        np.testing.assert_array_equal(a.read(), b.read())
