"""Recipe for the demo scene ``ftw_s2_l2a_33N.tif`` (run: ``python demo/data/make_scene.py SRC``).

Source: fieldsoftheworld/ftw-baselines @ 0bc7a853, ``tests/data-files/inference-img.tif``
(MIT licence, ``LICENSE.ftw`` beside this file; Copernicus Sentinel-2 L2A data, free and
open). The source holds two dates x (B04, B03, B02, B08), uint16, 379 x 578 px at 10 m in
EPSG:32633, without band descriptions. The demo keeps the first (cloud-free) date and writes
the band names as descriptions, deflate-compressed, so the datasets read it without ``bands=``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import rasterio

BANDS = ("B04", "B03", "B02", "B08")


def main(src: Path, dst: Path) -> None:
    """Write the first date of ``src`` with band descriptions to ``dst``."""
    with rasterio.open(src) as s:
        data = s.read([1, 2, 3, 4])
        profile = s.profile | {
            "count": 4,
            "compress": "deflate",
            "predictor": 2,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "interleave": "band",
            "nodata": 0,
        }
    with rasterio.open(dst, "w", **profile) as d:
        d.write(data)
        d.descriptions = BANDS
        d.update_tags(
            source="fieldsoftheworld/ftw-baselines@0bc7a853 tests/data-files/inference-img.tif",
            licence="MIT (LICENSE.ftw); contains modified Copernicus Sentinel data",
            date_note="first of the two dates in the source (bands 1-4)",
        )


if __name__ == "__main__":
    src = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path("../shared/data/sentinel2/ftw/inference-img.tif")
    )
    main(src, Path(__file__).with_name("ftw_s2_l2a_33N.tif"))
