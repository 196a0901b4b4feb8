"""A small real file system for full-disk and read-only tests (tmpfs, root only)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``"2m"``) at ``path`` (made here) for the block.

    ``inodes`` caps the number of files and folders it holds (its root included): a disk
    full of files rather than bytes.

    Skips the calling test where mounting is not permitted (not root, or in a container
    without the capability); unmounts on the way out, whatever happened.

    Yields:
        ``path``.
    """
    path.mkdir(parents=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes is not None else "")
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root or not permitted)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
