"""What a researcher sees while a run works: a sign of life every second on a terminal,
a status line every minute under nohup.

On a terminal (stderr is a TTY) two lines, redrawn every `tick_s`:

    models:  50%|█████     | 2/4 [01:10<01:10, 35.0s/model, failed=0]
    running: org--a (layer 12), org--b (layer 3) | waiting: GPU 0: 30000 MB used > 500 MB threshold

Elapsed time ticks even while no model ends; the ETA comes from the work done in this run:
the models finished and the layers of the running ones (`layer 12/30` is 0.4 of a model),
so it moves while a large model runs instead of waiting for it to end (models not started
yet count as the average so far). Under nohup (not a TTY) one log line per tenth of the
models and a status line
(counts, elapsed, ETA, running models with their layer, why others wait) every
`status_every_s`, so `tail -f logs/esd_experiment.log` shows the run is alive.

Owns the display only: it is told when a model ends (`update`), and asks two callables
for what runs (key, start time, worker log) and why the rest waits (the backend's words).
A running model's current layer is the last `layer i` (or `layer i/n`) line of its worker
log, or how far its download or stream is when that line is the later one
(`TransferLines` writes them in the worker). Decides nothing and never touches a result file.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

# The lines a worker prints as it advances, read by the status display and by the stall
# watchdog (`esd.supervisor`): a layer analysed (`  layer   12/74  name`, the worker's
# `_print_layer_done`) or bytes moved (`  downloaded org/m: 120.0 of 500.0 MB at 40.1 MB/s`,
# `TransferLines`; `  bytes N/M`, or any `12.3MB/s` rate). Nothing else is progress: a worker
# looping on HTTP requests grows its log by a line per request, and stays stalled.
LAYER_LINE = re.compile(rb"layer\s+(\d+)(?:\s*/\s*(\d+))?")
TRANSFER_LINE = re.compile(rb"(downloaded|streamed) \S+: ([\d.]+) of ([\d.]+) MB at ([\d.]+) MB/s")
PROGRESS_LINE = re.compile(rb"^[ \t]*(?:layer|bytes)[ \t]+\d+|\d[\d.]*[ \t]*[kKMGT]?i?B/s\b", re.MULTILINE)
# A worker's last line: how long it held its slot and how much of that it waited for bytes
# (downloading in the slot); read by the supervisor for the run's compute-vs-wait share.
SLOT_LINE = re.compile(rb"^slot: ([\d.]+)s, waiting for bytes ([\d.]+)s$", re.MULTILINE)
TRANSFER_EVERY_S = 2.0           # a worker prints how far a download or stream is this often
MAX_KEY_CHARS = 40               # a running model's id is shown by its last characters
LOG_TAIL_BYTES = 8192            # a worker's current layer is in the last few lines of its log

Running = Callable[[], Iterable[tuple[str, float, "Path | None"]]]   # (key, start epoch, log)
Waiting = Callable[[], list[str]]


class PlainCpuNotice(logging.Filter):
    """The console's one line when no GPU can be used, in a researcher's words instead of
    gputracker's (`NVML could not be initialised: …; CPU mode: jobs run with
    CUDA_VISIBLE_DEVICES=''`); the log file keeps gputracker's own line."""

    NVML_LINE = re.compile(r"^gputracker: (?P<why>.+); CPU mode: jobs run with CUDA_VISIBLE_DEVICES=''$")

    def __init__(self, cpu_fallback: bool = True):
        """`cpu_fallback=False`: GPUs were named (`--gpus 0 1`), so no usable GPU is an error the
        run says itself; the console then gets no "running on CPU" line before it."""
        super().__init__()
        self.cpu_fallback = cpu_fallback

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.NVML_LINE.match(record.getMessage())
        if found and not self.cpu_fallback:
            return False
        if found:
            record.msg, record.args = (
                "no GPU can be used (%s): running on CPU; --cpu_workers N runs N models at once, "
                "--gpus none skips the GPU check", (found.group("why"),))
        return True


def _log_tail(log_path) -> bytes | None:
    if log_path is None:
        return None
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            return handle.read()
    except OSError:
        return None


def last_layer(log_path) -> tuple[int, int | None] | None:
    """(i, n) of the last `layer i/n` line of a worker log, n None for `layer i`; None if none yet."""
    tail = _log_tail(log_path)
    found = list(LAYER_LINE.finditer(tail)) if tail is not None else []
    if not found:
        return None
    done, total = found[-1].groups()
    return int(done), int(total) if total else None


def current_layer(log_path) -> str | None:
    """`layer 12/30` (or `layer 12`) from the last layer line of a worker log; None if none yet."""
    layer = last_layer(log_path)
    return None if layer is None else _layer_text(*layer)


def _layer_text(done: int, total: int | None) -> str:
    return f"layer {done}/{total}" if total else f"layer {done}"


def model_fraction(log_path) -> float | None:
    """How much of a running model is done, by its layers (`layer 12/30`: 0.4); None while its
    worker has not said how many layers the model has."""
    layer = last_layer(log_path)
    if layer is None or not layer[1]:
        return None
    return min(1.0, layer[0] / layer[1])


def download_rate(log_path) -> float | None:
    """MB/s of a log's last transfer line if it is a download (`downloaded org/m: … at R MB/s`);
    None otherwise (the download stage sums these over its fetches)."""
    tail = _log_tail(log_path)
    found = list(TRANSFER_LINE.finditer(tail)) if tail else []
    return float(found[-1].group(4)) if found and found[-1].group(1) == b"downloaded" else None


def current_activity(log_path) -> str | None:
    """What a worker log says last: `layer 12/30`, or `downloaded 120.0 of 500.0 MB at 40.1
    MB/s` while a model downloads or streams; None if neither yet."""
    tail = _log_tail(log_path)
    if tail is None:
        return None
    transfer = list(TRANSFER_LINE.finditer(tail))
    layer = list(LAYER_LINE.finditer(tail))
    if transfer and (not layer or transfer[-1].start() > layer[-1].start()):
        verb, done, total, rate = (g.decode() for g in transfer[-1].groups())
        return f"{verb} {done} of {total} MB at {rate} MB/s"
    if not layer:
        return None
    done, total = layer[-1].groups()       # the tail already read: not read again
    return _layer_text(int(done), int(total) if total else None)


class TransferLines:
    """The worker's lines while a model downloads or streams (read by `current_activity`):
    `  downloaded org/m: 120.0 of 500.0 MB at 40.1 MB/s`, at most every `TRANSFER_EVERY_S`
    and once when a transfer completes. Called from download threads: thread-safe."""

    def __init__(self, write=print, every_s: float = TRANSFER_EVERY_S):
        self._write, self._every_s = write, every_s
        self._lock = threading.Lock()
        self._started: dict[tuple[str, str], float] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._finished: set[tuple[str, str, int]] = set()

    def __call__(self, verb: str, repo_id: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        key = (verb, repo_id)
        with self._lock:
            started = self._started.setdefault(key, now)
            finished = total is not None and done >= total
            if finished and (verb, repo_id, total) in self._finished:
                return                          # said once per transfer
            if finished:
                self._finished.add((verb, repo_id, total))
            elif now - self._last.get(key, 0.0) < self._every_s:
                return
            self._last[key] = now
        rate = done / max(now - started, 1e-3) / 1e6
        of = f"{(total if total is not None else done) / 1e6:.1f}"
        self._write(f"  {verb} {repo_id}: {done / 1e6:.1f} of {of} MB at {rate:.1f} MB/s")


def slot_line(held_s: float, waited_s: float) -> str:
    """The worker's last line (`SLOT_LINE`): its slot time and the part spent waiting for bytes."""
    return f"slot: {held_s:.2f}s, waiting for bytes {min(waited_s, held_s):.2f}s"


def slot_times(log_path) -> tuple[float, float] | None:
    """(slot seconds, waiting seconds) of the last `SLOT_LINE` of a worker log; None if none."""
    tail = _log_tail(log_path)
    found = list(SLOT_LINE.finditer(tail)) if tail is not None else []
    return (float(found[-1].group(1)), float(found[-1].group(2))) if found else None


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RunProgress:
    """The run's progress display; `update(ok)` when a model ends, `close()` at the end."""

    def __init__(self, total: int, *, done_before: int = 0, log: logging.Logger | None = None,
                 stream=None, tty: bool | None = None, tick_s: float = 1.0,
                 status_every_s: float = 60.0):
        self.total, self.done_before = total + done_before, done_before
        self.finished = self.failed = 0
        self.log = log or logging.getLogger("esd_experiment")
        self.stream = stream or sys.stderr
        self.tick_s, self.status_every_s = tick_s, status_every_s
        self.started = self.last_status = self.last_line = time.monotonic()
        self._running: Running = lambda: ()
        self._waiting: Waiting = lambda: []
        self._stages = None          # the download stage's `stages()`, when the run has one
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bar = self.status = None
        tty = self.stream.isatty() if tty is None else tty
        if total and tty:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=done_before, unit="model", desc="models",
                            file=self.stream, dynamic_ncols=True, position=0)
            self.bar.set_postfix(failed=0)
            self.status = tqdm(total=0, bar_format="{desc}", file=self.stream, position=1, leave=False)

    # ------------------------------------------------------------ what the run tells us
    def follow(self, running: Running | None = None, waiting: Waiting | None = None,
               stages=None) -> "RunProgress":
        """Start redrawing every `tick_s`, asking `running()` and `waiting()` each time (and
        `stages()`, the download stage's `Stages`, when the run downloads ahead of its slots)."""
        self._running = running or self._running
        self._waiting = waiting or self._waiting
        self._stages = stages or self._stages
        if self.total and self._thread is None:
            self._thread = threading.Thread(target=self._tick_until_closed, daemon=True,
                                            name="esd-progress")
            self._thread.start()
        return self

    def update(self, ok: bool) -> None:
        with self._lock:
            self.finished += 1
            self.failed += not ok
            if self.bar is not None:
                self.bar.set_postfix(failed=self.failed, refresh=False)
                self.bar.update(1)
                return
            now = time.monotonic()
            step = max(1, (self.total - self.done_before) // 10)
            last = self.finished == self.total - self.done_before
            if last or self.finished % step == 0 or now - self.last_line > 60:
                self.last_line = now
                self.log.info("progress: %s", self.counts_text(now))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.status is not None:   # the activity line goes; the bar stays as the record
                self.status.set_description_str("", refresh=False)
                self.status.close()
            if self.bar is not None:
                self.bar.refresh()
                self.bar.close()
            self.bar = self.status = None

    # ------------------------------------------------------------------ what we show
    def counts_text(self, now: float | None = None) -> str:
        """`2/4 models finished (0 failed), 1m10s elapsed, ETA 1m10s`."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        done = self.done_before + self.finished
        text = f"{done}/{self.total} models finished ({self.failed} failed), {format_duration(elapsed)} elapsed"
        remaining = self.total - done
        # work done in this run, in models: the finished ones and the layers of the running ones
        # (a model at `layer 12/30` is 0.4 done), so the ETA moves while a large model runs
        worked = self.finished + self._running_fraction()
        if remaining and worked > 0:
            text += f", ETA {format_duration(elapsed / worked * (remaining - (worked - self.finished)))}"
        elif remaining:
            text += ", ETA after the first model ends"
        return text

    def _running_fraction(self) -> float:
        try:
            return sum(model_fraction(log_path) or 0.0 for _, _, log_path in self._running())
        except Exception:  # noqa: BLE001 - a display must never stop the run
            return 0.0

    def activity_text(self) -> str:
        """`running: a (layer 12), b | waiting: GPU 0: 30000 MB used > 500 MB threshold`."""
        parts = []
        try:
            running = sorted(self._running(), key=lambda item: item[1])
            waiting = list(self._waiting())
            stages = self._stages() if self._stages is not None else None
        except Exception:  # noqa: BLE001 - a display must never stop the run
            return ""
        for key, _, _ in running:   # the backend names our own jobs in full: shorten them too
            waiting = [w.replace(str(key), _clip_left(str(key), MAX_KEY_CHARS)) for w in waiting]
        if running:
            now = time.time()
            shown = []
            for key, started, log_path in running:
                layer = current_activity(log_path)
                detail = ", ".join(x for x in (layer, format_duration(now - started)) if x)
                shown.append(f"{_clip_left(str(key), MAX_KEY_CHARS)} ({detail})")
            parts.append((f"{stages.text()}: " if stages is not None else "running: ") + ", ".join(shown))
        elif stages is not None:
            parts.append(stages.text())
        if waiting:
            parts.append("waiting: " + "; ".join(waiting))
        return " | ".join(parts)

    def _tick_until_closed(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - a display must never stop the run
                self.log.debug("progress display failed", exc_info=True)

    def _tick(self) -> None:
        activity = self.activity_text()
        with self._lock:
            if self.bar is not None:
                width = _terminal_columns(self.stream) - 1
                self.status.set_description_str(_clip(activity, width), refresh=False)
                self.bar.refresh()
                self.status.refresh()
                return
            now = time.monotonic()
            if now - self.last_status >= self.status_every_s:
                self.last_status = now
                self.log.info("status: %s%s", self.counts_text(now), f"; {activity}" if activity else "")


def _terminal_columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return shutil.get_terminal_size((120, 20)).columns


def _clip_left(text: str, width: int) -> str:
    """The end of a long id, where paths and hub names differ: `…/run1/checkpoint_200`."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"
