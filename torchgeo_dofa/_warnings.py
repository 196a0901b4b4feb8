"""Warnings attributed to the caller's code rather than to a line inside this package.

A warning raised deep in a dataset, writer or transform would otherwise point at that line
(``torchgeo_dofa/transforms.py:226``), or at Lightning's loop that called a writer, so
neither the location shown nor a ``warnings.filterwarnings(..., module=...)`` filter would
name the user's script.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator

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

#: Set by :func:`reworded`: what :func:`warn` passes each message through first.
_REWORD: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar(
    "torchgeo_dofa_reword", default=None
)

#: Set by :func:`each_once`: the (message, category) pairs :func:`warn` has issued in it.
_ISSUED: contextvars.ContextVar[set[tuple[str, type[Warning]]] | None] = contextvars.ContextVar(
    "torchgeo_dofa_issued", default=None
)


@contextlib.contextmanager
def reworded(fn: Callable[[str], str]) -> Iterator[None]:
    """Within this context, this package's warnings pass through ``fn`` before they are issued.

    The API names a dataset's arguments as its own callers spell them (``paths=Sentinel2SR(
    FILES, offset=0)`` for the dataset's ``(offset=0)``). An inner context's ``fn`` applies
    first, then the outer's. Unlike recording the warnings (``warnings.catch_warnings``) and
    issuing them again, this changes no warning filter: other threads' warnings are
    untouched, and Python's once-per-location registries are kept.

    Args:
        fn: maps a warning's message to the message issued.
    """
    outer = _REWORD.get()
    both = fn if outer is None else (lambda message: outer(fn(message)))
    token = _REWORD.set(both)
    try:
        yield
    finally:
        _REWORD.reset(token)


def each_once_per_call[**P, R](fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate ``fn`` so each of its calls runs within :func:`each_once`.

    A wrapper defined here (not ``contextlib``'s decorator) so that its frame lies in this
    package and the warnings still point at the caller's line.
    """

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with each_once():
            return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def each_once() -> Iterator[None]:
    """Within this context, each warning of this package (same message and category) is issued once.

    A batch call (``get_embeddings_batch``, ``export_batch``) checks a file once per region
    it reads: its warning about the file came once per region, since any
    ``warnings.catch_warnings`` in between (there are some in PyTorch, rasterio and here)
    resets Python's once-per-location memory. Nested contexts share the outer one's record.
    """
    if _ISSUED.get() is not None:
        yield
        return
    token = _ISSUED.set(set())
    try:
        yield
    finally:
        _ISSUED.reset(token)


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

    Within :func:`reworded`, ``message`` is reworded first; within :func:`each_once`, a
    message already issued there is not issued again.

    Args:
        message: the warning text.
        category: the warning class (default :class:`UserWarning`).
    """
    reword = _REWORD.get()
    if reword is not None:
        message = reword(message)
    issued = _ISSUED.get()
    if issued is not None:
        if (message, category) in issued:
            return
        issued.add((message, category))
    if _inside:
        warnings.warn(message, category, stacklevel=2)
    else:
        warnings.warn(message, category, skip_file_prefixes=skipped_prefixes())
