"""Small GeoTIFFs cut from the bundled demo scene, written by the tests that need them."""

from __future__ import annotations

from pathlib import Path

import rasterio
from rasterio.transform import Affine

SCENE = Path(__file__).resolve().parents[1] / "demo" / "data" / "ftw_s2_l2a_33N.tif"


def dated_copies(folder: Path, names_offsets: list[tuple[str, float, int]]) -> None:
    """256 x 256 px of the demo scene as GeoTIFFs named with dates, each shifted east by its
    offset (m) and with its value added (distinct dates, distinct pixels)."""
    with rasterio.open(SCENE) as src:
        profile, names, t = src.profile, list(src.descriptions), src.transform
        data = src.read(window=((0, 256), (0, 256)))
    folder.mkdir()
    for name, east, add in names_offsets:
        transform = Affine(10.0, 0.0, t.c + east, 0.0, -10.0, t.f)
        profile |= {"width": 256, "height": 256, "transform": transform}
        with rasterio.open(folder / name, "w", **profile) as dst:
            dst.write(data + add)
            dst.descriptions = names
