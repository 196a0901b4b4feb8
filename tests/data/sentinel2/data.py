#!/usr/bin/env python3
"""Recipe for the small synthetic Sentinel-2 rasters used by the dataset tests.

Run ``python tests/data/sentinel2/data.py`` to (re)write the files next to this script, or call
:func:`generate` with another folder. Everything is seeded, so the output is reproducible.

Reflectance (x 10000, uint16) comes from a land-cover map (fields, a river, a town) and a
typical spectrum per class, with 1 % noise. Layouts:

* ``multiband/S2_20220614_multiband.tif``: 10 bands, descriptions in ESA spelling (``B02``...)
  in a non-standard order, EPSG:32631, 10 m, 96 x 128.
* ``nodesc/S2_20220614_nodesc.tif``: 4 bands (B4, B3, B2, B8), no descriptions.
* ``esa/T31UFQ_<date>_<band>_<res>.tif``: one file per band, 10 m bands 64 x 64 and 20 m bands
  32 x 32, two dates: 2021-10-15 (baseline < 04.00, stored as is) and 2022-06-14 (stored
  +1000 like baseline 04.00; no metadata, so the offset follows from the date). Both dates
  hold the same reflectance.
* ``esa_safe/S2B_MSIL2A_20180704T103019_N0500_...SAFE``: a reprocessed (baseline 05.00) 2018
  product in the SAFE tree, JPEG2000, stored +1000, ``MTD_MSIL2A.xml`` declaring
  ``BOA_ADD_OFFSET`` -1000 (the date alone would say 0); also B02 at 20 m and an SCL file.
* ``ee/ee_s2sr_20220614-0000000000-0000000000.tif`` and ``...-0000000000-0000000256.tif``: an
  Earth Engine export split in two tiles (256 and 96 columns), EPSG:4326 at 8.983e-5 degrees,
  float64, descriptions ``B1`` ... ``B12`` then ``QA60``, ``VV``, ``temperature_2m``, ``B4_1``.
* ``nodata/swath_undeclared.tif``: 6 bands, a triangle of 0 (outside the swath), no declared
  nodata; ``nodata/declared_65535.tif``: nodata 65535 declared, a block of 65535 and a block
  of undeclared 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

HERE = Path(__file__).resolve().parent

UTM = CRS.from_epsg(32631)
WGS84 = CRS.from_epsg(4326)
EE_RES = 8.983152841195215e-05

#: Bands of the spectra below.
SPECTRUM_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")

#: Typical reflectance (x 10000) per land-cover class, in SPECTRUM_BANDS order.
SPECTRA: dict[str, tuple[int, ...]] = {
    "water": (520, 480, 420, 260, 230, 210, 200, 190, 180, 160, 20, 110, 90),
    "crop": (310, 380, 650, 330, 1050, 2800, 3400, 3650, 3750, 3800, 40, 1850, 850),
    "soil": (900, 1120, 1480, 1900, 2100, 2300, 2480, 2600, 2700, 2750, 60, 3500, 2900),
    "urban": (1250, 1320, 1400, 1520, 1610, 1700, 1790, 1880, 1930, 1990, 50, 2250, 2050),
}
CLASSES = tuple(SPECTRA)

MULTIBAND_DESCRIPTIONS = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")
NODESC_BANDS = ("B4", "B3", "B2", "B8")
ESA_10M = ("B02", "B03", "B04", "B08")
ESA_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
ESA_DATES = ("20211015T105031", "20220614T103629")
SAFE_PRODUCT = "S2B_MSIL2A_20180704T103019_N0500_R108_T31UFQ_20230301T120000.SAFE"
SAFE_GRANULE = "GRANULE/L2A_T31UFQ_A006789_20180704T103500/IMG_DATA"
SAFE_SCENE = "T31UFQ_20180704T103019"
EE_SPECTRAL = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
EE_DESCRIPTIONS = (*EE_SPECTRAL, "QA60", "VV", "temperature_2m", "B4_1")
EE_PREFIX = "ee_s2sr_20220614"
EE_TILES = ((0, 256), (256, 96))  # (column offset, width)
EE_HEIGHT = 32
SWATH_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")


def land_cover(height: int, width: int, seed: int) -> np.ndarray:
    """Class map: rectangular fields, a diagonal river and a town block."""
    rng = np.random.default_rng(seed)
    cell = 8
    fields = rng.integers(1, 3, size=(height // cell + 1, width // cell + 1))
    classes = np.kron(fields, np.ones((cell, cell), dtype=int))[:height, :width]
    rows, cols = np.mgrid[0:height, 0:width]
    classes[np.abs(rows - 0.6 * cols - height * 0.2) < 3] = 0
    classes[height // 2 : height // 2 + height // 5, width // 5 : width // 5 + width // 6] = 3
    return classes.astype(np.uint8)


def reflectance(classes: np.ndarray, bands: tuple[str, ...], seed: int) -> np.ndarray:
    """(C, H, W) float reflectance x 10000 for a class map."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(bands), *classes.shape), dtype=np.float64)
    for c, band in enumerate(bands):
        name = "B" + band[1:].lstrip("0") if band[1:] != "8A" else "B8A"
        column = SPECTRUM_BANDS.index(name)
        means = np.array([SPECTRA[k][column] for k in CLASSES], dtype=np.float64)
        base = means[classes]
        out[c] = base * (1 + 0.01 * rng.standard_normal(classes.shape))
    return np.clip(np.rint(out), 1, 10000)


def _write(
    path: Path,
    data: np.ndarray,
    crs: CRS,
    transform: rasterio.Affine,
    descriptions: tuple[str, ...] | None = None,
    nodata: float | None = None,
    driver: str = "GTiff",
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict = dict(
        driver=driver,
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    )
    if driver == "GTiff":
        predictor = 3 if data.dtype.kind == "f" else 2
        profile.update(compress="deflate", predictor=predictor, zlevel=9)
    else:
        profile.update(QUALITY="100", REVERSIBLE="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)


def _mtd_xml(start: str, baseline: str, offset: int | None) -> str:
    names = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
    spectral = "\n".join(
        f'        <Spectral_Information bandId="{i}" physicalBand="{b}"/>'
        for i, b in enumerate(names)
    )
    offsets = ""
    if offset is not None:
        offsets = (
            "      <BOA_ADD_OFFSET_VALUES_LIST>\n"
            + "\n".join(
                f'        <BOA_ADD_OFFSET band_id="{i}">{offset}</BOA_ADD_OFFSET>'
                for i in range(len(names))
            )
            + "\n      </BOA_ADD_OFFSET_VALUES_LIST>\n"
        )
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
  <n1:General_Info>
    <Product_Info>
      <PRODUCT_START_TIME>{start}</PRODUCT_START_TIME>
      <PROCESSING_LEVEL>Level-2A</PROCESSING_LEVEL>
      <PRODUCT_TYPE>S2MSI2A</PRODUCT_TYPE>
      <PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>
    </Product_Info>
    <Product_Image_Characteristics>
      <Special_Values>
        <SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT>
        <SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX>
      </Special_Values>
      <QUANTIFICATION_VALUES_LIST>
        <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>
      </QUANTIFICATION_VALUES_LIST>
{offsets}      <Spectral_Information_List>
{spectral}
      </Spectral_Information_List>
    </Product_Image_Characteristics>
  </n1:General_Info>
</n1:Level-2A_User_Product>
"""


def generate(root: Path | str = HERE) -> Path:
    """Write every fixture layout under ``root``.

    Args:
        root: output folder (default: next to this script).

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)

    # Multi-band with descriptions (ESA spelling, unusual order).
    classes = land_cover(96, 128, seed=1)
    data = reflectance(classes, MULTIBAND_DESCRIPTIONS, seed=2).astype(np.uint16)
    _write(
        root / "multiband" / "S2_20220614_multiband.tif",
        data,
        UTM,
        from_origin(620000, 5702000, 10, 10),
        MULTIBAND_DESCRIPTIONS,
    )

    # Multi-band without descriptions.
    classes = land_cover(64, 80, seed=3)
    data = reflectance(classes, NODESC_BANDS, seed=4).astype(np.uint16)
    _write(
        root / "nodesc" / "S2_20220614_nodesc.tif",
        data,
        UTM,
        from_origin(630000, 5702000, 10, 10),
    )

    # ESA per-band files, two dates, 10 m and 20 m.
    classes = land_cover(64, 64, seed=5)
    ten = reflectance(classes, ESA_10M, seed=6)
    twenty = reflectance(classes[::2, ::2], ESA_20M, seed=7)
    for when in ESA_DATES:
        add = 1000 if when >= "20220125" else 0
        for band, layer in zip(ESA_10M, ten, strict=True):
            _write(
                root / "esa" / f"T31UFQ_{when}_{band}_10m.tif",
                (layer[None] + add).astype(np.uint16),
                UTM,
                from_origin(600000, 5700000, 10, 10),
            )
        for band, layer in zip(ESA_20M, twenty, strict=True):
            _write(
                root / "esa" / f"T31UFQ_{when}_{band}_20m.tif",
                (layer[None] + add).astype(np.uint16),
                UTM,
                from_origin(600000, 5700000, 20, 20),
            )

    # SAFE tree of a reprocessed 2018 product (baseline 05.00): JPEG2000 + MTD_MSIL2A.xml.
    safe = root / "esa_safe" / SAFE_PRODUCT
    safe.mkdir(parents=True, exist_ok=True)
    (safe / "MTD_MSIL2A.xml").write_text(_mtd_xml("2018-07-04T10:30:19.024Z", "05.00", -1000))
    classes = land_cover(48, 48, seed=8)
    ten = reflectance(classes, ESA_10M, seed=9)
    for band, layer in zip(ESA_10M, ten, strict=True):
        _write(
            safe / SAFE_GRANULE / "R10m" / f"{SAFE_SCENE}_{band}_10m.jp2",
            (layer[None] + 1000).astype(np.uint16),
            UTM,
            from_origin(640000, 5702000, 10, 10),
            driver="JP2OpenJPEG",
        )
    coarse = ("B02", "B05", "B11", "B12")
    twenty = reflectance(classes[::2, ::2], coarse, seed=10)
    for band, layer in zip(coarse, twenty, strict=True):
        _write(
            safe / SAFE_GRANULE / "R20m" / f"{SAFE_SCENE}_{band}_20m.jp2",
            (layer[None] + 1000).astype(np.uint16),
            UTM,
            from_origin(640000, 5702000, 20, 20),
            driver="JP2OpenJPEG",
        )
    scl = np.full((1, 24, 24), 4, dtype=np.uint8)
    _write(
        safe / SAFE_GRANULE / "R20m" / f"{SAFE_SCENE}_SCL_20m.jp2",
        scl,
        UTM,
        from_origin(640000, 5702000, 20, 20),
        driver="JP2OpenJPEG",
    )

    # Earth Engine export, two tiles, EPSG:4326, float64.
    total = sum(w for _, w in EE_TILES)
    classes = land_cover(EE_HEIGHT, total, seed=11)
    spectral = reflectance(classes, EE_DESCRIPTIONS[:12], seed=12)
    rng = np.random.default_rng(13)
    qa60 = np.where(rng.random(classes.shape) < 0.05, 1024.0, 0.0)
    vv = np.round((-12.0 + rng.standard_normal(classes.shape)) * 8) / 8  # 1/8 dB steps
    temperature = np.full(classes.shape, 290.35)
    b4_other_date = np.rint(spectral[3] * 1.1)
    stack = np.concatenate(
        [spectral, qa60[None], vv[None], temperature[None], b4_other_date[None]]
    ).astype(np.float64)
    lon0, lat0 = 4.5, 51.0
    for col, width in EE_TILES:
        _write(
            root / "ee" / f"{EE_PREFIX}-0000000000-{col:010d}.tif",
            np.ascontiguousarray(stack[:, :, col : col + width]),
            WGS84,
            from_origin(lon0 + col * EE_RES, lat0, EE_RES, EE_RES),
            EE_DESCRIPTIONS,
        )

    # No-data: undeclared zeros outside a swath; declared 65535 plus undeclared zeros.
    classes = land_cover(64, 64, seed=14)
    data = reflectance(classes, SWATH_BANDS, seed=15)
    rows, cols = np.mgrid[0:64, 0:64]
    data[:, rows > cols + 20] = 0
    _write(
        root / "nodata" / "swath_undeclared.tif",
        data.astype(np.uint16),
        UTM,
        from_origin(650000, 5702000, 10, 10),
        SWATH_BANDS,
    )
    data = reflectance(classes, NODESC_BANDS, seed=16)
    data[:, 10:20, 10:30] = 65535
    data[:, 40:50, 0:10] = 0
    _write(
        root / "nodata" / "declared_65535.tif",
        data.astype(np.uint16),
        UTM,
        from_origin(660000, 5702000, 10, 10),
        NODESC_BANDS,
        nodata=65535,
    )
    return root


if __name__ == "__main__":
    out = generate()
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.suffix != ".py":
            print(f"{path.stat().st_size:>8}  {path.relative_to(out)}")
