"""``make demo``: embed the bundled Sentinel-2 scene.

Writes a grid GeoTIFF, a pooled GeoParquet and a PCA preview PNG under ``demo_output/``.

It uses the official DOFA base weights. Where Hugging Face cannot be reached (and no local
copy is configured through ``TORCHGEO_DOFA_BASE_WEIGHTS`` / ``TORCHGEO_DOFA_WEIGHTS_DIR``), it
says so and continues with randomly initialised weights, stamping that into the outputs'
metadata. The library and the CLI never fall back like this: only the demo does.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENE = HERE / "data" / "ftw_s2_l2a_33N.tif"
OUT = HERE.parent / "demo_output"


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub can be opened."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def main() -> int:
    """Run the demo job."""
    shutil.rmtree(OUT, ignore_errors=True)  # the demo always starts from scratch
    online = hub_reachable()
    if not online:
        # only the local cache can serve the weights: fail fast instead of retrying
        os.environ["HF_HUB_OFFLINE"] = "1"

    from torchgeo_dofa.__main__ import apply_malloc_defaults, apply_openmp_defaults

    apply_openmp_defaults()  # as the torchgeo-dofa command does, before torch is loaded
    apply_malloc_defaults()
    from torchgeo_dofa.cli import embed
    from torchgeo_dofa.preview import render_preview
    from torchgeo_dofa.weights import CheckpointError, resolve_weights

    weights: str | None = "official"
    extra = {"weights_note": "official DOFA base weights"}
    try:
        resolve_weights("base", "official")
    except CheckpointError as err:
        weights = None
        extra = {"weights_note": "RANDOM weights: official weights unavailable (demo fallback)"}
        print(
            "demo: the official DOFA base weights could not be obtained "
            f"({'Hugging Face is unreachable' if not online else 'download failed'}): {err}\n"
            "demo: continuing with RANDOMLY INITIALISED weights; the outputs are stamped "
            "'weights=random' and are not meaningful embeddings.",
            file=sys.stderr,
        )
    summary = embed(
        [SCENE],
        OUT,
        variant="base",
        output="both",
        weights=weights,
        seed=None if weights else 0,
        metadata=extra,
    )
    grid = next(p for p in summary.outputs if p.suffix == ".tif")
    png = render_preview(grid, OUT / f"{grid.stem}_preview.png")
    print(summary.line())
    print("demo outputs:")
    for path in [*summary.outputs, png]:
        print(f"  {path}")
    print(
        "open the .tif in QGIS (Layer > Add Raster Layer), the .parquet with "
        "geopandas.read_parquet(...)"
    )
    return 0


if __name__ == "__main__":
    from torchgeo_dofa.__main__ import run_as_command

    sys.exit(run_as_command(main))  # as the torchgeo-dofa command exits (no ~1 s teardown)
