"""The embed job's manifest, output lock, region names, signals and whole-job checks.

Real files, real processes, real signals, a real Lightning Trainer (with a tiny module).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import geopandas as gpd
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from rasterio.crs import CRS
from shapely.geometry import Point
from torch.utils.data import DataLoader

from tests.tmpfs import tmpfs
from torchgeo_dofa.jobs import (
    LOCK_NAME,
    MANIFEST_NAME,
    InputFile,
    JobInterrupted,
    JobLockedError,
    JobManifest,
    JobMismatchError,
    OutputLock,
    PointsOutsideError,
    StopOnSignal,
    check_points,
    estimate_seconds,
    is_launcher,
    job_size_warning,
    points_outside_warning,
    unique_region_names,
)
from torchgeo_dofa.spatial import PointBuffer, read_points
from torchgeo_dofa.writers import OutputPathError, PooledWriter, identity_differences, parts_dir

ROOT = Path(__file__).resolve().parents[1]


def test_an_output_folder_that_cannot_be_made_or_locked_is_one_line_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """A full disk left the folders and an empty lock file behind with a bare errno; a path
    through a file or a read-only folder gave the same bare errno."""
    from torchgeo_dofa.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputPathError, match=r"Not a directory \(a part of the path is a file"):
        OutputLock(afile / "sub").acquire()
    scene = ROOT / "demo" / "data" / "ftw_s2_l2a_33N.tif"
    assert main(["embed", str(scene), "-o", str(afile / "sub"), "--weights", "none"]) == 2
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with open(disk / "fill", "wb") as fill, contextlib.suppress(OSError):
            while True:  # every block of the file system
                fill.write(bytes(1 << 16))
                fill.flush()
        with pytest.raises(OutputPathError, match=r"No space left on device \(free some space"):
            OutputLock(disk / "o2" / "deep").acquire()
        assert sorted(p.name for p in disk.iterdir()) == ["fill"]
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        (disk / "fill").stat()
        with pytest.raises(OutputPathError, match=r"Read-only file system \(the file system"):
            OutputLock(disk / "o3").acquire()


# --- manifest ------------------------------------------------------------------------------------


def _manifest(inputs: list[Path], **changes: Any) -> JobManifest:
    settings: dict[str, Any] = dict(
        inputs=[InputFile.of(p) for p in inputs],
        file_bands=None,
        bands=["B4", "B3", "B2", "B8"],
        wavelengths=[0.665, 0.56, 0.49, 0.842],
        variant="base",
        weights="sha256:" + "ab" * 32,
        pooled_norm="trained",
        input_prep="resize",
        chip_size=224,
        stride=224,
        precision="32-true",
        output="both",
        outputs=["scene_grid.tif", "scene_pooled.parquet"],
        region={},
        data=_reading(),
    )
    settings.update(changes)
    return JobManifest(**settings)


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "scene.tif"
    path.parent.mkdir()
    path.write_bytes(b"not really a tif, only its identity matters here")
    return path


def _fake_outputs(out: Path) -> dict[Path, bytes]:
    """Outputs and parts of a previous job, to check they are left untouched / removed."""
    files = {
        out / "scene_grid.tif": b"grid of job 1",
        out / "scene_grid.tif.parts" / "r0_c0.npy": b"part",
        out / "scene_pooled.parquet.parts" / "a.json": b"{}",
    }
    for p, data in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def test_manifest_new_job_resume_and_round_trip(tmp_path: Path, scene: Path) -> None:
    out = tmp_path / "out"
    job = _manifest([scene])
    with OutputLock(out):
        job.check_or_write(out)
        stored = json.loads((out / MANIFEST_NAME).read_text())
        assert stored["variant"] == "base" and stored["inputs"][0]["path"] == str(scene.resolve())
        assert stored["inputs"][0]["size"] == scene.stat().st_size
        assert JobManifest.from_json(stored) == job
        _fake_outputs(out)
        job.check_or_write(out)  # the same job resumes: nothing raised, its outputs kept
        assert (out / "scene_grid.tif").read_bytes() == b"grid of job 1"
        # killed between the verified rename and the parts' removal: the parts go
        assert not parts_dir(out / "scene_grid.tif").exists()
        assert (out / "scene_pooled.parquet.parts" / "a.json").exists()  # not complete yet


@pytest.mark.parametrize(
    ("change", "field", "before", "after"),
    [
        ({"variant": "large"}, "variant", "'base'", "'large'"),
        ({"weights": "random:seed=0"}, "weights", "'sha256:abab", "'random:seed=0'"),
        ({"bands": ["B4", "B3", "B2"]}, "bands", '["B4", "B3", "B2", "B8"]', '["B4", "B3", "B2"]'),
        ({"stride": 112}, "stride", "224", "112"),
        ({"region": {"bbox": [1, 2, 3, 4]}}, "region", "{}", '{"bbox": [1, 2, 3, 4]}'),
    ],
)
def test_manifest_changed_setting_is_named_and_outputs_untouched(
    tmp_path: Path, scene: Path, change: dict[str, Any], field: str, before: str, after: str
) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene]).check_or_write(out)
        files = _fake_outputs(out)
        manifest_text = (out / MANIFEST_NAME).read_text()
        with pytest.raises(JobMismatchError) as info:
            _manifest([scene], **change).check_or_write(out)
    message = str(info.value)
    assert "\n" not in message and f": {field} was {before}" in message
    assert f"now {after}" in message and "--overwrite" in message
    assert info.value.exit_status == 2
    assert all(p.read_bytes() == data for p, data in files.items())  # untouched
    assert (out / MANIFEST_NAME).read_text() == manifest_text


def _reading(**changes: str) -> dict[str, dict[str, str]]:
    settings = {
        "dataset_class": "torchgeo_dofa.datasets.Sentinel2SR",
        "offsets": "[(0.0, 0.0, 0.0, 0.0)]",
        "crs": "EPSG:32633",
        "nodata": "0.0",
        "data.time_series": "False",
    }
    return {"scene": settings | changes}


@pytest.mark.parametrize(
    ("change", "clause"),
    [
        ({"nodata": "3000.0"}, "nodata was 0.0, now 3000.0"),
        ({"crs": "EPSG:3857"}, "crs was EPSG:32633, now EPSG:3857"),
        ({"data.time_series": "True"}, "time_series was False, now True"),
        ({"offsets": "[(-1000.0,)]"}, "offsets was [(0.0, 0.0, 0.0, 0.0)], now [(-1000.0,)]"),
    ],
)
def test_manifest_changed_reading_setting_is_named(
    tmp_path: Path, scene: Path, change: dict[str, str], clause: str
) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene], data=_reading()).check_or_write(out)
        _manifest([scene], data=_reading()).check_or_write(out)  # the same job resumes
        with pytest.raises(JobMismatchError) as info:
            _manifest([scene], data=_reading(**change)).check_or_write(out)
    assert f"another job's results: {clause}; rerun with --overwrite" in str(info.value)


def test_manifest_of_an_older_version_without_reading_settings(tmp_path: Path, scene: Path) -> None:
    """Such a manifest cannot show the reading options match: a job giving some is refused;
    one giving none resumes, with a warning (the old job may have had some)."""
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene]).check_or_write(out)  # data=None: as written before the field
        stored = json.loads((out / MANIFEST_NAME).read_text())
        del stored["data"]
        (out / MANIFEST_NAME).write_text(json.dumps(stored))
        with pytest.raises(JobMismatchError) as info:
            _manifest([scene], data=_reading()).check_or_write(out, given=["--nodata"])
        assert "older torchgeo-dofa job, whose manifest does not record how pixels were " + (
            "read (--nodata cannot be checked): rerun with --overwrite"
        ) in str(info.value)
        with pytest.warns(UserWarning, match="if it was run with --nodata or --crs, rerun with"):
            assert not _manifest([scene], data=_reading()).check_or_write(out)  # resumes


def test_manifest_compares_reading_as_read_not_as_spelled(tmp_path: Path, scene: Path) -> None:
    """Both sides recording how pixels are read: the arguments' spelling (data.nodata ...)
    and file_bands are not compared; against an identity without that record (an older
    version's parts), the spelling is all there is, and it is compared."""
    spelled = {"data.nodata": "0", "data.bands": "('B2', 'B3')", "band_indexes": "[(3, 2)]"}
    plain = {"data.nodata": "None", "data.bands": "None", "band_indexes": "[(3, 2)]"}
    assert identity_differences(plain, spelled) == []
    older = {"data.nodata": "None", "data.bands": "None"}  # no band_indexes: before this record
    assert identity_differences(older, spelled) == ["data.nodata", "data.bands"]
    assert identity_differences(older, plain) == []
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene], data=_reading(**plain)).check_or_write(out)
        again = _manifest([scene], file_bands=["B4", "B3", "B2", "B8"], data=_reading(**spelled))
        assert not again.check_or_write(out)  # resumed


def test_statistics_given_on_a_resume_of_a_job_recorded_without_them_are_refused(
    tmp_path: Path, scene: Path
) -> None:
    """A job recorded before mean/std existed used DOFA's statistics: a resume giving its own
    was taken as the same job (a setting on one side only is not compared), mixing two
    normalisations in one output."""
    assert identity_differences({"x": "1"}, {"x": "1", "mean": "[10.0]"}) == ["mean"]
    assert identity_differences({"x": "1"}, {"x": "1", "mean": "None", "std": "None"}) == []
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene], data=_reading()).check_or_write(out)  # before mean/std existed
        assert not _manifest([scene], data=_reading(mean="None")).check_or_write(out)
        with pytest.raises(JobMismatchError, match=r"mean.*None.*\[10\.0"):
            _manifest([scene], data=_reading(mean="[10.0, 10.0]")).check_or_write(out)


def test_manifest_refuses_another_jobs_output_even_with_overwrite(
    tmp_path: Path, scene: Path
) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene]).check_or_write(out)  # a folder job: scene_grid.tif, ...
        named = _manifest([scene], outputs=["scene_grid.tif"])  # -o out/scene_grid.tif
        for overwrite in (False, True):
            with pytest.raises(JobMismatchError) as info:
                own = f".scene_grid.tif{MANIFEST_NAME}"
                named.check_or_write(out, overwrite=overwrite, name=own)
            assert str(info.value) == (
                f"output {out / 'scene_grid.tif'} is a result of another torchgeo-dofa embed "
                f"job, recorded in {out / MANIFEST_NAME}: choose another -o (--overwrite "
                "replaces only this job's own results)"
            )


def test_manifest_changed_input_file_is_named(tmp_path: Path, scene: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene]).check_or_write(out)
        size = scene.stat().st_size
        scene.write_bytes(b"rewritten with other content")
        with pytest.raises(
            JobMismatchError, match=f"input {scene} changed since \\(size {size} -> 28"
        ):
            _manifest([scene]).check_or_write(out)
        other = scene.with_name("other.tif")
        other.write_bytes(b"x")
        with pytest.raises(JobMismatchError, match=f"input {other} is new to this job"):
            _manifest([scene, other]).check_or_write(out)


def test_manifest_overwrite_replaces_previous_outputs(tmp_path: Path, scene: Path) -> None:
    out = tmp_path / "out"
    unrelated = out / "notes.txt"
    with OutputLock(out):
        _manifest([scene], outputs=["old_grid.tif", "scene_pooled.parquet"]).check_or_write(out)
        (out / "old_grid.tif").write_bytes(b"old")
        parts_dir(out / "old_grid.tif").mkdir()
        stale = out / f".old_grid.tif.{uuid.uuid4().hex}.tmp"
        stale.write_bytes(b"killed assembly")
        files = _fake_outputs(out)
        unrelated.write_text("mine")
        new = _manifest([scene], variant="large")
        new.check_or_write(out, overwrite=True)
    assert not (out / "old_grid.tif").exists() and not parts_dir(out / "old_grid.tif").exists()
    assert not stale.exists()
    assert not any(p.exists() for p in files)  # this job's names are cleared too
    assert not parts_dir(out / "scene_grid.tif").exists()
    assert unrelated.read_text() == "mine"  # files the manifest does not list stay
    assert JobManifest.from_json(json.loads((out / MANIFEST_NAME).read_text())) == new


def test_manifest_outputs_without_manifest_or_unreadable(tmp_path: Path, scene: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        _fake_outputs(out)
        with pytest.raises(
            JobMismatchError,
            match="holds scene_grid.tif, scene_grid.tif.parts, scene_pooled.parquet.parts with",
        ):
            _manifest([scene]).check_or_write(out)
        (out / MANIFEST_NAME).write_text("{not json")
        with pytest.raises(JobMismatchError, match="manifest .* is unreadable"):
            _manifest([scene]).check_or_write(out)
        _manifest([scene]).check_or_write(out, overwrite=True)
    assert not (out / "scene_grid.tif").exists()


def test_an_edited_or_damaged_manifest_of_the_wrong_kind_is_unreadable(
    tmp_path: Path, scene: Path
) -> None:
    """``[]`` as the manifest was an AttributeError traceback; ``"outputs": "a.tif"`` (a string)
    was taken as the outputs ``a``, ``.``, ``t``, ``i``, ``f``, which ``--overwrite`` deleted
    (it met ``.``, the folder itself). Both are an unreadable manifest now, as a truncated one
    is; --overwrite deletes this job's own outputs only."""
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene]).check_or_write(out)
    stored = json.loads((out / MANIFEST_NAME).read_text())
    cases = {
        "[]": "the manifest is a JSON list, not an object",
        json.dumps(stored | {"outputs": "t"}): "manifest field 'outputs' holds 't', not a list of",
        json.dumps(stored | {"chip_size": "224"}): "field 'chip_size' holds '224', not a whole",
        json.dumps(stored | {"inputs": [1]}): "field 'inputs' holds [1], not a list of input",
        json.dumps(stored | {"wavelengths": [True]}): "'wavelengths' holds [True], not a list",
    }
    bystander = out / "t"
    bystander.write_text("mine")
    for text, said in cases.items():
        (out / MANIFEST_NAME).write_text(text)
        with OutputLock(out), pytest.raises(JobMismatchError) as refused:
            _manifest([scene]).check_or_write(out)
        assert "is unreadable (" in str(refused.value) and said in str(refused.value)
    (out / MANIFEST_NAME).write_text(json.dumps(stored | {"outputs": "t"}))
    with OutputLock(out):
        _manifest([scene]).check_or_write(out, overwrite=True)
    assert bystander.read_text() == "mine"
    # names no job writes ("." was the folder: "Is a directory"), or hidden: unreadable
    for listed in (".", "t", ".torchgeo-dofa.lock"):
        (out / MANIFEST_NAME).write_text(json.dumps(stored | {"outputs": [listed]}))
        with OutputLock(out), pytest.raises(JobMismatchError, match="is unreadable .*GeoTIFF"):
            _manifest([scene]).check_or_write(out)
    # the job's own input listed as an output (an edited manifest): --overwrite deleted it
    mine = out / "mine.tif"
    mine.write_bytes(b"an input")
    (out / MANIFEST_NAME).write_text(json.dumps(stored | {"outputs": ["mine.tif"]}))
    with OutputLock(out), pytest.raises(JobMismatchError) as refused:
        _manifest([mine]).check_or_write(out, overwrite=True)
    assert str(refused.value) == (
        f"the job manifest {out / MANIFEST_NAME} lists mine.tif, an input of this job, as an "
        "output: it was edited or damaged; --overwrite deletes nothing: delete that manifest "
        "(keep the input) and rerun, or choose another -o"
    )
    assert mine.read_bytes() == b"an input"


def test_manifest_resume_cleans_only_this_jobs_stale_temps(tmp_path: Path, scene: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        _manifest([scene]).check_or_write(out)
        ours = [
            out / f".scene_grid.tif.{uuid.uuid4().hex}.tmp",
            out / "scene_pooled.parquet.parts" / f".k.json.{uuid.uuid4().hex}.tmp",
        ]
        theirs = out / f".other_grid.tif.{uuid.uuid4().hex}.tmp"
        for p in [*ours, theirs]:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
        _manifest([scene]).check_or_write(out)
    assert not any(p.exists() for p in ours) and theirs.exists()


def test_manifest_needs_the_lock(tmp_path: Path, scene: Path) -> None:
    with pytest.raises(RuntimeError, match="inside OutputLock"):
        _manifest([scene]).check_or_write(tmp_path / "out")


# --- lock ----------------------------------------------------------------------------------------

# Another job as the kernel sees it: OutputLock's exact protocol (flock on the lock file,
# pid written into it) without importing torch, so the child starts in milliseconds.
_HOLD = f"""
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], {LOCK_NAME!r}), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _lock_holder(
    script: str, out: Path, expect: str = "locked", **popen: Any
) -> subprocess.Popen[str]:
    """Start a process running ``script``, and wait until it says it holds ``out``'s lock
    (prints ``expect``)."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
        **popen,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == expect
    return child


def test_lock_second_job_fails_at_once_and_kill_9_leaves_no_stale_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = _lock_holder(_HOLD, out)
    try:
        start = time.perf_counter()
        with pytest.raises(JobLockedError) as info:
            OutputLock(out).acquire()
        assert time.perf_counter() - start < 1.0  # non-blocking
        assert str(info.value) == (
            f"output folder {out} is in use by another torchgeo-dofa job (pid {child.pid}); "
            "wait for it or use another -o"
        )
        child.kill()  # SIGKILL: no cleanup code runs in the child
        child.wait(timeout=30)
        with OutputLock(out):  # the kernel released the lock
            assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


_HOLD_AND_FORK = """
import os, sys, time
from torchgeo_dofa.locks import OutputLock  # light: no torch
OutputLock(sys.argv[1]).acquire()
if os.fork() == 0:  # a child that outlives its parent, as a DataLoader worker does
    # said by the child: its fork handlers have run (the parent's word raced them under load)
    print("locked", flush=True)
    time.sleep(30)
    os._exit(0)
time.sleep(60)
"""


def test_kill_9_leaves_no_lock_in_forked_children(tmp_path: Path) -> None:
    """A job's forked children (DataLoader workers) share its open lock file; they close it,
    or a rerun right after a ``kill -9`` of the job was refused as locked while they ran."""
    out = tmp_path / "out"
    # a session of its own: the forked grandchild is killed with it below
    child = _lock_holder(_HOLD_AND_FORK, out, start_new_session=True)
    try:
        child.kill()
        child.wait(timeout=30)
        with OutputLock(out):  # the grandchild still runs, without the lock
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


def test_a_look_at_the_lock_never_turns_a_starting_job_away(tmp_path: Path) -> None:
    """check_free holds a shared flock for an instant: a job acquiring in that instant was
    refused as "in use" (a reviewer: 98 of 2000 acquisitions beside a polling look)."""
    out = tmp_path / "out"
    with OutputLock(out):  # make the folder and its lock file, then let go
        pass
    looking = """
import sys
from torchgeo_dofa.locks import JobLockedError, OutputLock
print("looking", flush=True)
while True:
    try:
        OutputLock(sys.argv[1]).check_free()
    except JobLockedError:  # while this test's process holds it
        pass
"""
    looker = _lock_holder(looking, out, expect="looking")  # another process, looking all along
    try:
        for _ in range(500):
            lock = OutputLock(out)
            lock.acquire()  # JobLockedError here before
            lock.release()
    finally:
        looker.kill()
        looker.wait()


def test_jobs_still_exports_what_moved_to_locks() -> None:
    import torchgeo_dofa.jobs as jobs
    import torchgeo_dofa.locks as locks

    for name in locks.__all__:
        assert getattr(jobs, name) is getattr(locks, name), name


def test_lock_in_one_process_is_exclusive_and_reacquirable(tmp_path: Path) -> None:
    with OutputLock(tmp_path):
        with pytest.raises(JobLockedError, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path).acquire()
    with OutputLock(tmp_path):
        pass


class _Stopped(KeyboardInterrupt):
    """What the command's SIGTERM handler raises (``Terminated``), wherever the thread is."""


def _raise_stopped(signum: int, frame: object) -> None:
    """A signal handler raising as the command's SIGTERM handler does."""
    raise _Stopped


def _signal_at(step: int, call: Any, signum: int = signal.SIGTERM) -> bool:
    """Run ``call()``, sending ``signum`` at the ``step``-th line Python runs in it (its
    libraries' lines too); whether it was sent. The signal's handler runs at once there."""
    seen = [0]

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            seen[0] += 1
            if seen[0] == step:
                os.kill(os.getpid(), signum)
        return trace

    tracing = sys.gettrace()
    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(tracing)
    return seen[0] >= step


def test_signals_held_back_are_each_raised_in_order_and_every_handler_is_put_back() -> None:
    """helper-133: of a Ctrl-C and a SIGTERM held back, only the first was raised again (its
    handler raised, and the SIGTERM was never raised); two Ctrl-Cs were raised as one; and a
    Ctrl-C between putting back the two handlers left SIGTERM's the recorder for good (every
    later SIGTERM swallowed)."""
    import itertools

    from torchgeo_dofa.locks import signals_deferred

    called: list[int] = []

    def count(signum: int, frame: object) -> None:
        called.append(signum)

    def interrupt(signum: int, frame: object) -> None:
        called.append(signum)
        raise KeyboardInterrupt

    def stop(signum: int, frame: object) -> None:
        called.append(signum)
        raise _Stopped

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in before:
            signal.signal(sig, count)
        with signals_deferred():
            for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), sig)
            assert called == []  # held
        assert called == [signal.SIGINT, signal.SIGINT, signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is count is signal.getsignal(signal.SIGTERM)
        called.clear()
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, stop)
        with pytest.raises(_Stopped):  # the last one's
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
        assert called == [signal.SIGINT, signal.SIGTERM]  # both handlers ran, in order
        # a Ctrl-C at each step of the block and of its end: no signal is lost for good
        for step in itertools.count(1):
            called.clear()

            def held() -> None:
                with signals_deferred():
                    pass

            with contextlib.suppress(KeyboardInterrupt):
                if not _signal_at(step, held, signal.SIGINT):
                    break
            assert called == [signal.SIGINT]
            for sig in (signal.SIGTERM, signal.SIGINT):  # each reaches its own handler
                with contextlib.suppress(KeyboardInterrupt):
                    os.kill(os.getpid(), sig)
            assert called == [signal.SIGINT, signal.SIGTERM, signal.SIGINT], step
            assert signal.getsignal(signal.SIGINT) is interrupt
            assert signal.getsignal(signal.SIGTERM) is stop
        assert step > 10
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _handlers_put_back(handlers: dict[int, Any]) -> None:
    """Check that each signal reaches its handler in ``handlers``, which is then in place.

    A signal raised while :func:`~torchgeo_dofa.locks.signals_deferred` puts the handlers
    back can leave another's its recorder, which hands the next such signal to the handler
    it held back and puts that one back (nothing is lost); a signal sent here does so.
    """
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler:
            with contextlib.suppress(KeyboardInterrupt):  # (the handlers here raise)
                os.kill(os.getpid(), sig)
        assert signal.getsignal(sig) is handler


def _open_under(root: Path) -> list[str]:
    """The files under ``root`` this process holds open."""
    opened = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own descriptor, closed by now)
            opened.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [name for name in opened if name.startswith(f"{root}{os.sep}")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_a_signal_at_any_step_of_taking_or_giving_back_the_lock_leaves_it_whole_or_gone(
    tmp_path: Path,
) -> None:
    """CI (stop 64): an ``embed`` sent SIGTERM the instant it took its folder's lock stopped
    with its one line, exit 143, yet left the folder and its lock file (the handler raised
    between opening the lock file and recording it: ``release`` had nothing to remove).
    Here a real SIGTERM, whose handler raises as the command's does, is sent at each step
    (each line Python runs, its own libraries' included) of taking the lock, then of giving
    it back: the signal still stops it, and it leaves the lock whole or nothing at all (no
    folder, no lock file, no open file, a new lock taken at once)."""
    import itertools

    def gone(root: Path) -> None:
        assert not root.exists()
        assert not OutputLock._held and not OutputLock._holders
        with OutputLock(root / "out"):  # no open file holds it
            pass
        (root / "out" / LOCK_NAME).unlink()
        (root / "out").rmdir()
        root.rmdir()

    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    handlers: dict[int, Any] = {
        signal.SIGINT: signal.getsignal(signal.SIGINT),
        signal.SIGTERM: _raise_stopped,
    }
    try:
        for step in itertools.count(1):  # taking it
            lock = OutputLock(tmp_path / f"take{step}" / "out")
            try:
                sent = _signal_at(step, lock.acquire)
            except _Stopped:
                _handlers_put_back(handlers)
                assert not lock.held
                gone(tmp_path / f"take{step}")
                continue
            assert lock.held and not sent  # every step of it taken: whole
            lock.release(remove=True)
            break
        assert step > 20  # (a step is a line: folders made, file opened, locked, recorded)
        for step in itertools.count(1):  # giving it back, with the folders it made
            lock = OutputLock(tmp_path / f"give{step}" / "out")
            lock.acquire()
            with contextlib.suppress(_Stopped):
                if not _signal_at(step, lambda: lock.release(remove=True)):  # noqa: B023
                    break
                raise AssertionError("the signal sent while releasing did not stop it")
            _handlers_put_back(handlers)
            if lock.held:  # stopped before it began: whole, for the caller's next try
                assert lock.path.is_file() and OutputLock._holders == {lock}
                lock.release(remove=True)
            gone(tmp_path / f"give{step}")
        assert step > 10
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _open_under(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("door", ["embed", "embed, a second signal", "writer"])
def test_a_stop_the_instant_the_lock_is_taken_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, door: str
) -> None:
    """The other half of the CI failure above: a signal's handler raising in the caller, as
    ``acquire`` returns (an ``embed`` took its lock outside the block whose end gives it
    back; a writer recorded its lock only after taking it). The real lock is taken, then the
    caller's next step raises: nothing is left. helper-133: a second signal (a SIGTERM
    after a Ctrl-C) while the embed unwound, before it gave its lock back, left the folder
    and the lock file; it is held back until the folder is as it should be."""
    import torchgeo_dofa.writers

    taken = OutputLock.acquire
    stopped: list[bool] = []

    def taken_then_stopped(self: OutputLock) -> None:
        taken(self)
        stopped.append(True)
        raise _Stopped  # where the handler of a signal received meanwhile raises

    monkeypatch.setattr(OutputLock, "acquire", taken_then_stopped)
    if door == "embed, a second signal":  # sent as the unwinding embed names a parts folder
        parts_dir = torchgeo_dofa.writers.parts_dir

        def parts_dir_then_signalled(path: Path) -> Path:
            if stopped and stopped.pop():
                os.kill(os.getpid(), signal.SIGTERM)
            return parts_dir(path)

        monkeypatch.setattr(torchgeo_dofa.writers, "parts_dir", parts_dir_then_signalled)
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
    out = tmp_path / "new" / "out"
    if door.startswith("embed"):
        from torchgeo_dofa.cli import embed

        scene = ROOT / "demo" / "data" / "ftw_s2_l2a_33N.tif"
        try:
            with pytest.raises(_Stopped):
                embed([scene], out, weights=None, progress=False)
        finally:
            if door == "embed, a second signal":
                signal.signal(signal.SIGTERM, previous)
        assert stopped == ([] if door == "embed, a second signal" else [True])  # (all sent)
    else:  # Lightning ends a KeyboardInterrupt with sys.exit(1), after the callbacks' hooks
        with StopOnSignal() as stop, pytest.raises(SystemExit):
            _predict(_Tiny(None, 0), PooledWriter(out / "p.parquet", CRS.from_epsg(32631)), stop)
    assert list(tmp_path.iterdir()) == []
    assert not OutputLock._held and not OutputLock._holders


def test_a_lock_whose_with_block_raised_leaves_nothing_it_made(tmp_path: Path) -> None:
    """helper-133: ``with OutputLock(folder):`` kept the folders it made and its lock file
    when the block raised before writing anything (the command line leaves none)."""
    with pytest.raises(_Stopped):
        with OutputLock(tmp_path / "a" / "b"):
            raise _Stopped
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):  # a block that wrote: all kept
        with OutputLock(tmp_path / "c"):
            (tmp_path / "c" / "x").write_text("x")
            raise RuntimeError
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [LOCK_NAME, "x"]
    with OutputLock(tmp_path / "d"):  # a block that ended: its lock file stays, as a job's
        pass
    assert [p.name for p in (tmp_path / "d").iterdir()] == [LOCK_NAME]


def test_lock_removes_only_the_empty_folders_it_created(tmp_path: Path) -> None:
    # a refused job leaves no trace: the folders taking the lock created go when left empty,
    # deepest first; a folder that existed, or that another job wrote into, stays
    (tmp_path / "a").mkdir()
    lock = OutputLock(tmp_path / "a" / "b" / "c")
    lock.acquire()
    assert lock.created == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b"]
    (tmp_path / "a" / "b" / "other.txt").write_text("another job's file")
    lock.release(remove=True)
    assert not (tmp_path / "a" / "b" / "c").exists() and (tmp_path / "a" / "b").is_dir()
    first = OutputLock(tmp_path / "x" / "y")
    first.acquire()
    first.release()  # a job that wrote keeps its folders and lock file
    assert (tmp_path / "x" / "y" / LOCK_NAME).is_file()
    second = OutputLock(tmp_path / "x" / "y")
    second.acquire()
    assert second.created == []
    second.release(remove=True)  # refused: its lock file goes, the folders it found stay
    assert (tmp_path / "x" / "y").is_dir() and not (tmp_path / "x" / "y" / LOCK_NAME).exists()
    # two locks in new folders under one new parent, released in either order: all go
    for order in (1, -1):
        locks = [OutputLock(tmp_path / "new" / "grid"), OutputLock(tmp_path / "new" / "table")]
        for lock in locks:
            lock.acquire()
        for lock in locks[::order]:
            lock.release(remove=True)
        assert not (tmp_path / "new").exists()
    # a folder made again by someone else since (same path, another folder) stays
    lock = OutputLock(tmp_path / "u" / "v")
    lock.acquire()
    (tmp_path / "u").rename(tmp_path / "moved")
    (tmp_path / "u" / "v").mkdir(parents=True)
    lock.release(remove=True)
    assert (tmp_path / "u" / "v").is_dir()  # (the moved one keeps its lock file: not ours)
    # a relative folder is the one meant when the lock was taken, whatever the cwd since
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2" / "R").mkdir(parents=True)
    with contextlib.chdir(tmp_path / "w1"):
        lock = OutputLock(Path("R") / "a")
        lock.acquire()
    with contextlib.chdir(tmp_path / "w2"):
        lock.release(remove=True)
    assert not (tmp_path / "w1" / "R").exists() and (tmp_path / "w2" / "R").is_dir()
    # a folder that can be made only partly (a name longer than NAME_MAX): nothing is left
    with pytest.raises(OutputPathError, match="File name too long; use another -o"):
        OutputLock(tmp_path / "p1" / "p2" / ("n" * 300) / "out").acquire()
    assert not (tmp_path / "p1").exists()


_SRUN_3 = {"SLURM_NTASKS": "3", "SLURM_JOB_NAME": "embed", "SLURM_PROCID": "0"}


@pytest.mark.parametrize(
    ("env", "launcher"),
    [
        ({}, True),  # a job of one process
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # Lightning's launcher, rank 0
        ({"LOCAL_RANK": "1"}, False),  # a process Lightning's DDP launcher started
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),  # the first process of node 1
        # torchrun, node 1 of 2 with 4 processes each: its first process
        ({"RANK": "4", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "none"}, False),
        ({"RANK": "4"}, True),  # a RANK of some other tool's: not torchrun's
        (_SRUN_3, True),
        (_SRUN_3 | {"SLURM_PROCID": "2"}, False),  # srun starts every rank itself
        # an interactive allocation (srun --pty bash): Lightning does not read SLURM's ranks
        (_SRUN_3 | {"SLURM_PROCID": "2", "SLURM_JOB_NAME": "bash"}, True),
    ],
)
def test_only_global_rank_0_launches_the_job(monkeypatch, env, launcher) -> None:
    for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "TORCHELASTIC_RUN_ID", *_SRUN_3):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_launcher() is launcher


def test_rank_check_adds_no_warning_where_srun_is_installed(tmp_path, monkeypatch) -> None:
    # Lightning's SLURM detection warns "srun is available but not used" on a login node:
    # Lightning's Trainer says it once; the rank check, made several times a job, must not
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert is_launcher()
    assert not caught, [str(w.message) for w in caught]


def test_lock_tells_whether_its_job_added_anything_to_the_folder(tmp_path) -> None:
    # what decides whether a refused job's writers remove the lock file from a folder
    # that holds other files (an input's folder, an earlier job's outputs)
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "scene.tif").write_bytes(b"x")
    (folder / LOCK_NAME).write_bytes(b"")  # an earlier job's lock file
    lock = OutputLock(folder)
    lock.acquire()
    (folder / "scene.tif").write_bytes(b"changed")  # changed, not added
    assert lock.unchanged()
    (folder / "g.tif.parts").mkdir()
    assert not lock.unchanged()
    (folder / "g.tif.parts").rmdir()
    assert lock.unchanged()
    lock.release(remove=lock.unchanged())
    assert sorted(p.name for p in folder.iterdir()) == ["scene.tif"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_a_ddp_worker_dies_with_its_launcher_only_during_the_job() -> None:
    # the request is made at the writers' setup and withdrawn at their teardown; a worker
    # whose recorded launcher is gone when it asks exits at once
    gone = subprocess.Popen(["true"])
    gone.wait()
    script = f"""
import ctypes, os
from torchgeo_dofa.locks import LAUNCHER_PID_VARIABLE, die_with_launcher
libc = ctypes.CDLL(None, use_errno=True)
def asked():
    sig = ctypes.c_int(-1)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    return sig.value
die_with_launcher()
print(asked(), end=" ")
die_with_launcher(enable=False)
print(asked(), flush=True)
os.environ[LAUNCHER_PID_VARIABLE] = "{gone.pid}"
die_with_launcher()
print("not reached")
"""
    env = _child_env() | {"LOCAL_RANK": "1", "TORCHGEO_DOFA_LAUNCHER_PID": str(os.getpid())}
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert (child.returncode, child.stdout) == (1, f"{int(signal.SIGKILL)} 0\n"), child.stderr


def test_lock_file_removed_by_its_holder_lets_in_one_job_at_a_time(tmp_path: Path) -> None:
    # processes that take the lock, check nobody else is inside, and leave removing the lock
    # file (as a refused job does): locking a file that was just removed must not count
    out = tmp_path / "out"
    script = """
import os, sys, time
from pathlib import Path
from torchgeo_dofa.locks import JobLockedError, OutputLock
out, inside = Path(sys.argv[1]), Path(sys.argv[1]) / "inside"
end, entered = time.monotonic() + 1.5, 0
while time.monotonic() < end:
    lock = OutputLock(out)
    try:
        lock.acquire()
    except JobLockedError:
        continue
    try:
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another is in
        os.close(fd)
        entered += 1
        os.unlink(inside)
    finally:
        lock.release(remove=True)
print(entered)
"""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(),
        )
        for _ in range(3)
    ]
    results = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in results]
    assert sum(int(stdout) for stdout, _ in results) > 0
    assert not (out / LOCK_NAME).exists() and not (out / "inside").exists()


def test_lock_and_manifest_skip_ddp_workers(
    tmp_path: Path, scene: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OutputLock(tmp_path / "out"):
        monkeypatch.setenv("LOCAL_RANK", "1")  # as in a worker Lightning's DDP launcher starts
        with OutputLock(tmp_path / "out"):  # no error: the launcher holds it
            _manifest([scene]).check_or_write(tmp_path / "out")  # a no-op
        assert not (tmp_path / "out" / MANIFEST_NAME).exists()


# --- region names --------------------------------------------------------------------------------


def test_unique_region_names_are_stable_and_distinct(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a" / "scene.tif", tmp_path / "b" / "scene.tif", tmp_path / "c" / "x.tif"
    assert unique_region_names([a, b, c]) == ["a_scene", "b_scene", "x"]
    assert unique_region_names([c, b, a]) == ["x", "b_scene", "a_scene"]  # order-independent
    assert unique_region_names([a]) == ["scene"]
    # same folder name one level up: go one more level
    d, e = tmp_path / "p" / "x" / "scene.tif", tmp_path / "q" / "x" / "scene.tif"
    assert unique_region_names([d, e]) == ["p_x_scene", "q_x_scene"]
    # case-insensitive filesystems: Scene.tif and scene.tif in two folders also collide
    assert unique_region_names([tmp_path / "a" / "Scene.tif", b]) == ["a_Scene", "b_scene"]
    # only the suffix differs: a short hash of the path
    f, g = tmp_path / "x" / "scene.tif", tmp_path / "x" / "scene.jp2"
    names = unique_region_names([f, g])
    assert len(set(names)) == 2 and all(n.startswith("scene_") and len(n) == 14 for n in names)
    assert unique_region_names([f, g, tmp_path / "y" / "scene.tif"])[2] == "scene"
    assert unique_region_names([g, f]) == names[::-1]
    # folders and Earth Engine prefixes keep their full name
    assert unique_region_names([tmp_path / "exports.v2", tmp_path / "s2-export"]) == [
        "exports.v2",
        "s2-export",
    ]
    with pytest.raises(ValueError, match="given twice"):
        unique_region_names([a, tmp_path / "a" / ".." / "a" / "scene.tif"])


# --- signals -------------------------------------------------------------------------------------


class _Tiny(pl.LightningModule):
    """A real LightningModule: 'pooled' = mean of the chip, sends a signal at one batch."""

    def __init__(self, signal_at: int | None, signum: int) -> None:
        super().__init__()
        self.signal_at, self.signum = signal_at, signum
        self.computed: list[int] = []

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        self.computed.append(batch_idx)
        if batch_idx == self.signal_at:
            os.kill(os.getpid(), self.signum)  # a real signal, delivered to this process
        return {"pooled": batch["image"].mean(dim=(2, 3)), "bounds": batch["bounds"]}


def _loader(n: int = 12) -> DataLoader:
    items = [
        {
            "image": torch.full((2, 4, 4), float(i)),
            "bounds": torch.tensor(
                [1000.0 * i, 1000.0 * i + 1000, 10, 0, 1000, 10, 0, 1, 1], dtype=torch.float64
            ),
        }
        for i in range(n)
    ]
    return DataLoader(items, batch_size=2)  # type: ignore[arg-type]


def _predict(module: _Tiny, writer: PooledWriter, stop: StopOnSignal) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[writer, stop],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(module, dataloaders=_loader(), return_predictions=False)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_after_the_batch_and_rerun_resumes(
    tmp_path: Path, signum: int, status: int
) -> None:
    before = signal.getsignal(signum)
    out = tmp_path / "p.parquet"
    module = _Tiny(signal_at=2, signum=signum)
    with StopOnSignal() as stop, pytest.raises(JobInterrupted) as info:
        _predict(module, PooledWriter(out, CRS.from_epsg(32631)), stop)
    assert info.value.exit_status == status and "rerun the same command" in str(info.value)
    assert signal.getsignal(signum) == before  # handlers restored
    assert module.computed == [0, 1, 2]  # stopped within the batch that got the signal
    assert not out.exists()
    writer = PooledWriter(out, CRS.from_epsg(32631))
    assert len(writer.done_keys()) == 6  # batches 0..2 written before stopping
    # rerun: the remaining chips, then the same table as an uninterrupted run
    rerun = _Tiny(signal_at=None, signum=signum)
    with StopOnSignal() as stop:
        _predict(rerun, writer, stop)
    full_out = tmp_path / "full.parquet"
    with StopOnSignal() as stop:
        _predict(_Tiny(None, signum), PooledWriter(full_out, CRS.from_epsg(32631)), stop)
    a, b = gpd.read_parquet(out), gpd.read_parquet(full_out)
    pd.testing.assert_frame_equal(a.drop(columns="embedding"), b.drop(columns="embedding"))
    np.testing.assert_array_equal(np.stack(a.embedding), np.stack(b.embedding))


def test_signal_callback_alone_installs_and_restores(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    with pytest.raises(JobInterrupted):
        _predict(_Tiny(1, signal.SIGTERM), PooledWriter(tmp_path / "p.parquet", UTM31), stop)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize(
    ("signum", "said"),
    [
        (signal.SIGINT, "Ctrl-C: stopping once the batch or output in progress is written; "
         "Ctrl-C again stops at once"),
        (signal.SIGTERM, "SIGTERM: stopping once the batch or output in progress is written; "
         "a second SIGTERM stops at once"),
    ],
)  # fmt: skip
def test_the_first_signal_is_acknowledged_in_one_line(capfd, signum: int, said: str) -> None:
    """A Ctrl-C while a job's last output was assembled (seconds for a large grid) went
    unanswered until the job ended: it looked ignored."""
    with StopOnSignal("prog") as stop:
        worker = os.fork()  # a forked DataLoader worker inherits the handler
        if worker == 0:
            os.kill(os.getpid(), signum)  # a terminal's Ctrl-C reaches the workers too
            os._exit(0)
        assert os.waitpid(worker, 0)[1] == 0
        os.kill(os.getpid(), signum)
        assert stop.received == signum
    assert capfd.readouterr().err == f"prog: {said}\n"  # once: the job's, not the worker's
    with StopOnSignal() as stop:  # the library's default: silent
        os.kill(os.getpid(), signum)
        assert stop.received == signum
    assert capfd.readouterr().err == ""


class _SignalAtAssembly(pl.Callback):
    """Sends a signal once every batch is written, as the writers begin to assemble."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("final", [True, False])
def test_a_signal_while_the_last_output_assembles_says_the_job_finishes_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], final: bool
) -> None:
    """helper-121: a signal while the job's last output was assembled (every chip computed)
    was answered "stopping once the batch or output in progress is written", and the job
    then wrote every output and exited 0. It says so now; an earlier region's assembly (not
    ``final``: the job stops before the next region) keeps the stopping line."""
    out = tmp_path / "p.parquet"
    with StopOnSignal("prog") as stop:
        stop.final = final
        trainer = pl.Trainer(
            accelerator="cpu",
            callbacks=[_SignalAtAssembly(signal.SIGTERM), PooledWriter(out, UTM31), stop],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.predict(
            _Tiny(None, signal.SIGTERM), dataloaders=_loader(), return_predictions=False
        )
        assert stop.received == signal.SIGTERM
    assert len(gpd.read_parquet(out)) == 12  # the output is whole
    said = (
        "every chip is computed, so the job finishes writing its outputs"
        if final
        else "stopping once the batch or output in progress is written"
    )
    # Lightning's own lines around it depend on its logging set-up (other tests change it)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("prog:")]
    assert lines == [f"prog: SIGTERM: {said}; a second SIGTERM stops at once"]


def test_signal_callback_must_follow_the_writers(tmp_path: Path) -> None:
    stop = StopOnSignal()
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[stop, PooledWriter(tmp_path / "p.parquet", CRS.from_epsg(32631))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(RuntimeError, match="must come after the prediction writers"):
        trainer.predict(_Tiny(None, 0), dataloaders=_loader(), return_predictions=False)


# --- whole-job checks ----------------------------------------------------------------------------

UTM31 = CRS.from_epsg(32631)


def test_check_points_lists_every_outside_point_or_skips_them() -> None:
    # two rasters in UTM 31N around (3 E, 45 N) and 1 km further east
    from pyproj import Transformer

    to_utm = Transformer.from_crs(4326, 32631, always_xy=True)
    x0, y0 = to_utm.transform(3.0, 45.0)
    footprints = {
        "west": (UTM31, (x0 - 500, y0 - 500, x0 + 500, y0 + 500)),
        "east": (UTM31, Point(x0 + 1000, y0).buffer(600)),
    }
    to_ll = Transformer.from_crs(32631, 4326, always_xy=True)
    pts = [
        PointBuffer(3.0, 45.0, 100),  # west
        PointBuffer(*to_ll.transform(x0 + 1000, y0), 100),  # east
        PointBuffer(*to_ll.transform(x0 + 450, y0), 100),  # both (overlap)
        PointBuffer(10.0, 50.0, 100),  # outside
        PointBuffer(*to_ll.transform(x0, y0 + 5000), 100),  # outside
    ]
    with pytest.raises(PointsOutsideError) as info:
        check_points(pts, footprints)
    message = str(info.value)
    assert message.startswith("2 of 5 points lie outside every input raster: #3 (10, 50), #4 (")
    assert "--skip-outside" in message and "\n" not in message
    inside, outside = check_points(pts, footprints, skip_outside=True)
    assert inside == {"west": [0, 2], "east": [1, 2]} and outside == [3, 4]
    assert points_outside_warning(pts, outside).startswith("skipping 2 of 5 points")


def test_job_size_warning_and_estimate() -> None:
    assert job_size_warning(5000, 4.2) is None
    text = job_size_warning(199_809, 4.2)
    minutes = round(199_809 / 4.2 / 60)  # independent: 793 min
    assert text is not None and text.startswith(
        f"199809 chips to compute, about {minutes // 60} h {minutes % 60} min at 4.2 chips/s"
    )
    assert "--bbox" in text and "resumes" in text
    assert estimate_seconds(100, 4.0) == 25.0
    with pytest.raises(ValueError, match="positive"):
        estimate_seconds(1, 0.0)


# --- points with properties ----------------------------------------------------------------------


def test_read_points_csv_keeps_every_column_and_order(tmp_path: Path) -> None:
    path = tmp_path / "sites.csv"
    path.write_text(
        "\ufeffSite_ID,Lat,LON,crop,yield,point_index\n"
        "007,50.85,4.35,wheat,7.5,a\n"
        "012,50.80,4.30,,6,b\n"
        "3,-33.9,18.4,maize,,c\n"
    )
    points, props = read_points(path, 1120)
    assert [(p.lon, p.lat, p.buffer_m) for p in points] == [
        (4.35, 50.85, 1120),
        (4.30, 50.80, 1120),
        (18.4, -33.9, 1120),
    ]
    assert list(props.columns) == [
        "point_index",
        "lon",
        "lat",
        "Site_ID",
        "crop",
        "yield",
        "input_point_index",
    ]
    assert props.point_index.tolist() == [0, 1, 2]
    assert props.Site_ID.tolist() == ["007", "012", "3"]  # ids with leading zeros stay text
    assert props.crop[[0, 2]].tolist() == ["wheat", "maize"] and pd.isna(props.crop[1])
    np.testing.assert_array_equal(props["yield"].to_numpy(), [7.5, 6.0, np.nan])
    assert props.input_point_index.tolist() == ["a", "b", "c"]


def test_read_points_other_csv_layouts(tmp_path: Path) -> None:
    semi = tmp_path / "semi.csv"
    semi.write_text("name;X;Y\na;4.35;50.85\n")
    points, props = read_points(semi, 100)
    assert (points[0].lon, points[0].lat) == (4.35, 50.85) and props.name.tolist() == ["a"]
    longname = tmp_path / "long.csv"
    longname.write_text("Longitude,Latitude\n4.35,50.85\n")
    assert read_points(longname, 100)[0][0].lon == 4.35


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b\n1,2\n", r"has no coordinate columns \(found \['a', 'b'\]\): name them lon, lat"),
        ("lon,lat\n4.3,50\nfour,50\n", r"line 3: lon='four', lat='50' is not a pair of numbers"),
        ("lon,lat\n4.3,50\n4.3,95\n", r"line 3: lat must be in \[-90, 90\] degrees, got 95"),
        ("lon,lat\n", "holds no points"),
        ("", "cannot read points file .* as CSV"),
        ('lon,lat\n1,2\n"3,4\n', "cannot read points file .* as CSV"),
        ("lon,Lon,lat\n1,2,3\n", "has several 'lon' columns"),
    ],
)
def test_read_points_malformed_csv(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        read_points(path, 100)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_points_geojson_and_gpkg_keep_properties(tmp_path: Path) -> None:
    frame = gpd.GeoDataFrame(
        {"site": ["b", "a"], "area_ha": [1.5, 2.0]},
        geometry=[Point(4.35, 50.85), Point(4.30, 50.80)],
        crs=4326,
    )
    gj = tmp_path / "pts.geojson"
    frame.to_file(gj, driver="GeoJSON")
    gpkg = tmp_path / "pts.gpkg"
    frame.to_crs(32631).to_file(gpkg, driver="GPKG")  # projected: read back in degrees
    for path in (gj, gpkg):
        points, props = read_points(path, 500)
        assert props.site.tolist() == ["b", "a"] and props.area_ha.tolist() == [1.5, 2.0]
        assert props.point_index.tolist() == [0, 1]
        np.testing.assert_allclose([(p.lon, p.lat) for p in points], [(4.35, 50.85), (4.3, 50.8)])


def test_read_points_malformed_vector_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(ValueError, match="cannot read points file .*broken.geojson as a vector"):
        read_points(broken, 100)
    poly = tmp_path / "poly.geojson"
    gpd.GeoDataFrame(geometry=[Point(4, 50).buffer(0.1)], crs=4326).to_file(poly)
    with pytest.raises(ValueError, match="feature 0: is a Polygon; only Point geometries"):
        read_points(poly, 100)
    with pytest.raises(ValueError, match="does not exist"):
        read_points(tmp_path / "missing.csv", 100)
    with pytest.raises(ValueError, match="buffer_m must be a positive"):
        read_points(poly, 0)


def test_points_properties_round_trip_through_the_pooled_table(tmp_path: Path) -> None:
    """read_points -> PooledWriter(chip_keys, properties) -> GeoParquet: every property back."""
    path = tmp_path / "sites.csv"
    path.write_text("id,lat,lon,label\n007,0.01,0.02,x\n008,0.0,0.0,y\n009,0.01,0.02,z\n")
    points, props = read_points(path, 100)
    chips = [(slice(p.lon, p.lon + 1), slice(p.lat, p.lat + 1)) for p in points]
    keys = [PooledWriter.key_for_chip(c) for c in chips]
    out = tmp_path / "pts.parquet"
    writer = PooledWriter(out, CRS.from_epsg(4326), chip_keys=keys, properties=props)
    writer.parts.mkdir(parents=True)
    bounds = torch.tensor(
        [[c[0].start, c[0].stop, 1, c[1].start, c[1].stop, 1, 0, 1, 1] for c in chips],
        dtype=torch.float64,
    )
    batch = {"pooled": torch.eye(3), "bounds": bounds}
    writer.write_on_batch_end(None, None, batch, None, None, 0, 0)  # type: ignore[arg-type]
    writer.finalize()
    table = gpd.read_parquet(out)
    pd.testing.assert_frame_equal(
        table[list(props.columns)].reset_index(drop=True), props, check_dtype=False
    )
    assert table.id.tolist() == ["007", "008", "009"]


# --- kill -9 during the final assembly -----------------------------------------------------------

_ASSEMBLE = """
import sys
from rasterio.crs import CRS
from torchgeo_dofa.writers import GridGeometry, GridWriter
geom = GridGeometry.for_region(CRS.from_epsg(32631), (0, 0, 16000, 16000), 10.0)
print("ready", flush=True)
sys.stdin.readline()
GridWriter(sys.argv[1], geom, metadata={"variant": "base"}).finalize()
"""


def test_kill_9_during_assembly_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    """A real SIGKILL while the GeoTIFF is being assembled; the rerun cleans up and finishes."""
    from rasterio.transform import Affine

    from torchgeo_dofa.writers import GridGeometry, GridWriter, stale_temps

    geom = GridGeometry.for_region(UTM31, (0, 0, 16000, 16000), 10.0)  # 100 x 100 cells
    gen = torch.Generator().manual_seed(1)
    grids, transforms = [], []
    for r in range(0, 98, 14):
        for c in range(0, 98, 14):
            grids.append(torch.rand(64, 14, 14, generator=gen))
            x, y = geom.xmin + c * geom.cell, geom.ymin + (geom.height - r) * geom.cell
            transforms.append(
                torch.tensor(list(Affine(160, 0, x, 0, -160, y)), dtype=torch.float64)
            )
    prediction = {"grid": torch.stack(grids), "grid_transform": torch.stack(transforms)}

    def run(folder: Path) -> GridWriter:
        writer = GridWriter(folder / "g_grid.tif", geom, metadata={"variant": "base"})
        writer.parts.mkdir(parents=True)
        writer.write_on_batch_end(None, None, prediction, None, None, 0, 0)  # type: ignore[arg-type]
        writer.flush()  # parts are written off the calling thread
        return writer

    reference = run(tmp_path / "ref")
    reference.finalize()
    out = tmp_path / "out"
    writer = run(out)
    parts = sorted(p.name for p in writer.parts.iterdir())
    child = subprocess.Popen(
        [sys.executable, "-c", _ASSEMBLE, str(writer.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        deadline = time.monotonic() + 60
        while not stale_temps(writer.path) and time.monotonic() < deadline:
            time.sleep(0.0005)
        child.kill()
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not writer.path.exists(), "the assembly finished before it could be killed"
    assert stale_temps(writer.path) and sorted(p.name for p in writer.parts.iterdir()) == parts
    job = _manifest([tmp_path / "ref" / "g_grid.tif"], outputs=["g_grid.tif"])
    with OutputLock(out):
        # a manifest as the first run would have written it, then the rerun's check
        (out / MANIFEST_NAME).write_text(json.dumps(job.to_json()))
        job.check_or_write(out)
        assert stale_temps(writer.path) == []  # the killed assembly's temporary is gone
        GridWriter(writer.path, geom, metadata={"variant": "base"}).finalize()
    assert writer.path.read_bytes() == reference.path.read_bytes()
    assert not writer.parts.exists()


# --- identities ----------------------------------------------------------------------------------


def test_weights_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from torchgeo_dofa.jobs import weights_identity

    ckpt = tmp_path / "DOFA_ViT_base_e100.pth"
    ckpt.write_bytes(b"weights v1")
    assert weights_identity(ckpt, "base") == "sha256:" + hashlib.sha256(b"weights v1").hexdigest()
    ckpt.write_bytes(b"weights v2")  # replaced under the same name: another identity
    assert weights_identity(str(ckpt), "b") == "sha256:" + hashlib.sha256(b"weights v2").hexdigest()
    monkeypatch.setenv("TORCHGEO_DOFA_WEIGHTS_DIR", str(tmp_path))  # "official" found locally
    assert weights_identity("official", "base") == weights_identity(ckpt, "base")
    assert weights_identity(None, "base", seed=3) == "random:seed=3"
    assert weights_identity(None, "base") != weights_identity(None, "base")  # cannot resume


def test_region_identity(tmp_path: Path) -> None:
    import hashlib

    from torchgeo_dofa.jobs import region_identity

    pts = tmp_path / "p.csv"
    pts.write_text("lon,lat\n1,2\n")
    assert region_identity() == {}
    assert region_identity(bbox=(1, 2, 3, 4)) == {"bbox": [1.0, 2.0, 3.0, 4.0]}
    assert region_identity(points=pts, buffer_m=1120) == {
        "points_sha256": hashlib.sha256(b"lon,lat\n1,2\n").hexdigest(),
        "buffer_m": 1120.0,
        "skip_outside": False,
    }
