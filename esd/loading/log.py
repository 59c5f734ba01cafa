"""The loader's one logger, and routing its warnings to a caller's callback.

Every loading module warns through `logger` (named `model_loader`, as before the split). A
caller that wants the warnings of one model as strings (the worker's log, a test) passes
`warn=` to `model_loader.resolve_model` / `iter_layers`; while that call (or each step of the
iterator) runs, the logger hands its records to the callback instead of the log handlers.
A contextvar holds the callback, so other threads and other models are not affected.

Must not: format, filter or count messages (callers decide what to do with them).
`recorded_warnings` only copies them (the plan cache keeps a plan's warnings to replay them).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, TypeVar

Warn = Callable[[str], None]
T = TypeVar("T")

logger = logging.getLogger("model_loader")
_callback: ContextVar[Warn | None] = ContextVar("model_loader_warn", default=None)
_recorders: ContextVar[tuple[list, ...]] = ContextVar("model_loader_recorders", default=())


class _ToCallback(logging.Filter):
    """While a callback is set, warnings go to it (and not on to the handlers). Warnings are
    also copied to every active `recorded_warnings` list."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            for messages in _recorders.get():
                messages.append(record.getMessage())
        callback = _callback.get()
        if callback is None or record.levelno < logging.WARNING:
            return True
        callback(record.getMessage())
        return False


logger.addFilter(_ToCallback())


@contextmanager
def warnings_to(warn: Warn | None):
    """Route the loader's warnings to `warn` inside the block (no change when None)."""
    if warn is None:
        yield
        return
    token = _callback.set(warn)
    try:
        yield
    finally:
        _callback.reset(token)


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """A list that collects the loader's warnings given inside the block (they still go
    where they would go without it)."""
    messages: list[str] = []
    token = _recorders.set(_recorders.get() + (messages,))
    try:
        yield messages
    finally:
        _recorders.reset(token)


def iter_with_warnings_to(items: Iterable[T], warn: Warn | None) -> Iterator[T]:
    """`items`, with the loader's warnings routed to `warn` while each item is produced."""
    iterator = iter(items)
    try:
        while True:
            with warnings_to(warn):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            with warnings_to(warn):
                close()
