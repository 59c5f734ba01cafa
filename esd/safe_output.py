"""Console and log output that survives a hostile world: stdout piped into `head` (a closed
pipe), a log file on a full disk, text with terminal control sequences in it.

Owns: `tolerant_std_streams` (writes to a closed pipe or a full disk are dropped, never a
BrokenPipeError traceback, here or at exit), `guard_logging` (a log handler that cannot
write stays quiet instead of printing "--- Logging error ---" tracebacks; the disk-full
case is remembered for the run's last line; console lines get control characters
escaped, so an ANSI sequence from a model's files never drives the terminal).
Must not decide anything about the run: it only keeps output from crashing it.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import re
import sys

from esd import diskfull
from esd.failures import escape_line_text

DEAD_OUTPUT = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EIO)  # errors of an output that is gone


def _silence_fd(stream) -> None:
    """Point the stream's descriptor at /dev/null: later writes and the final flush at exit
    succeed (Python would otherwise report a BrokenPipeError while shutting down)."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


class _TolerantStream(io.TextIOBase):
    """A text stream forwarding to `inner`; the first write that finds the pipe closed or
    the disk full silences the stream for the rest of the process."""

    def __init__(self, inner):
        self._inner = inner
        self.dead = False

    def _guard(self, call, *args):
        if self.dead:
            return None
        try:
            return call(*args)
        except (BrokenPipeError, OSError) as exc:
            if getattr(exc, "errno", None) not in DEAD_OUTPUT:
                raise
            self.dead = True
            if diskfull.is_disk_full(exc):
                diskfull.note(getattr(self._inner, "name", "<output>"))
            _silence_fd(self._inner)
            return None

    def write(self, text):
        self._guard(self._inner.write, text)
        return len(text)

    def flush(self):
        self._guard(self._inner.flush)

    def fileno(self):
        return self._inner.fileno()

    def isatty(self):
        try:
            return self._inner.isatty()
        except (OSError, ValueError):
            return False

    @property
    def encoding(self):
        return getattr(self._inner, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self._inner, "errors", "strict")

    @property
    def name(self):
        return getattr(self._inner, "name", "<stream>")

    def writable(self):
        return True


def tolerant_std_streams() -> None:
    """Replace sys.stdout/sys.stderr with tolerant forwarders (once per process)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _TolerantStream):
            setattr(sys, name, _TolerantStream(stream))


class _EscapingFormatter(logging.Formatter):
    """A console line with control characters (ESC, CR, …) escaped; newlines kept."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(escape_line_text(line) for line in self._inner.format(record).split("\n"))


def _quiet_handle_error(handler: logging.Handler):
    original = handler.handleError

    def handle_error(record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno in DEAD_OUTPUT:
            if diskfull.is_disk_full(exc):
                diskfull.note(getattr(handler, "baseFilename", "the log"))
            return  # the line is lost; the run goes on, and its last line says why
        original(record)

    return handle_error


def guard_logging(*loggers: logging.Logger) -> None:
    """Make every handler of `loggers` quiet on a full disk or a closed pipe, and escape
    control characters on console handlers."""
    for logger in loggers:
        for handler in logger.handlers:
            if getattr(handler, "_esd_guarded", False):
                continue
            handler._esd_guarded = True
            handler.handleError = _quiet_handle_error(handler)
            if not isinstance(handler, logging.FileHandler) and handler.formatter is not None:
                handler.setFormatter(_EscapingFormatter(handler.formatter))


def stop_on_hangup() -> None:
    """SIGHUP (the terminal went away) raises KeyboardInterrupt like Ctrl-C, so the run
    stops its workers and records itself instead of dying silently. Main thread only."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.default_int_handler)


_ROW_WARNING = re.compile(r"^(?P<where>model list .*?), row (?P<row>\d+): "
                          r"(?P<kind>duplicate of row|empty \w+|control characters)")


def summarised(warnings: list[str], show: int = 3) -> list[str]:
    """Model-list warnings with each kind (duplicate rows, empty ids, control characters)
    shown `show` times, then one line counting the rest: 500 rows give a few lines, not 288."""
    kinds: dict[tuple[str, str], list[int]] = {}
    out: list[str] = []
    for warning in warnings:
        match = _ROW_WARNING.match(warning)
        if match is None:
            out.append(warning)
            continue
        rows = kinds.setdefault((match["where"], match["kind"]), [])
        rows.append(int(match["row"]))
        if len(rows) <= show:
            out.append(warning)
    names = {"duplicate of row": "duplicate rows (analysed once)", "control characters": "rows with "
             "control characters (skipped)"}
    for (where, kind), rows in kinds.items():
        if len(rows) > show:
            name = names.get(kind, f"rows with an {kind} (skipped)" if kind.startswith("empty")
                             else kind)
            listed = ", ".join(map(str, rows[:10])) + (", …" if len(rows) > 10 else "")
            out.append(f"{where}: {len(rows)} {name} in all, first: row {rows[0]} (rows {listed}); "
                       f"the first {show} are shown above")
    return out
