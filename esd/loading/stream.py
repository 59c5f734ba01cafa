"""Disk-free streaming of safetensors weights from the Hub by HTTP range requests.

Owns: `RemoteFile` (one file of a pinned commit: one resolve (HEAD) gives the redirect
target, then byte ranges are read from it, every answer checked: 206, the exact
`Content-Range`, the exact length) and `StreamedSafetensors` (a tensor source like the
local checkpoint's: `keys`, `shapes`, `floating`, `tensor(key)`, `close`; its header is read
by a range request, tensors near one another in the file are merged into chunks, and a
bounded window of bytes is read ahead on threads while the caller computes).

Must not: write weights to disk, compute metrics, or decide which tensors are layers.

Requests go through `hub_http.hub_request` (a timeout; huggingface_hub's `http_backoff`
retries 429 with `Retry-After`, 5xx and failed connections, `ESD_HUB_RETRIES` tries from
`ESD_HUB_BACKOFF_S`). What that backoff cannot judge is retried here with the same
bounds: a wrong range answer (refused on its status and headers, before its body is read:
a CDN ignoring `Range` cannot make us read a whole file) and a body cut short. 401/403/410
from the CDN mean an expired signed URL: a new HEAD refreshes it (not counted as a try; at
most `MAX_REFRESHES` per read, then `expired_url`). Failures are typed by
`hub_http.hub_failure`, or `bad_range_response` / `download_interrupted` here.
Memory: a range's body is read into one buffer of its exact size and tensors are converted
from views of it. Chunks are read ahead, in plan order, on `READERS` threads from the moment
the plan is known; the chunks read or being read and not yet used up stay under
`PREFETCH_BYTES` (a chunk is at most `CHUNK_BYTES` unless one tensor is larger; a tensor
larger than the whole window is read ahead alone, as it would be read when asked for), plus
the float32 tensor handed out. The caller's time blocked on bytes is logged when the source
is closed.
"""
from __future__ import annotations

import bisect
import struct
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from esd.failures import ESDFailure
from esd.loading.checkpoint import (MAX_HEADER_BYTES, SafetensorEntry, TensorSource,
                                     float32_tensor, parse_safetensors_header)
from esd.loading.hub_http import (REFRESH_STATUSES, hub_backoff_s, hub_failure, hub_request,
                                  hub_retries, same_origin)
from esd.loading.hub_http import endpoint as hub_endpoint
from esd.loading.log import logger

CHUNK_BYTES = 16 * 1024 * 1024       # small chunks: the first layer waits for one only
READERS = 2                           # range requests in flight at once, in plan order …
PREFETCH_BYTES = 256 * 1024 * 1024    # … while what is read ahead stays under this
MAX_GAP_SHARE = 0.125                 # of a chunk: bytes of tensors no one asked for
MAX_RUN_TRIES = 256                   # tensors tried past a chunk's last fitting one
FIRST_READ = 100_000              # header guess, as huggingface_hub's metadata reader
MAX_REFRESHES = 3                 # fresh signed URLs per read before giving up


class _WrongAnswer(Exception):
    """A range answer that is not the bytes asked for (refused before its body is read)."""


class _CutShort(Exception):
    """The connection broke while the body was read."""


class _Refreshed(Exception):
    """The CDN refused an expired signed URL; a fresh one was asked for."""


@dataclass
class StreamStats:
    resolves: int = 0        # HEADs on /resolve
    range_requests: int = 0
    bytes_read: int = 0
    retries: int = 0


class RemoteFile:
    """One file of `repo_id` at a pinned `commit`, read by byte ranges."""

    def __init__(self, repo_id: str, commit: str, filename: str, *, endpoint: str | None = None,
                 token: str | None = None, stats: StreamStats | None = None):
        self.repo_id, self.commit, self.filename = repo_id, commit, filename
        self.endpoint = (endpoint or hub_endpoint()).rstrip("/")
        self.token = token
        self.stats = stats or StreamStats()
        self.url: str | None = None
        self.size: int | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}"

    @property
    def resolve_url(self) -> str:
        return (f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/"
                f"{urllib.parse.quote(self.filename)}")

    def resolve(self) -> None:
        """HEAD the resolve URL (with the token): the redirect target and the size."""
        from huggingface_hub.utils import hf_raise_for_status
        try:
            response = hub_request("HEAD", self.resolve_url, token=self.token,
                                   follow_redirects=False, hub=self.endpoint)
            hf_raise_for_status(response)
        except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
            raise hub_failure(exc, self.repo_id, self.commit[:12], what=f"resolve "
                              f"{self.filename}", hub=self.endpoint) from None
        self.stats.resolves += 1
        if response.status_code in (301, 302, 303, 307, 308):
            self.url = urllib.parse.urljoin(self.resolve_url, response.headers["location"])
            size = response.headers.get("x-linked-size") or response.headers.get("content-length")
        else:
            self.url = self.resolve_url
            size = response.headers.get("content-length")
        commit = response.headers.get("x-repo-commit")
        if commit and commit != self.commit:
            raise ESDFailure("load", "revision_changed", f"{self.repo_id}/{self.filename}: "
                             f"resolved to commit {commit}, expected {self.commit}")
        self.size = int(size) if size is not None and str(size).isdigit() else None

    def read(self, start: int, length: int) -> bytearray:
        """Bytes [start, start + length) of the file. 429, 5xx and failed connections are
        retried by huggingface_hub's backoff; a wrong answer (not 206, another range, another
        length) is refused before its body is read and asked again, a cut body is asked
        again, an expired signed URL is replaced by a fresh one (at most `MAX_REFRESHES`)."""
        if length <= 0:
            return bytearray()
        with self._lock:
            if self.url is None:
                self.resolve()
        what = f"{self.filename} bytes {start}-{start + length - 1}"
        tries, refreshes, wait, last = hub_retries(), 0, hub_backoff_s(), ""
        attempt = 0
        while attempt < tries:
            try:
                data = self._read_once(start, length)
            except _Refreshed:
                refreshes += 1
                self.stats.retries += 1
                if refreshes > MAX_REFRESHES:
                    raise ESDFailure("load", "expired_url", f"{self.name}: {what}: the CDN "
                                     f"refused {refreshes} fresh signed URLs")
                continue                   # a fresh URL does not spend a try
            except (_WrongAnswer, _CutShort) as exc:
                last, reason = str(exc), "bad_range_response" \
                    if isinstance(exc, _WrongAnswer) else "download_interrupted"
            except ESDFailure:
                raise
            except Exception as exc:  # noqa: BLE001 - every hub error becomes a typed failure
                raise hub_failure(exc, self.repo_id, self.commit[:12], stage="load",
                                  what=what, hub=self.endpoint) from None
            else:
                self.stats.bytes_read += length
                return data
            self.stats.retries += 1
            attempt += 1
            if attempt < tries:
                time.sleep(wait)
                wait *= 2
        raise ESDFailure("load", reason, f"{self.name}: {what}: {last} after {tries} tries",
                         retryable=reason != "bad_range_response")

    def _read_once(self, start: int, length: int) -> bytearray:
        """One range request, checked: 206, the exact `Content-Range` and length. The body
        is read only after the headers are right, into one buffer of `length` bytes."""
        import httpx2
        from huggingface_hub.utils import hf_raise_for_status
        url, end = self.url, start + length - 1
        self.stats.range_requests += 1
        with hub_request("GET", url, token=self.token, stream=True, hub=self.endpoint,
                         headers={"Range": f"bytes={start}-{end}"}) as response:
            status = response.status_code
            if status in REFRESH_STATUSES and not same_origin(url, self.endpoint):
                with self._lock:
                    if self.url == url:
                        self.resolve()           # an expired signed URL: a fresh one
                raise _Refreshed()
            if status >= 400:
                hf_raise_for_status(response)
            if status != 206:
                raise _WrongAnswer(f"status {status} to a range request")
            want = f"bytes {start}-{end}/"
            got = response.headers.get("content-range", "")
            if not got.startswith(want) or (self.size is not None
                                            and got != f"{want}{self.size}"):
                raise _WrongAnswer(f"Content-Range {got!r} for bytes={start}-{end}")
            announced = response.headers.get("content-length")
            if announced is not None and announced != str(length):
                raise _WrongAnswer(f"{announced} bytes announced for a range of {length}")
            try:
                return _read_exactly(response, length)
            except httpx2.TransportError as exc:   # not retried inside the stream's context
                raise _CutShort(f"{type(exc).__name__}: {exc}") from None


def _read_exactly(response, length: int) -> bytearray:
    """The body, into one buffer of `length` bytes: more is a wrong answer, not data."""
    buffer = bytearray(length)
    view, done = memoryview(buffer), 0
    for piece in response.iter_raw():
        if done + len(piece) > length:
            raise _WrongAnswer(f"more than the {length} bytes of the range")
        view[done:done + len(piece)] = piece
        done += len(piece)
    if done != length:
        raise _WrongAnswer(f"{done} bytes for a range of {length}")
    return buffer


# ---------------------------------------------------------------- the tensor source

@dataclass
class _Entry:
    file: int            # index into files
    raw_key: str
    stored: SafetensorEntry   # dtype, shape, offsets in the data section
    begin: int           # absolute byte offsets in the file
    end: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored.shape


class StreamedSafetensors(TensorSource):
    """The tensors of remote safetensors files, with the local checkpoint's interface.

    `normalise` maps a raw key to the name the loader uses (the local checkpoint strips
    DDP/compile prefixes). Call `plan(keys)` with the order the tensors will be asked for to
    get chunked reads with read-ahead; without it each tensor is one range request.

    Read-ahead: from `plan` on, `readers` threads read the planned chunks in order while the
    bytes of chunks read (or being read) and not yet used up stay under `window_bytes`; each
    chunk used up makes room for the next. So the link stays busy while the caller computes,
    and memory is bounded by the window whatever the model's size."""

    def __init__(self, files: list[RemoteFile], *, normalise=lambda k: k,
                 chunk_bytes: int = CHUNK_BYTES, readers: int = READERS,
                 window_bytes: int = PREFETCH_BYTES,
                 report: Callable[[int, int], None] | None = None,
                 waited: Callable[[float], None] | None = None):
        self.files = files
        self.report = report               # (bytes of the plan read so far, bytes planned)
        self.waited = waited               # told at close how long the caller blocked on bytes
        self._planned_bytes = self._done_bytes = 0
        self._report_lock = threading.Lock()
        self.chunk_bytes, self.readers = chunk_bytes, max(0, readers)
        self.window_bytes = window_bytes
        self.entries: dict[str, _Entry] = {}
        for index, remote in enumerate(files):
            header = _read_header(remote)
            for raw, entry in header.tensors.items():
                self.entries[normalise(raw)] = _Entry(index, raw, entry, header.data_start + entry.begin,
                                                      header.data_start + entry.end)
        self.shapes = {k: e.shape for k, e in self.entries.items()}
        self.floating = {k: e.stored.floating for k, e in self.entries.items()}
        self.key_file = {k: files[e.file].filename for k, e in self.entries.items()}
        self._chunks: list[_Chunk] = []
        self._chunk_of: dict[str, int] = {}
        self._pending: dict[int, Future] = {}    # chunks read ahead, not used up
        self._left: dict[int, set[str]] = {}
        self._lock = threading.Lock()            # _pending, _next, ahead_bytes
        self._next = 0                           # the next chunk to read ahead
        self.ahead_bytes = 0                     # bytes of the chunks in _pending
        self.peak_ahead_bytes = 0
        self.wait_s = 0.0                        # the caller's time blocked on bytes
        self._planned_at: float | None = None
        self._pool: ThreadPoolExecutor | None = None

    def keys(self):
        return self.entries.keys()

    def plan(self, keys_in_order) -> None:
        """Group the tensors to be read, in this order, into chunks (`plan_chunks`) and start
        reading ahead."""
        self._cancel_pending()
        keys = [k for k in dict.fromkeys(keys_in_order) if k in self.entries]
        self._chunks = plan_chunks([self.entries[k] for k in keys], keys, self.chunk_bytes)
        self._chunk_of = {key: i for i, chunk in enumerate(self._chunks) for key in chunk.keys}
        self._left = {i: set(chunk.keys) for i, chunk in enumerate(self._chunks)}
        self._planned_bytes = sum(chunk.size for chunk in self._chunks)
        self._done_bytes, self._next = 0, 0
        self._planned_at = time.perf_counter()
        if self.readers and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.readers,
                                            thread_name_prefix="esd-stream")
        self._read_ahead()

    def _read_ahead(self) -> None:
        """Start reading the next chunks in plan order while the window has room. A chunk
        larger than the whole window is read ahead alone, once nothing else is (it would be
        read whole when asked for anyway), and the chunks after it wait until it is used up."""
        if self._pool is None:
            return
        with self._lock:
            while self._next < len(self._chunks):
                size = self._chunks[self._next].size
                if self.ahead_bytes + size > self.window_bytes and self.ahead_bytes > 0:
                    break
                self._pending[self._next] = self._pool.submit(self._fetch, self._next)
                self.ahead_bytes += size
                self.peak_ahead_bytes = max(self.peak_ahead_bytes, self.ahead_bytes)
                self._next += 1

    def _fetch(self, index: int) -> bytearray:
        chunk = self._chunks[index]
        data = self.files[chunk.file].read(chunk.begin, chunk.size)
        with self._report_lock:
            self._done_bytes += chunk.size
            done = self._done_bytes
        if self.report is not None:
            self.report(done, self._planned_bytes)
        return data

    def _chunk_bytes(self, index: int) -> bytearray:
        """The bytes of chunk `index`: read ahead, else read now (in the caller's thread)."""
        with self._lock:
            future = self._pending.get(index)
            if future is None:
                self._next = max(self._next, index + 1)     # the read-ahead goes on after it
        if future is None:
            return self._fetch(index)
        return future.result()

    def _give_up(self, index: int) -> None:
        """Chunk `index` is used up (or skipped): its room in the window goes to the next."""
        with self._lock:
            future = self._pending.pop(index, None)
            if future is not None:
                future.cancel()
                self.ahead_bytes -= self._chunks[index].size
        self._read_ahead()

    def tensor(self, key: str) -> torch.Tensor:
        """A float32 CPU copy of one tensor, owned by the caller."""
        e = self.entries[key]
        index = self._chunk_of.get(key)
        started = time.perf_counter()
        if index is None:                               # not planned: read it alone
            data = self.files[e.file].read(e.begin, e.end - e.begin)
            self.wait_s += time.perf_counter() - started
            return _to_float32(memoryview(data), e)
        for old in [i for i in list(self._pending) if i < index]:
            self._give_up(old)                          # skipped by the caller
        data = self._chunk_bytes(index)
        self.wait_s += time.perf_counter() - started
        chunk = self._chunks[index]
        left = self._left[index]
        left.discard(key)
        if not left:                                    # chunk used up: free it
            self._give_up(index)
        elif index not in self._pending:                # read now, not ahead: keep it
            future = Future()
            future.set_result(data)
            with self._lock:
                self._pending[index] = future
                self.ahead_bytes += chunk.size
        if (e.stored.dtype == "F32" and (e.begin, e.end) == (chunk.begin, chunk.end)
                and not left and sys.byteorder == "little" and e.end > e.begin):
            # a float32 tensor that is its whole chunk, now no one else's: the tensor takes
            # the chunk's buffer itself, so it is never in memory twice (as on the cached path)
            return torch.frombuffer(data, dtype=torch.float32).view(e.shape)
        return _to_float32(memoryview(data)[e.begin - chunk.begin:e.end - chunk.begin], e)

    def read_summary(self) -> str:
        """What the plan read and how long the caller waited for bytes, for the log."""
        span = time.perf_counter() - self._planned_at if self._planned_at is not None else 0.0
        share = self.wait_s / span if span > 0 else 0.0
        return (f"{self._done_bytes / 1e6:.1f} MB in {len(self._chunks)} chunks, read-ahead "
                f"peak {self.peak_ahead_bytes / 1e6:.1f} MB; waited {self.wait_s:.1f}s of "
                f"{span:.1f}s for bytes ({share:.0%})")

    def _cancel_pending(self) -> None:
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            self.ahead_bytes = 0

    def close(self) -> None:
        if self._planned_at is not None and self.files:
            logger.info("range reads of %s: %s", self.files[0].name, self.read_summary())
            if self.waited is not None:
                self.waited(self.wait_s)
        self._cancel_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@dataclass(frozen=True)
class _Chunk:
    file: int
    begin: int           # absolute byte offsets in the file
    end: int
    keys: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.end - self.begin


def plan_chunks(entries: list[_Entry], keys: list[str], chunk_bytes: int) -> list[_Chunk]:
    """The planned tensors (`entries`, named `keys`, in the order they will be asked for)
    grouped into chunks, each one byte range of one file read by one request. A chunk is a
    run of tensors consecutive in the order asked, the longest from its first whose span in
    the file stays within `chunk_bytes`, holds no planned tensor of another chunk (no byte is
    read twice) and at most `MAX_GAP_SHARE` of bytes no one asked for (a layer's norms). A
    model's layers are asked for in model order (q, k, v, o, …) but stored by name (k, o, q,
    v, …): a layer's tensors are near one another in the file, not adjacent in the order."""
    planned: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for file in {e.file for e in entries}:
        spans = sorted((e.begin, e.end) for e in entries if e.file == file and e.end > e.begin)
        sums = [0]
        for begin, end in spans:
            sums.append(sums[-1] + end - begin)
        planned[file] = ([b for b, _ in spans], [e for _, e in spans], sums)

    def planned_bytes_in(file: int, begin: int, end: int) -> int:
        begins, ends, sums = planned[file]
        first, last = bisect.bisect_right(ends, begin), bisect.bisect_left(begins, end)
        return sums[last] - sums[first] if last > first else 0

    chunks: list[_Chunk] = []
    first = 0
    while first < len(entries):
        e = entries[first]
        file, begin, end, own = e.file, e.begin, e.end, e.end - e.begin
        best = (first + 1, begin, end)                # one tensor alone is always a chunk
        for last in range(first + 1, len(entries)):
            n = entries[last]
            begin, end = min(begin, n.begin), max(end, n.end)
            own += n.end - n.begin
            if n.file != file or end - begin > chunk_bytes:
                break
            if (planned_bytes_in(file, begin, end) == own
                    and end - begin - own <= MAX_GAP_SHARE * (end - begin)):
                best = (last + 1, begin, end)
            elif last - best[0] >= MAX_RUN_TRIES:
                break                                 # many small tensors: stop looking
        stop, begin, end = best
        chunks.append(_Chunk(file, begin, end, tuple(keys[first:stop])))
        first = stop
    return chunks


def _read_header(remote: RemoteFile):
    """The file's checked header (`checkpoint.parse_safetensors_header`), read by range."""
    if remote.url is None:
        remote.resolve()
    size = remote.size
    first = remote.read(0, min(FIRST_READ, size) if size else FIRST_READ)
    if len(first) < 8:
        raise ESDFailure("load", "corrupt_file", f"{remote.filename}: shorter than a "
                         "safetensors header")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_BYTES or (size is not None and 8 + n > size):
        raise ESDFailure("load", "corrupt_file", f"{remote.filename}: safetensors header of "
                         f"{n} bytes is not plausible")
    raw = first[8:8 + n] if 8 + n <= len(first) else \
        first[8:] + remote.read(len(first), 8 + n - len(first))
    data_bytes = size - 8 - n if size is not None else None
    return parse_safetensors_header(raw, data_bytes, remote.filename)


def _to_float32(data, e: _Entry) -> torch.Tensor:
    """The float32 tensor of `e` from its bytes (a memoryview: no copy of them)."""
    done = 0

    def read_into(buffer) -> int:
        nonlocal done
        count = min(len(buffer), len(data) - done)
        buffer[:count] = data[done:done + count]
        done += count
        return count
    return float32_tensor(e.stored, read_into)
