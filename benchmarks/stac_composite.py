"""Peak memory and time of a STAC composite against its window budget.

``python benchmarks/stac_composite.py`` (about 2 minutes on 2 cores) writes ``--dates`` local
Sentinel-2-like items (4 bands of random digital numbers at 10 m and a 20 m SCL, COGs described
by rio-stac as the tests' items are) over a ``--side`` x ``--side`` px box, then composites
them with :func:`torchgeo_dofa.stac.composite_to_geotiff` (median) once per window budget, each
in its own process, and prints one table: budget, windows, seconds, peak RSS (``ru_maxrss``,
the interpreter and its imports included) and whether the pixels equal the one-window run.
An unlimited budget is the composite's memory before windowing (every date of the whole box
at once).
"""

from __future__ import annotations

import argparse
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
#: 10 m grid origin of the generated items (UTM 33N, ~45 N).
ORIGIN = (500000.0, 5000000.0)


def _make_items(folder: Path, dates: int, side: int) -> list[Any]:
    """``dates`` items of random reflectance over ``side`` x ``side`` px (the tests' layout)."""
    sys.path.insert(0, str(ROOT))
    from tests.test_stac import ASSETS, BANDS, _item

    rng = np.random.default_rng(0)
    tf = Affine(10.0, 0, ORIGIN[0], 0, -10.0, ORIGIN[1])
    scl_tf = Affine(20.0, 0, ORIGIN[0], 0, -20.0, ORIGIN[1])
    props = {"eo:cloud_cover": 1.0, "s2:processing_baseline": "03.00"}
    items = []
    for i in range(dates):
        arrays = {ASSETS[b]: rng.integers(300, 6000, (side, side)).astype(np.uint16) for b in BANDS}
        scl = np.full((side // 2, side // 2), 4, np.uint8)
        scl[rng.random(scl.shape) < 0.1] = 9  # 10 % cloud: the median has gaps to skip
        when = f"2021-06-{i % 28 + 1:02d}T10:{i // 28:02d}:00"
        items.append(_item(folder, f"item{i}", when, arrays, tf, scl, scl_tf, props))
    return items


def _box(side: int) -> Any:
    """The lon/lat box 100 m inside the items' footprint."""
    from pyproj import Transformer

    from torchgeo_dofa.spatial import BBox

    to_4326 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    x0, y1 = ORIGIN
    lo = to_4326.transform(x0 + 100, y1 - side * 10 + 100)
    hi = to_4326.transform(x0 + side * 10 - 100, y1 - 100)
    return BBox(lo[0], lo[1], hi[0], hi[1])


def _one(items_file: Path, side: int, budget: int, out: Path) -> None:
    """Child process: one composite; prints ``windows seconds peak_mb``."""
    sys.path.insert(0, str(ROOT))
    from tests.test_stac import BANDS
    from torchgeo_dofa import stac

    items = pickle.loads(items_file.read_bytes())
    box = _box(side)
    grid = stac.stac_grid(box)
    windows = stac._composite_windows(grid, len(items) * (len(BANDS) + 1) * 8, budget)
    start = time.perf_counter()
    stac.composite_to_geotiff(items, box, BANDS, out, composite="median", window_bytes=budget)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(len(windows), f"{seconds:.1f}", f"{peak:.0f}")


def main() -> None:
    """Run the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dates", type=int, default=10)
    parser.add_argument("--side", type=int, default=2000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _one(Path(args.child[0]), args.side, int(args.child[1]), Path(args.child[2]))
        return
    import rasterio

    from torchgeo_dofa.stac import COMPOSITE_WINDOW_BYTES

    budgets = [1 << 50, 512 << 20, COMPOSITE_WINDOW_BYTES, 128 << 20, 32 << 20]
    budgets = sorted(set(budgets), reverse=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        items_file = folder / "items.pkl"
        items_file.write_bytes(pickle.dumps(_make_items(folder / "items", args.dates, args.side)))
        print(f"{args.dates} dates x 4 bands + SCL, {args.side} x {args.side} px box, median")
        print(f"{'budget':>10} {'windows':>8} {'seconds':>8} {'peak RSS':>10}  same pixels")
        reference = None
        for budget in budgets:
            out = folder / f"c{budget}.tif"
            child = [str(items_file), str(budget), str(out)]
            cmd = [sys.executable, __file__, "--side", str(args.side), "--child", *child]
            windows, seconds, peak = subprocess.run(
                cmd, check=True, capture_output=True, text=True
            ).stdout.split()
            with rasterio.open(out) as src:
                pixels = src.read()
            if reference is None:
                reference = pixels
            same = np.array_equal(pixels, reference, equal_nan=True)
            label = "unlimited" if budget >= 1 << 50 else f"{budget >> 20} MiB"
            default = " (default)" if budget == COMPOSITE_WINDOW_BYTES else ""
            print(f"{label:>10} {windows:>8} {seconds:>8} {peak + ' MB':>10}  {same}{default}")


if __name__ == "__main__":
    main()
