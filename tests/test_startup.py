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


def test_every_public_name_resolves_to_its_module() -> None:
    assert set(torchgeo_dofa.__all__) == set(torchgeo_dofa._LAZY)
    for name in torchgeo_dofa.__all__:
        module = importlib.import_module(f"torchgeo_dofa.{torchgeo_dofa._LAZY[name]}")
        assert getattr(torchgeo_dofa, name) is getattr(module, name), name
    assert set(torchgeo_dofa.__all__) <= set(dir(torchgeo_dofa))


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        torchgeo_dofa.no_such_name  # noqa: B018
