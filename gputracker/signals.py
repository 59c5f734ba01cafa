"""SIGINT/SIGTERM/SIGHUP -> ``Dispatcher.request_stop()``, restoring the previous handlers after.

Only the main thread may install signal handlers (a Python rule); the handler itself only
sets a flag and writes to a pipe, so it is safe whatever the dispatcher is doing.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

# SIGHUP: the ssh session was dropped (no nohup); stopping cleanly beats dying silently
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def install_signal_handlers(dispatcher, signals=STOP_SIGNALS):
    """Within the ``with`` block, SIGINT/SIGTERM/SIGHUP stop ``dispatcher`` gracefully (a second
    signal kills the jobs at once). Previous handlers are restored on exit."""
    received: list[int] = []

    def handle(signum, frame):
        received.append(signum)
        dispatcher.request_stop()

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
