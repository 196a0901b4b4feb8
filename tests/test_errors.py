"""The exception-chain walk every error report of the package uses."""

from __future__ import annotations

import traceback

from torchgeo_dofa._errors import exception_chain


def _chained() -> BaseException:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as disk:
            try:
                raise KeyError("while handling")  # context of the next one
            except KeyError:
                raise RuntimeError("Write failed") from disk
    except RuntimeError as outer:
        return outer
    raise AssertionError("unreachable")


def test_chain_follows_causes_first_as_traceback_prints_them() -> None:
    outer = _chained()
    chain = list(exception_chain(outer))
    assert [type(e) for e in chain] == [RuntimeError, OSError]
    # traceback shows the same exceptions (innermost first there)
    printed = traceback.format_exception(outer)
    shown = [line for line in printed if line.startswith(("RuntimeError", "OSError", "KeyError"))]
    assert [line.split(":")[0] for line in reversed(shown)] == ["RuntimeError", "OSError"]


def test_chain_follows_context_without_cause_and_ends_on_a_loop() -> None:
    first, second = ValueError("first"), TypeError("second")
    second.__context__ = first
    first.__context__ = second  # a cycle: each must come once
    assert list(exception_chain(second)) == [second, first]
    assert list(exception_chain(None)) == []
