"""Walking an exception's chain of causes and contexts.

Lightning, jsonargparse and rasterio wrap the error that matters (an ``OSError`` with its
``errno``, PyTorch's ``DistNetworkError``, this package's bad-input errors) in their own, so
the code that reports a failure looks along the whole chain, as ``traceback`` prints it.
"""

from __future__ import annotations

from collections.abc import Iterator


def exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err``, then each exception it was raised from or while handling, outermost first.

    Follows ``__cause__`` (``raise ... from``) where set, else ``__context__`` (raised while
    handling), as :mod:`traceback` does, but also where ``raise ... from None`` hid the
    context from a printed traceback (the error sought may be there); each exception is
    yielded once, so a chain that loops back on itself ends.

    Args:
        err: the exception caught, or None (nothing is yielded).

    Yields:
        The exceptions of the chain, ``err`` first.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
