#!/usr/bin/env python3
"""Recipe for a small EuroSAT look-alike in TorchGeo's layout (nothing of it is committed).

``python tests/data/eurosat/data.py FOLDER`` writes it into FOLDER; the tests call
:func:`generate` with a temporary folder. Everything is seeded, so the output is reproducible.

The layout is what TorchGeo's ``EuroSAT``, ``EuroSAT100`` and ``EuroSATSpatial`` read once
extracted: ``ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif``
(13-band uint16 GeoTIFFs of 64 x 64 pixels, TorchGeo's band order ``B01`` ... ``B12``, ``B8A``
last; EPSG:32631 at 10 m) and the split lists (``eurosat-train.txt``, ``eurosat-100-train.txt``,
``eurosat-spatial-train.txt``, ...: one ``<Class>_<n>.jpg`` a line, as the originals spell
them). Three classes whose Level-1C reflectance x 10000 differs as water, forest and
cropland do (a typical spectrum per class, 3 % noise), so a probe can tell them apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

#: Where TorchGeo's EuroSAT looks for the class folders, under its root.
BASE_DIR = Path("ds/images/remote_sensing/otherDatasets/sentinel_2/tif")

#: TorchGeo's EuroSAT band order (``EuroSAT.all_band_names``).
BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")

#: Typical top-of-atmosphere reflectance x 10000 per class, in :data:`BANDS` order.
SPECTRA: dict[str, tuple[int, ...]] = {
    "AnnualCrop": (1300, 1100, 1050, 1000, 1400, 2200, 2600, 2700, 800, 15, 2400, 1500, 2900),
    "Forest": (1200, 950, 800, 600, 900, 2000, 2500, 2500, 700, 12, 1300, 600, 2700),
    "SeaLake": (1400, 1200, 1000, 700, 600, 500, 480, 450, 300, 8, 150, 100, 400),
}

#: Images a class per split.
PER_CLASS = {"train": 4, "val": 2, "test": 2}

#: Each split's list, for every EuroSAT flavour TorchGeo has.
SPLIT_FILES = {
    "train": ("eurosat-train.txt", "eurosat-100-train.txt", "eurosat-spatial-train.txt"),
    "val": ("eurosat-val.txt", "eurosat-100-val.txt", "eurosat-spatial-val.txt"),
    "test": ("eurosat-test.txt", "eurosat-100-test.txt", "eurosat-spatial-test.txt"),
}

SIZE = 64


def generate(root: Path, seed: int = 0) -> Path:
    """Write the EuroSAT look-alike under ``root``; return ``root``."""
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {split: [] for split in PER_CLASS}
    n = 0
    for name, spectrum in SPECTRA.items():
        folder = root / BASE_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, count in PER_CLASS.items():
            for _ in range(count):
                n += 1
                base = np.asarray(spectrum, dtype=np.float64)[:, None, None]
                noise = rng.normal(1.0, 0.03, size=(len(BANDS), SIZE, SIZE))
                data = np.clip(base * noise, 1, 10000).astype(np.uint16)
                path = folder / f"{name}_{n}.tif"
                profile = {
                    "driver": "GTiff",
                    "width": SIZE,
                    "height": SIZE,
                    "count": len(BANDS),
                    "dtype": "uint16",
                    "crs": CRS.from_epsg(32631),
                    "transform": from_origin(500000 + 640 * n, 5500000, 10, 10),
                }
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(data)
                lines[split].append(f"{path.stem}.jpg")
    for split, names in SPLIT_FILES.items():
        for file in names:
            (root / file).write_text("".join(f"{line}\n" for line in lines[split]))
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/eurosat/data.py FOLDER")
    print(generate(Path(sys.argv[1])))
