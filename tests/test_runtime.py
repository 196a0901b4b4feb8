"""Hardware defaults: precision, batch size, workers, and GDAL's cache in bytes."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch.utils.data import DataLoader, Dataset

from torchgeo_dofa import runtime
from torchgeo_dofa.runtime import (
    GDAL_CACHE_MIN_BYTES,
    GDAL_SCAN_MIN_BYTES,
    decimated_read,
    default_batch_size,
    default_num_workers,
    default_precision,
    gdal_cache_bytes,
    gdal_env,
    gdal_scan_cache_bytes,
    gdal_worker_init,
    loader_options,
    resolve_precision,
)

MIB = 2**20


def _libgdal() -> ctypes.CDLL | None:
    """The GDAL library rasterio runs on (to read GDALGetCacheMax64 back)."""
    libs = Path(rasterio.__file__).parent.with_name("rasterio.libs")
    found = sorted(glob.glob(str(libs / "libgdal*")))
    name = found[0] if found else ctypes.util.find_library("gdal")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return lib


GDAL = _libgdal()
needs_gdal = pytest.mark.skipif(GDAL is None, reason="cannot locate rasterio's libgdal")


@needs_gdal
def test_rasterio_env_integer_cache_is_bytes_and_gdal_env_sets_bytes() -> None:
    assert GDAL is not None
    # the fact the module is built on: an integer is bytes, not MB
    with rasterio.Env(GDAL_CACHEMAX=256):
        assert GDAL.GDALGetCacheMax64() == 256
    with gdal_env(300 * MIB):
        assert GDAL.GDALGetCacheMax64() == 300 * MIB
    with pytest.raises(ValueError, match="in bytes"):
        gdal_env(256)


class _CacheProbe(Dataset[int]):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        assert GDAL is not None
        return int(GDAL.GDALGetCacheMax64())


@needs_gdal
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork start method")
def test_gdal_worker_init_sets_the_cache_in_workers() -> None:
    loader = DataLoader(
        _CacheProbe(),
        num_workers=1,
        worker_init_fn=gdal_worker_init(96 * MIB),
        multiprocessing_context="fork",
    )
    assert [int(v) for v in loader] == [96 * MIB, 96 * MIB]


def _sparse_tif(
    path: Path,
    width: int,
    height: int,
    count: int,
    dtype: str,
    block: int,
    interleave: str = "pixel",
) -> Path:
    """A tiled GeoTIFF whose blocks are never written (SPARSE_OK): instant at any size."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        tiled=True,
        blockxsize=block,
        blockysize=block,
        sparse_ok=True,
        interleave=interleave,
        crs="EPSG:32631",
        transform=from_origin(500000, 5000000, 10, 10),
    ):
        pass
    return path


def test_gdal_cache_holds_a_chip_row_of_blocks(tmp_path: Path) -> None:
    wide = _sparse_tif(tmp_path / "wide.tif", 12000, 3000, 4, "float64", 512)
    small = _sparse_tif(tmp_path / "small.tif", 500, 400, 3, "uint16", 256)
    # one chip row (224 px) straddles at most 2 block rows of 512; 24 blocks across
    wide_need = 24 * 512 * (2 * 512) * 4 * 8
    small_need = 2 * 256 * (2 * 256) * 3 * 2
    ram = 64 * 2**30
    got = gdal_cache_bytes([wide, small], memory_bytes=ram)
    assert got == 2 * (wide_need + small_need)
    assert GDAL_CACHE_MIN_BYTES <= got <= ram // 8
    # small inputs get the floor; memory caps it, split between the processes reading
    assert gdal_cache_bytes([small], memory_bytes=ram) == GDAL_CACHE_MIN_BYTES
    capped = gdal_cache_bytes([wide], memory_bytes=4 * 2**30, processes=2)
    assert capped == 4 * 2**30 // 8 // 2
    assert gdal_cache_bytes([], memory_bytes=ram) == runtime.GDAL_CACHE_DEFAULT_BYTES


def _cgroup_tree(root: Path, limits: dict[str, str]) -> None:
    """Write cgroup limit files (``{"slurm/job_42/memory.max": "17179869184"}``) under root."""
    for relative, value in limits.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(value + "\n")


@pytest.mark.parametrize(
    ("membership", "limits", "expected"),
    [
        # cgroup v2, a SLURM job step: the job's --mem=16G sits two levels below the root
        (
            "0::/slurm/uid_1000/job_42/step_0\n",
            {
                "slurm/memory.max": "max",
                "slurm/uid_1000/job_42/memory.max": str(16 * 2**30),
                "slurm/uid_1000/job_42/step_0/memory.max": "max",
            },
            [16 * 2**30],
        ),
        # v2, a container (its namespace's root) with a limit, and a tighter one below
        (
            "0::/app\n",
            {"memory.max": str(8 * 2**30), "app/memory.max": str(2 * 2**30)},
            [2 * 2**30, 8 * 2**30],
        ),
        # cgroup v1 beside v2's empty line (a hybrid host: this VM's layout), no limit:
        # v1 writes "no limit" as a huge number
        (
            "9:name=systemd:/\n4:memory:/process_api/e2ad\n0::/\n",
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "memory/process_api/e2ad/memory.limit_in_bytes": "9223372036854771712",
            },
            [],
        ),
        # v1, the memory controller mounted with another, a limit on the process's group
        (
            "3:cpu,memory:/batch/job7\n",
            {"memory/batch/job7/memory.limit_in_bytes": str(4 * 2**30)},
            [4 * 2**30],
        ),
        # no /proc/self/cgroup to read: the root's files, as before
        (None, {"memory.max": str(3 * 2**30)}, [3 * 2**30]),
    ],
)
def test_cgroup_memory_limits_of_the_process_group_and_above(
    tmp_path: Path, membership: str | None, limits: dict[str, str], expected: list[int]
) -> None:
    """The loader's and the suite's memory sizing read a nested cgroup's limit (a SLURM job's
    ``--mem`` on a big node): only the hierarchy root's files were read, where a job's limit
    never is, so the GDAL cache and worker counts were sized for the whole machine."""
    root = tmp_path / "cgroup"
    _cgroup_tree(root, limits)
    cgroup_file = tmp_path / "self_cgroup"
    if membership is not None:
        cgroup_file.write_text(membership)
    found = runtime._cgroup_memory_limits(root, cgroup_file)
    assert sorted(found) == sorted(expected)


def test_physical_memory_is_at_most_the_ram() -> None:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    found = runtime._physical_memory(address_space=False)
    assert found is not None and 0 < found <= ram


def test_default_workers_leave_a_core_to_the_model() -> None:
    assert [default_num_workers(n) for n in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    assert default_num_workers(8, "mps") == 4  # shares the cores like a CPU job


def test_default_workers_on_cuda_use_the_cores_the_gpu_leaves() -> None:
    """On CUDA every core but two reads chips, split among the job's processes, at most 8."""
    cuda = [default_num_workers(n, "cuda") for n in (1, 2, 3, 6, 10, 16, 64)]
    assert cuda == [0, 1, 1, 4, 8, 8, 8]
    assert [default_num_workers(16, "cuda", processes=p) for p in (1, 2, 4, 8)] == [8, 7, 3, 1]
    assert default_num_workers(4, "cuda", processes=8) == 1  # never 0 with cores to spare
    opts = loader_options("cpu", 2)
    assert opts["num_workers"] == 2 and opts["pin_memory"] is False
    assert loader_options("cpu", 0) == {"num_workers": 0, "pin_memory": False}
    with pytest.raises(ValueError, match="num_workers"):
        loader_options("cpu", -1)


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo")
def test_cpu_default_precision_follows_native_bf16() -> None:
    flags = _cpu_flags()
    native = bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    kernels = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    choice = default_precision("cpu")
    assert choice.precision == ("bf16" if native and kernels else "32"), choice
    assert choice.chosen_by == "default" and choice.reason.startswith(
        "bf16" if choice.precision == "bf16" else "fp32"
    )
    assert choice.lightning == ("bf16-mixed" if choice.precision == "bf16" else "32-true")


def test_user_precision_wins_and_bad_names_are_refused() -> None:
    assert resolve_precision("32", "cpu").precision == "32"
    assert resolve_precision("bf16-mixed", "cpu").chosen_by == "user"
    assert resolve_precision(None, "cpu").precision == "32"  # TORCHGEO_DOFA_PRECISION=32 here
    assert "TORCHGEO_DOFA_PRECISION=32" in resolve_precision("auto", "cpu").reason
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TORCHGEO_DOFA_PRECISION", raising=False)
        assert resolve_precision(None, "cpu") == default_precision("cpu")
        mp.setenv("TORCHGEO_DOFA_PRECISION", "bf16")
        assert resolve_precision(None, "cpu").precision == "bf16"
        assert resolve_precision("32", "cpu").precision == "32"  # an explicit choice wins
        # a bad value in the environment was reported as "unknown --precision 'foo'"
        mp.setenv("TORCHGEO_DOFA_PRECISION", "foo")
        with pytest.raises(ValueError) as bad:
            resolve_precision(None, "cpu")
        assert str(bad.value) == (
            "the environment's TORCHGEO_DOFA_PRECISION='foo' is not a precision: set it to "
            "auto, 32 or bf16, or unset it"
        )
    with pytest.raises(ValueError, match="choose auto, 32 or bf16"):
        resolve_precision("fp16", "cpu")


def test_default_batch_sizes_on_cpu() -> None:
    assert default_batch_size("cpu", "32") == 8
    assert default_batch_size("cpu", "bf16") == 32
    assert default_batch_size("cpu", "bf16", "large") == 16
    assert default_batch_size("cpu", "32", "l") == 4
    with pytest.raises(ValueError, match="unknown DOFA variant"):
        default_batch_size("cpu", "32", "huge")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_without_one_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--device cpu"):
        runtime.resolve_accelerator("gpu")
    with pytest.raises(ValueError, match="choose auto, cpu or gpu"):
        runtime.resolve_accelerator("tpu9")


def test_cache_formula_for_strip_organised_files(tmp_path: Path) -> None:
    """Untiled files: a block is a strip across the whole width."""
    path = tmp_path / "strips.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=60000,
        height=2000,
        count=4,
        dtype="float64",
        sparse_ok=True,
        crs="EPSG:32631",
        transform=from_origin(500000, 5000000, 10, 10),
    ):
        pass
    with rasterio.open(path) as src:
        bh, bw = src.block_shapes[0]
    assert bw == 60000  # strips
    rows = min((math.ceil(224 / bh) + 1) * bh, 2000 + bh)
    need = 2 * (60000 * rows * 4 * 8)
    assert need > GDAL_CACHE_MIN_BYTES
    assert gdal_cache_bytes([path], memory_bytes=2**35) == need


_SCAN_PROBE = """
import sys
from torchgeo_dofa.datamodules import check_raw_reflectance
from torchgeo_dofa.datasets import Sentinel2SR


def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


path, small = sys.argv[1:3]
check_raw_reflectance(Sentinel2SR(small, bands=("B4", "B3", "B2", "B8")))  # warm up
ds = Sentinel2SR(path, bands=("B4", "B3", "B2", "B8"))
start = peak_mb()
check_raw_reflectance(ds)
print(peak_mb() - start)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
@pytest.mark.parametrize("interleave", ["pixel", "band"])
def test_scale_check_memory_does_not_grow_with_the_raster(tmp_path: Path, interleave: str) -> None:
    """The scale check before every job reads a whole raster decimated: its memory must not
    grow with the raster. A 2048 x 60000 4-band uint16 GeoTIFF decodes to 983 MB; read in one
    call under GDAL's default cache (5 % of the RAM: 1.2 GB on the 24 GB machine this was
    written on) the decoded blocks stayed cached and the process grew by 921 MB; read one
    block row at a time under a cache of two rows it grows by a few MB. Blocks are sparse
    (never written, read as 0 = no data) except the first, so the file is instant to make;
    it still decodes block by block. On a machine with under ~4 GB of RAM GDAL's default is
    itself small."""
    small = tmp_path / "small" / "T33UXP_20210601T100559.tif"
    small.parent.mkdir()
    path = tmp_path / "T33UXP_20210601T100559.tif"
    for file, height in ((small, 1024), (path, 60000)):
        _sparse_tif(file, 2048, height, 4, "uint16", 512, interleave)
        with rasterio.open(file, "r+") as dst:
            dst.nodata = 0
            dst.write(np.full((4, 512, 512), 1500, np.uint16), window=((0, 512), (0, 512)))
            for i, name in enumerate(("B4", "B3", "B2", "B8"), start=1):
                dst.set_band_description(i, name)
    proc = subprocess.run(
        [sys.executable, "-c", _SCAN_PROBE, str(path), str(small)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_mb = float(proc.stdout.split()[-1])
    assert check_mb < 200, f"scale check grew the process by {check_mb:.0f} MB"


def test_decimated_read_samples_every_block_row_evenly(tmp_path: Path) -> None:
    # values = the row index: the chunked read must return every scale-th row, in order,
    # with the columns decimated the same way, whatever the block size
    path = tmp_path / "rows.tif"
    height, width = 1000, 300
    rows = np.broadcast_to(np.arange(height, dtype=np.uint16)[:, None], (height, width))
    cols = np.broadcast_to(np.arange(width, dtype=np.uint16)[None, :], (height, width))
    _sparse_tif(path, width, height, 2, "uint16", 128)
    with rasterio.open(path, "r+") as dst:
        dst.write(np.stack([rows, cols]))
    out = decimated_read(path, 100)  # scale 10: 100 x 30
    assert out.shape == (2, 100, 30)
    got_rows = out[0, :, 0].astype(int)
    assert np.all(np.diff(got_rows) == 10) and 0 <= got_rows[0] < 10
    got_cols = out[1, 0, :].astype(int)
    assert np.all(np.diff(got_cols) == 10) and 0 <= got_cols[0] < 10
    # a file smaller than max_side is read whole
    assert np.array_equal(decimated_read(path, 5000), np.stack([rows, cols]))


def test_gdal_scan_cache_is_two_block_rows_and_never_above_gdals_default(tmp_path: Path) -> None:
    # a 10980-px, 9-band uint16 stack in 1024-px blocks: 11 blocks across, two block rows (a
    # chunk of rows can straddle them)
    wide = _sparse_tif(tmp_path / "wide.tif", 10980, 10980, 9, "uint16", 1024)
    row = 11 * 1024 * 2 * 1024 * 9 * 2
    assert gdal_scan_cache_bytes(wide, memory_bytes=64 * 2**30) == math.ceil(1.25 * row)
    # GDAL's own default is 5 % of the RAM: the scan never asks for more than that
    assert gdal_scan_cache_bytes(wide, memory_bytes=2 * 2**30) == 2 * 2**30 // 20
    small = _sparse_tif(tmp_path / "small.tif", 500, 400, 3, "uint16", 256)
    assert gdal_scan_cache_bytes(small, memory_bytes=64 * 2**30) == GDAL_SCAN_MIN_BYTES


_FAILING_WITH_A_WORKER = """
import lightning.pytorch as pl
from torchgeo_dofa.datamodules import DOFAPredictDataModule
from torchgeo_dofa.embedder import DOFAEmbedder
from torchgeo_dofa.transforms import DOFAPreprocess

# the scene's channels are B2, B3, B4, B8: a transform in the file's order is refused at the
# first chip, which a loader worker reads
prep = DOFAPreprocess(bands=["B4", "B3", "B2", "B8"])
dm = DOFAPredictDataModule({scene!r}, num_workers=1, batch_size=2, transforms=prep)
trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
trainer.predict(DOFAEmbedder(weights=None), datamodule=dm)
"""


def test_a_job_failing_while_its_loader_worker_lives_exits() -> None:
    """Workers ignored every SIGTERM (for the process group's, which the main process
    handles), so Python's exit, which terminates daemonic children and waits for them, hung
    forever after an error raised in the worker (the CLI too, after its one-line error)."""
    scene = Path(__file__).resolve().parents[1] / "demo" / "data" / "ftw_s2_l2a_33N.tif"
    script = _FAILING_WITH_A_WORKER.format(scene=str(scene))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "BandError: the sample's channels have wavelengths [0.49" in proc.stderr


#: The grace of a worker that cannot tell SIGTERM's sender apart, in the test below (the
#: default, runtime.SIGTERM_GRACE_S = 20 s, would make the test wait that long twice).
_TEST_GRACE_S = 5.0


def _worker_waiting_for_sigterm(ready: Any) -> None:
    """A stand-in for a DataLoader worker: the worker_init_fn's signal set-up, then idle."""
    import time

    runtime._sigterm_from_parent_only(grace_s=_TEST_GRACE_S)
    ready.set()
    time.sleep(60)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_worker_ignores_others_sigterm_and_ends_on_its_parents(method: str) -> None:
    """The process group's SIGTERM (scancel, kill -TERM -PGID) is the main process's to act
    on; the parent's (the loader's shutdown, Python's exit) ends the worker, also under
    forkserver, where getppid() is the fork server and the worker ignored its parent."""
    import multiprocessing
    import time

    context: Any = multiprocessing.get_context(method)
    ready = context.Event()
    worker = context.Process(target=_worker_waiting_for_sigterm, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(120) and worker.pid is not None  # spawn imports the libraries
        time.sleep(0.5)  # the waiting thread is in sigwaitinfo
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # someone else's
        worker.join(2)
        assert worker.is_alive()
        worker.terminate()  # the parent's: at once (fork), or after the grace (threads run)
        worker.join(_TEST_GRACE_S + 10)
        assert not worker.is_alive() and worker.exitcode == 143
    finally:
        if worker.is_alive():
            worker.kill()
