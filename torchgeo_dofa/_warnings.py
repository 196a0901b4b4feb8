"""Warnings attributed to the caller's code rather than to a line inside this package.

A warning raised deep in a dataset, writer or transform would otherwise point at that line
(``torchgeo_dofa/transforms.py:226``), or at Lightning's loop that called a writer, so
neither the location shown nor a ``warnings.filterwarnings(..., module=...)`` filter would
name the user's script.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

#: Frames in files under this folder are skipped when attributing a warning.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: Modules whose frames sit between a user's call and this package's code: Lightning's loops
#: (calling writers and tasks), ``nn.Module.__call__`` (calling transforms and models),
#: TorchGeo's datasets and samplers (calling ours in compositions).
FRAMEWORKS = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "torch.nn.modules",
    "torchgeo",
)


#: Set by :func:`attributed_to_package` (the CLI): warnings keep the package's own line.
_inside = False


@contextlib.contextmanager
def attributed_to_package() -> Iterator[None]:
    """Within this context, warnings point at the package line that issued them.

    The command line shows warnings whose file is in the package as one line
    (``torchgeo-dofa: warning: ...``) and everyone else's in Python's long form.
    """
    global _inside
    before, _inside = _inside, True
    try:
        yield
    finally:
        _inside = before


def skipped_prefixes() -> tuple[str, ...]:
    """This package's folder, and those of the loaded :data:`FRAMEWORKS`.

    PyTorch's DataLoader is not skipped: a chip read in a worker has no user frame, so its
    warnings point at PyTorch's fetch loop rather than at nothing.
    """
    prefixes = [PACKAGE_DIR]
    for name in FRAMEWORKS:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:  # not loaded: none of its frames can be on the stack
            prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(prefixes)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` from the first frame outside ``torchgeo_dofa`` and :data:`FRAMEWORKS`.

    Uses Python 3.12's ``warnings.warn(..., skip_file_prefixes=...)``: the location shown,
    and the module ``-W`` / ``filterwarnings`` match against, is the caller's (a user's
    script calling ``embed`` or ``Trainer.predict``; for a chip read in a DataLoader worker,
    PyTorch's fetch loop).

    Args:
        message: the warning text.
        category: the warning class (default :class:`UserWarning`).
    """
    if _inside:
        warnings.warn(message, category, stacklevel=2)
    else:
        warnings.warn(message, category, skip_file_prefixes=skipped_prefixes())
