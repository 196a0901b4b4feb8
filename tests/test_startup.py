"""Start-up: the package imports without its heavy dependencies; every public name resolves."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import torchgeo_dofa
from torchgeo_dofa.__main__ import _is_glibc
from torchgeo_dofa.jobs import MANIFEST_NAME
from torchgeo_dofa.locks import LOCK_NAME


def test_import_loads_no_heavy_module(tmp_path) -> None:
    """Neither importing the package nor taking an output folder's lock loads the libraries
    (a lock-taking child process of the tests, a script checking a folder, start at once)."""
    code = (
        "import sys, torchgeo_dofa; from torchgeo_dofa.locks import OutputLock; "
        f"OutputLock({str(tmp_path / 'out')!r}).acquire(); "
        "print(sorted(m for m in ('torch', 'torchgeo', 'lightning', 'rasterio', 'geopandas') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


#: an embed command whose input exists (this file: only existence is checked before torch)
EMBED = ["embed", __file__, "-o", "out"]


@pytest.mark.parametrize(
    ("argv", "code", "stream", "text"),
    [
        (["--help"], 0, "stdout", "embed"),
        (["embed", "--help"], 0, "stdout", "--output-dir"),
        (["preview", "--help"], 0, "stdout", "embedding"),
        (["embed", "scene.tif"], 2, "stderr", "the following arguments are required: -o"),
        (["embed", "scene.tif", "-o", "out", "--batch-size", "x"], 2, "stderr", "not an integer"),
        (["preview", "missing.tif", "-o", "p.png"], 2, "stderr", "missing.tif"),
        (["embed", "s.tif", "-o", "o", "--variant", "huge"], 2, "stderr", "invalid choice"),
        (["embed", "s.tif", "-o", "o", "--precision", "16"], 2, "stderr", "invalid choice"),
        (["embed", "missing.tif", "-o", "o"], 2, "stderr", "input 'missing.tif' does not exist"),
        ([*EMBED, "--seed", "1"], 2, "stderr", "--seed applies to random weights only"),
        ([*EMBED, "--chip-size", "100"], 2, "stderr", "--chip-size must be a multiple of 16"),
        ([*EMBED, "--devices", "0"], 2, "stderr", "--devices must be >= 1"),
        ([*EMBED, "--offset=1e9"], 2, "stderr", "1e+09 cannot be an offset of reflectance"),
        ([*EMBED, "--stride", "0"], 2, "stderr", "--stride must be at least 1 pixel"),
        ([*EMBED, "--buffer-m", "9"], 2, "stderr", "--buffer-m applies to --points only"),
        ([*EMBED, "--skip-outside"], 2, "stderr", "--skip-outside applies to --points only"),
        ([*EMBED, "--weights", "no.pth"], 2, "stderr", "weights file 'no.pth' does not exist"),
        ([*EMBED, "--points", "p.csv", "--output", "grid"], 2, "stderr", "--output pooled"),
        ([*EMBED, "--points", "p.csv"], 2, "stderr", "points file 'p.csv' does not exist"),
        (["embed", "", "-o", "o"], 2, "stderr", "an input is an empty string"),
        (["embed", __file__, "-o", ""], 2, "stderr", "-o is an empty string"),
        ([*EMBED, "--weights", ""], 2, "stderr", "--weights is an empty string"),
        ([*EMBED, "--points", "", "--output", "pooled"], 2, "stderr", "--points is an empty"),
        ([*EMBED, "--devices", "abc"], 2, "stderr", "--devices 'abc': give a count (2), auto"),
        ([*EMBED, "--devices", " 0"], 2, "stderr", "--devices must be >= 1"),
        (["embed", "--stac", "x.json", "-o", "o"], 2, "stderr", "--stac needs --bbox"),
        ([*EMBED, "--mean", "80", "--std", "40"], 2, "stderr", "give --bands too"),
        ([*EMBED, "--bands", "red", "--mean", "80"], 2, "stderr", "give both --mean"),
        ([*EMBED, "--bands", "x", "--mean", ".3", "--std", ".1"], 2, "stderr", "by 255"),
        ([*EMBED, "--bands", "x", "--mean", "-8", "--std", "9"], 2, "stderr", "negative mean"),
        # it ran, and the batch was refused as "raw reflectance" after the model loaded
        ([*EMBED, "--bands", "x", "--mean", "9", "--std", "1e-30"], 2, "stderr", "up to 2.46e+32"),
        ([*EMBED, "--bands", "x", "y", "--mean", "8", "--std", "9"], 2, "stderr", "1 means"),
        (["preview", __file__, "-o", "p"], 2, "stderr", "-o 'p': give an image file name"),
        (["preview", "", "-o", "p.png"], 2, "stderr", "the embedding is an empty string"),
    ],
)
def test_help_and_usage_errors_load_no_heavy_module(argv, code, stream, text, tmp_path) -> None:
    """``--help``, a usage error, an unknown option value, a missing file or options that do
    not go together answer at once, without importing torch, and write nothing."""
    script = (
        "import sys\n"
        "from torchgeo_dofa.cli import main\n"
        "try:\n    status = main(sys.argv[1:])\nexcept SystemExit as e:\n    status = e.code\n"
        "heavy = [m for m in ('torch', 'lightning', 'torchgeo', 'rasterio') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy), 'STATUS=' + str(status), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    heavy = "rasterio" if argv[0] == "preview" and argv[1] != "--help" else ""  # reads a file
    assert out.stderr.strip().splitlines()[-1] == f"HEAVY={heavy} STATUS={code}", out.stderr
    assert text in getattr(out, stream)
    assert list(tmp_path.iterdir()) == []  # no output folder, lock or manifest


def test_embed_signature_type_hints_resolve() -> None:
    """Tools that read type hints (jsonargparse, typer, sphinx) can inspect ``embed``."""
    import typing

    from torchgeo_dofa import cli

    hints = typing.get_type_hints(cli.embed)
    assert hints["return"] is cli.EmbedSummary and "callbacks" in hints


def test_cli_input_error_is_the_datasets_one() -> None:
    from torchgeo_dofa import cli
    from torchgeo_dofa.datasets import InputError

    assert cli.InputError is InputError and "InputError" in cli.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        cli.no_such_name  # noqa: B018


def test_every_public_name_resolves_to_its_module() -> None:
    assert set(torchgeo_dofa.__all__) == set(torchgeo_dofa._LAZY)
    for name in torchgeo_dofa.__all__:
        module = importlib.import_module(f"torchgeo_dofa.{torchgeo_dofa._LAZY[name]}")
        assert getattr(torchgeo_dofa, name) is getattr(module, name), name
    assert set(torchgeo_dofa.__all__) <= set(dir(torchgeo_dofa))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        torchgeo_dofa.no_such_name  # noqa: B018


def _run_launcher(env_value: str | None) -> str:
    """``torchgeo_dofa.__main__.main(['--help'])`` in a fresh process: OMP_WAIT_POLICY after."""
    import os

    code = (
        "import os, sys\n"
        "from torchgeo_dofa.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('OMP_WAIT_POLICY=' + str(os.environ.get('OMP_WAIT_POLICY')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_command_line_waits_passively_unless_told_otherwise() -> None:
    """The console script sets OMP_WAIT_POLICY=PASSIVE before torch loads; a user's value stays."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "torchgeo-dofa"]
    assert script.value == "torchgeo_dofa.__main__:main"  # the installed command is the launcher
    assert _run_launcher(None) == "OMP_WAIT_POLICY=PASSIVE"
    assert _run_launcher("ACTIVE") == "OMP_WAIT_POLICY=ACTIVE"


def test_openmp_defaults_are_not_applied_once_torch_is_loaded() -> None:
    """After ``import torch`` a change would not reach OpenMP: nothing is set, nothing claimed."""
    import torch  # noqa: F401

    from torchgeo_dofa.__main__ import apply_openmp_defaults

    env: dict[str, str] = {}
    assert apply_openmp_defaults(env) == {} and env == {}


def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path) -> None:
    """Ctrl-C in the first seconds (torch, Lightning and TorchGeo loading, before the job's
    handlers exist) printed a KeyboardInterrupt traceback and died by the signal."""
    import signal
    import time

    from tests.scenes import SCENE

    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o",
           str(tmp_path / "out"), "--weights", "none"]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the libraries take several seconds to load
    job.send_signal(signal.SIGINT)
    _ends_in_one_line(job, 130, "interrupted (Ctrl-C);", tmp_path / "out")


def _ends_in_one_line(job: subprocess.Popen[str], status: int, said: str, out: Any) -> None:
    """The stopped command's status and last line (``said`` then the advice of an embed
    stopped before its first chip), no traceback, and no output folder left."""
    _, err = job.communicate(timeout=120)
    assert job.returncode == status, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"torchgeo-dofa: error: {said} embed stopped before its first chip: rerun the same command"
    ), err
    assert "Traceback" not in err
    assert not out.exists()


#: A command run as ``python -m``: a Ctrl-C interrupts code run through ``PyRun_*`` inside it
#: (as it can while torch loads), the command handles it and returns 130; ``atexit`` handlers.
_COMMAND = """\
import atexit, ctypes, os, signal, sys
from torchgeo_dofa.__main__ import run_as_command
if "--earlier-handler" in sys.argv:
    atexit.register(print, "earlier handler")
def command():
    loading = {"--ctrl-c-while-loading": signal.SIGINT, "--sigterm-while-loading": signal.SIGTERM}
    if sys.argv[1:2] and sys.argv[1] in loading:
        try:  # no end_import_pause yet: the libraries load
            os.kill(os.getpid(), loading[sys.argv[1]])
            for _ in range(100):  # Python code run during the load (a pybind11 callback)
                sum(range(1000))
        except KeyboardInterrupt:
            print("KeyboardInterrupt raised into the loading code")
        print("summary")
        return 0
    if "--sigterm-before-the-job" in sys.argv:  # libraries loaded, no job handler yet
        from torchgeo_dofa.__main__ import end_import_pause
        end_import_pause()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                sum(range(1000))
            print("summary")
        finally:
            if "--twice" in sys.argv:  # a second SIGTERM while it unwinds
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):
                    sum(range(1000))
            print("released")
        return 0
    if "--two-sigterms-in-a-job" in sys.argv:  # a second SIGTERM during a job: at once
        from torchgeo_dofa.__main__ import end_import_pause
        from torchgeo_dofa.jobs import StopOnSignal
        end_import_pause()
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            print("first", stop.received == signal.SIGTERM, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                sum(range(1000))
            print("summary")
        return 0
    if "--ctrl-c-at-exit" in sys.argv or "--sigterm-at-exit" in sys.argv:
        sent = signal.SIGINT if "--ctrl-c-at-exit" in sys.argv else signal.SIGTERM
        atexit.register(os.kill, os.getpid(), sent)  # run last of the command's handlers
        atexit.register(print, "handler")
        print("summary")
        return 0
    atexit.register(print, "handler")
    ctypes.pythonapi.PyRun_SimpleString(b"raise KeyboardInterrupt")
    print("summary")  # stdout is a pipe: block-buffered, flushed at exit
    return 130
sys.exit(run_as_command(command))
"""


def _run_command(tmp_path, *args: str, fast_exit: str | None = None) -> tuple[int, str, str]:
    import os

    (tmp_path / "interrupted_command.py").write_text(_COMMAND)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TORCHGEO_DOFA_FAST_EXIT", "PYTHONUNBUFFERED")
    }
    if fast_exit is not None:
        env["TORCHGEO_DOFA_FAST_EXIT"] = fast_exit
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted_command", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_the_command_registers_no_exit_handler_before_its_own() -> None:
    """``run_as_command``'s exit handler ends the process and must run last, so nothing may
    register one before it: importing ``multiprocessing.util`` does (its cleanup of child
    processes and temporary folders), and raising the open-file limit, first done in
    ``main`` before ``run_as_command``, imported it there, so that cleanup never ran."""
    code = """
import atexit, sys
import torchgeo_dofa.__main__ as m
n = atexit._ncallbacks()
run = m.run_as_command
def counted(command):
    print(atexit._ncallbacks() - n, "multiprocessing.util" in sys.modules, flush=True)
    return run(command)
m.run_as_command = counted
sys.argv = ["torchgeo-dofa", "embed", "--help"]
sys.exit(m.main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == ["0", "False"], out


def test_a_command_exits_with_the_status_it_returned(tmp_path) -> None:
    """``python -m torchgeo_dofa`` returned 130 after a Ctrl-C while the libraries loaded, and
    the process died by SIGINT now and then instead (Python does so after ``python -m`` when a
    KeyboardInterrupt left nested ``PyRun_*`` code); the exit skips the interpreter teardown
    (~1.1 s) and still runs the exit handlers and flushes stdout."""
    assert _run_command(tmp_path)[:2] == (130, "summary\nhandler\n")
    # an exit handler registered before the command (a coverage tool's) keeps Python's exit
    status, out, _ = _run_command(tmp_path, "--earlier-handler")
    assert out == "summary\nhandler\nearlier handler\n"
    assert status == -2
    # as does TORCHGEO_DOFA_FAST_EXIT=0: the SIGINT death this is about
    assert _run_command(tmp_path, fast_exit="0")[:2] == (-2, "summary\nhandler\n")


def test_ctrl_c_while_the_libraries_load_raises_nothing_into_them(tmp_path) -> None:
    """A Ctrl-C while the libraries load raised ``KeyboardInterrupt`` wherever the main
    thread was: inside torch's compiled code it ended the process with "terminate called
    after throwing an instance of 'pybind11::error_already_set'" (SIGABRT), inside an
    extension module's initialisation with an ``ImportError`` traceback. Now it ends the
    process at once with the one line and 130, raising nothing (also under
    ``TORCHGEO_DOFA_FAST_EXIT=0``)."""
    line = (
        "torchgeo-dofa: error: interrupted (Ctrl-C); nothing saved at the stop: rerun the "
        "same command\n"
    )
    for fast_exit in (None, "0"):
        status, out, err = _run_command(tmp_path, "--ctrl-c-while-loading", fast_exit=fast_exit)
        assert (status, out, err) == (130, "", line)
    # SIGTERM there ended the process silently (by the signal)
    status, out, err = _run_command(tmp_path, "--sigterm-while-loading")
    assert (status, out) == (143, "")
    assert err == line.replace("interrupted (Ctrl-C);", "stopped by SIGTERM:")


def test_sigterm_after_the_libraries_loaded_is_handled_as_ctrl_c_is(tmp_path) -> None:
    """SIGTERM after the libraries loaded but before a job's handler took it (an ``embed``
    checking its inputs and loading its weights) ended the process by the signal, with no
    line, leaving the output folder and its lock file; a Ctrl-C there was one line, exit
    130, nothing left. SIGTERM now unwinds the command as Ctrl-C does, exit 143; a second
    SIGTERM during a job still ends the process at once (by the signal)."""
    assert _run_command(tmp_path, "--sigterm-before-the-job") == (143, "released\n", "")
    # a second one while the command unwinds: raised from its finally blocks (a traceback,
    # exit 1: helper-129); now nothing more
    twice = _run_command(tmp_path, "--sigterm-before-the-job", "--twice")
    assert twice == (143, "released\n", "")
    status, out, _ = _run_command(tmp_path, "--two-sigterms-in-a-job")
    assert (status, out) == (-signal.SIGTERM, "first True\n")
    # a real job: stopped (SIGSTOP) once it holds its folder's lock, before its handler,
    # then sent SIGTERM
    from tests.scenes import SCENE

    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(out_dir),
           "--weights", "none", "--no-progress"]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out_dir / LOCK_NAME
    deadline = time.monotonic() + 120
    while not lock.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    job.send_signal(signal.SIGSTOP)
    assert not (out_dir / MANIFEST_NAME).exists()  # the job had not begun
    job.send_signal(signal.SIGTERM)
    job.send_signal(signal.SIGCONT)
    _ends_in_one_line(job, 143, "stopped by SIGTERM:", out_dir)


def test_ctrl_c_after_the_command_returned_is_ignored(tmp_path) -> None:
    """A Ctrl-C in the instant after the summary interrupted the exit handlers: a
    KeyboardInterrupt traceback after a successful job (a stranger's finding). SIGTERM too."""
    assert _run_command(tmp_path, "--ctrl-c-at-exit") == (0, "summary\nhandler\n", "")
    status, _, err = _run_command(tmp_path, "--ctrl-c-at-exit", fast_exit="0")
    assert "KeyboardInterrupt" in err or status == -2  # what Python's own exit does
    # SIGTERM there ended a finished job by the signal (-15, the shell's 143) after its
    # summary, without a word (helper-134)
    assert _run_command(tmp_path, "--sigterm-at-exit") == (0, "summary\nhandler\n", "")


#: ``python -m torchgeo_dofa ...`` as Python runs it (``runpy``, as ``-m`` does), reporting
#: every collection of Python's cyclic collector on stderr: its generation and how many
#: objects were frozen since the start. Registers no exit handler (the fast exit stays on).
_COLLECTIONS = """\
import gc, os, runpy, sys
start = gc.get_freeze_count()  # not 0 on every Python (375 objects frozen here on 3.12)
def report(phase, info):
    if phase == "stop":
        frozen = gc.get_freeze_count() - start
        os.write(2, f"collection {info['generation']} {frozen}\\n".encode())
gc.callbacks.append(report)
sys.argv = ["torchgeo-dofa", *sys.argv[1:]]
runpy.run_module("torchgeo_dofa", run_name="__main__", alter_sys=True)
"""


def test_the_command_freezes_what_its_libraries_made_before_the_job(tmp_path) -> None:
    """Each full collection walked the ~530,000 objects the imports made (~0.12 s each,
    eight in a one-chip job's run). The command pauses the collector while its libraries
    load, freezes their objects, then collects as usual; under ``python -m`` the CLI saw
    another copy of ``torchgeo_dofa.__main__`` (and freed the finished job with a full
    collection, 0.2-0.3 s, although the process was ending)."""
    from tests.scenes import SCENE
    from tests.test_cli import _one_chip_bbox

    (tmp_path / "collections.py").write_text(_COLLECTIONS)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "collections.py"), "embed", str(SCENE), "-o", str(out),
         *_one_chip_bbox(SCENE), "--weights", "none", "--no-progress",
         "--output", "grid"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded 1 chip" in proc.stdout
    seen = [tuple(map(int, line.split()[1:])) for line in proc.stderr.splitlines()
            if line.startswith("collection ")]  # fmt: skip
    # (a few young collections happen before the command starts: the package's own import)
    assert [g for g, frozen in seen if frozen == 0 and g == 2] == [], "a full collection before"
    assert [g for g, frozen in seen if frozen > 100_000], "no collection during the job"


def test_predict_config_freezes_what_its_libraries_made_before_the_job(
    tmp_path, base_checkpoint, monkeypatch
) -> None:
    """``predict --config`` (LightningCLI) ends the collector's pause as ``embed`` does."""
    import gc

    import yaml

    from tests.test_cli import _predict_config
    from torchgeo_dofa.__main__ import run_as_command
    from torchgeo_dofa.cli import main

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_predict_config(tmp_path, base_checkpoint)))
    before = gc.get_freeze_count()
    frozen: list[int] = []

    def report(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            frozen.append(gc.get_freeze_count() - before)

    gc.callbacks.append(report)
    monkeypatch.setenv("TORCHGEO_DOFA_FAST_EXIT", "0")  # pytest's process must not end here
    try:
        assert (
            run_as_command(lambda: main(["predict", "--config", str(tmp_path / "cfg.yaml")])) == 0
        )
    finally:
        gc.callbacks.remove(report)
    assert gc.isenabled()
    assert frozen and min(frozen) > 0  # collections ran during the job, all after the freeze


def test_the_collector_is_left_as_it_was_outside_the_command(monkeypatch) -> None:
    """A command that loads no library (``--help``) gets the collector back on; a Python
    caller's collector is neither paused nor frozen by the CLI's functions."""
    import gc
    import signal

    from torchgeo_dofa.__main__ import (
        _exit_on_signal,
        end_import_pause,
        run_as_command,
        terminate_before_the_job,
    )

    monkeypatch.setenv("TORCHGEO_DOFA_FAST_EXIT", "0")  # pytest's process must not end here
    states: list[bool] = []

    def command() -> int:
        states.append(gc.isenabled())
        handlers.extend(signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM))
        end_import_pause()
        handlers.extend(signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM))
        states.append(gc.isenabled())
        return 0

    handlers: list[object] = []
    assert run_as_command(command) == 0
    assert states == [False, True] and gc.isenabled()
    # Ctrl-C and SIGTERM end the process at once while the libraries load; then Ctrl-C
    # raises KeyboardInterrupt and SIGTERM Terminated (a KeyboardInterrupt) until it returns
    assert handlers == [
        _exit_on_signal,
        _exit_on_signal,
        signal.default_int_handler,
        terminate_before_the_job,
    ]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    frozen = gc.get_freeze_count()
    end_import_pause()
    assert gc.get_freeze_count() == frozen and gc.isenabled()


_UNSEEDED = (
    "the chips written so far cannot be resumed (random weights without a seed are drawn anew "
    "on every run): "
)


@pytest.mark.parametrize(
    ("command", "began", "advice"),
    [
        ("embed", True, "the chips written so far are kept; rerun the same command to resume"),
        ("predict", True, "the chips written so far are kept; rerun the same command to resume"),
        # (it added "chips an earlier run of the job wrote are kept", which a run with
        # --overwrite had deleted: helper-134)
        ("predict", False, "predict stopped before its first chip: rerun the same command"),
        (
            "embed",
            None,
            f"{_UNSEEDED}rerun with --overwrite, or with --seed N to make a job resumable",
        ),
        (
            "predict",
            None,
            f"{_UNSEEDED}delete the outputs' .parts folders to start afresh, or give the model "
            "a seed (--model.init_args.seed N) to make a job resumable",
        ),
        (
            "fit",
            True,
            "nothing saved at the stop: rerun the same command with --ckpt_path of the last "
            "checkpoint saved, if any",
        ),
        ("fit", False, "fit stopped before it began, nothing saved: rerun the same command"),
        ("test", True, "nothing saved at the stop: rerun the same command"),
        (
            "validate",
            False,
            "validate stopped before it began, nothing saved: rerun the same command",
        ),
        ("preview", False, "nothing saved at the stop: rerun the same command"),
        (None, False, "nothing saved at the stop: rerun the same command"),
    ],
)
def test_a_stop_is_advised_alike_wherever_it_is_reported(
    command: str | None, began: bool | None, advice: str
) -> None:
    """One wording per command for the job's handler, Lightning's shutdown and a Ctrl-C while
    the libraries load (three wordings before; "chips kept" for a ``preview``); only an
    embed or predict job keeps chips, only ``fit`` has a checkpoint to resume from, and a
    job with random weights drawn without a seed (``began`` None here) cannot be resumed
    (it said "rerun the same command to resume", which refused), fixed with the command's
    own options (a predict was told embed's ``--overwrite`` / ``--seed``); a stop before
    the first chip says so (it said "the chips written so far are kept"). It lives in
    :mod:`torchgeo_dofa.locks`, which loads no PyTorch (test above)."""
    from torchgeo_dofa.locks import stop_advice

    if began is None:
        assert stop_advice(command, resumable=False) == advice
    else:
        assert stop_advice(command, began=began) == advice


def test_a_job_stopped_before_its_first_chip_is_a_plain_rerun_whatever_its_weights() -> None:
    """An embed with random weights drawn without a seed, stopped before it wrote a chip, was
    told that "the chips written so far cannot be resumed" (there were none, and it left
    nothing: the same command runs it afresh)."""
    from torchgeo_dofa.locks import stop_advice

    for command in ("embed", "predict"):
        assert stop_advice(command, began=False, resumable=False) == (
            f"{command} stopped before its first chip: rerun the same command"
        )


_HEAP_PROBE = """
import ctypes, json, os, sys
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1:]:  # the torchgeo-dofa command, as its console script runs it
    sys.argv = ["torchgeo-dofa", *sys.argv[1:], "--help"]
    from torchgeo_dofa.__main__ import main
    try:
        main()
    except SystemExit:
        pass
before = mallinfo2()
block = np.ones(64 << 18, dtype=np.float32)  # 64 MiB, as a batch's activations
held = mallinfo2()
del block
freed = mallinfo2()
print(json.dumps({"mapped_held": held.hblkhd - before.hblkhd, "heap_after_free": freed.arena}))
"""


def _heap_probe(*command: str, **env: str) -> dict[str, int]:
    """Where glibc puts a 64 MiB block and what it keeps once it is freed, in a fresh process
    (after ``torchgeo-dofa COMMAND --help`` where a command is given)."""
    import json

    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "TORCHGEO_")) and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE, *command],
        capture_output=True, text=True, env={**clean, **env}, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not _is_glibc(), reason="glibc's allocator settings only")
def test_the_command_keeps_freed_tensors_in_the_heap() -> None:
    """A batch-sized block is mapped and unmapped by glibc's defaults (each batch page-faults
    its memory in again); the prediction commands keep it in the heap, unless the user says
    otherwise; ``fit`` (more memory, no faster) keeps glibc's defaults."""
    plain = _heap_probe()
    assert plain["mapped_held"] >= 64 << 20  # mmap'd: returned to the system when freed
    for command in ("embed", "predict"):
        tuned = _heap_probe(command)
        assert tuned["mapped_held"] == 0 and tuned["heap_after_free"] >= 64 << 20, command
    assert _heap_probe("fit")["mapped_held"] >= 64 << 20
    for env in ({"TORCHGEO_DOFA_MALLOPT": "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}):
        assert _heap_probe("embed", **env)["mapped_held"] >= 64 << 20, env


def test_malloc_defaults_leave_a_users_allocator_settings_alone() -> None:
    """The user's own allocator settings (even an empty variable, which glibc reads as 0) or
    allocator are kept: mallopt is not called at all."""
    from torchgeo_dofa.__main__ import apply_malloc_defaults

    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    for env in (
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TRIM_THRESHOLD_": ""},
        {"MALLOC_TOP_PAD_": "0"},
        {"MALLOC_MMAP_MAX_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.mmap_threshold=65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
        {"LD_PRELOAD": "/opt/libTCMalloc_minimal.so"},
        {"LD_PRELOAD": "/opt/intel/oneapi/tbb/lib/libtbbmalloc_proxy.so.2"},
        {"TORCHGEO_DOFA_MALLOPT": "0"},
    ):
        assert apply_malloc_defaults(env, mallopt=mallopt) == {}, env
    assert calls == []
    # settings of glibc's that these thresholds do not touch are no reason to leave them
    for env in (
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"LD_PRELOAD": "/usr/lib/libc_malloc_debug.so.0"},
    ):
        assert apply_malloc_defaults(env, mallopt=mallopt) == {
            "M_MMAP_THRESHOLD": 1 << 30, "M_TRIM_THRESHOLD": 1 << 30
        }, env  # fmt: skip


def test_malloc_defaults_never_leave_only_the_trim_threshold_raised() -> None:
    """Older glibc refuses an mmap threshold above 32 MiB; a trim threshold set alone fixes
    the mmap threshold at 128 KiB (a 256-chip embed 14-15 s against 11.8 s with glibc's
    defaults): the mmap threshold comes first, 32 MiB where 1 GiB is refused, and without one
    nothing is set."""
    from torchgeo_dofa.__main__ import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, apply_malloc_defaults

    def glibc_taking_mmap_thresholds_to(limit: int) -> tuple[list[tuple[int, int]], Any]:
        calls: list[tuple[int, int]] = []

        def mallopt(param: int, value: int) -> int:
            calls.append((param, value))
            return int(param != M_MMAP_THRESHOLD or value <= limit)

        return calls, mallopt

    calls, old_glibc = glibc_taking_mmap_thresholds_to(32 << 20)
    assert apply_malloc_defaults({}, mallopt=old_glibc) == {
        "M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30
    }  # fmt: skip
    assert calls == [(M_MMAP_THRESHOLD, 1 << 30), (M_MMAP_THRESHOLD, 32 << 20),
                     (M_TRIM_THRESHOLD, 1 << 30)]  # fmt: skip
    calls, none_taken = glibc_taking_mmap_thresholds_to(0)
    assert apply_malloc_defaults({}, mallopt=none_taken) == {}
    assert all(param == M_MMAP_THRESHOLD for param, _ in calls)
