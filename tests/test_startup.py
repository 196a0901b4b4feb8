"""Start-up: the package imports without its heavy dependencies; every public name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import torchgeo_dofa


def test_import_loads_no_heavy_module() -> None:
    code = (
        "import sys, torchgeo_dofa; "
        "print(sorted(m for m in ('torch', 'torchgeo', 'lightning', 'rasterio', 'geopandas') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    ("argv", "code", "stream", "text"),
    [
        (["--help"], 0, "stdout", "embed"),
        (["embed", "--help"], 0, "stdout", "--output-dir"),
        (["preview", "--help"], 0, "stdout", "embedding"),
        (["embed", "scene.tif"], 2, "stderr", "the following arguments are required: -o"),
        (["embed", "scene.tif", "-o", "out", "--batch-size", "x"], 2, "stderr", "invalid int"),
    ],
)
def test_help_and_usage_errors_load_no_heavy_module(argv, code, stream, text) -> None:
    """``torchgeo-dofa --help`` and a usage error answer at once, without importing torch."""
    script = (
        "import sys\n"
        "from torchgeo_dofa.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    status = e.code\n"
        "heavy = [m for m in ('torch', 'lightning', 'rasterio') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy), 'STATUS=' + str(status), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120
    )
    assert out.stderr.strip().splitlines()[-1] == f"HEAVY= STATUS={code}", out.stderr
    assert text in getattr(out, stream)


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
