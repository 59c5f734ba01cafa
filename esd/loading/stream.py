"""Disk-free streaming of safetensors weights from the Hub by HTTP range requests.

Owns: `RemoteFile` (one file of a pinned commit: one resolve (HEAD) gives the redirect
target, then byte ranges are read from it, every answer checked: 206, the exact
`Content-Range`, the exact length) and `StreamedSafetensors` (a tensor source like the
local checkpoint's: `keys`, `shapes`, `floating`, `tensor(key)`, `close`; its header is read
by a range request, adjacent tensors are merged into chunks, and a bounded number of chunks
is prefetched on threads while the caller computes).

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
from views of it; the chunks read ahead stay under `PREFETCH_BYTES` (a tensor larger than a
chunk is one chunk of its own; one larger than the whole window is not read ahead), plus the
chunk in use and the float32 tensor handed out.
"""
from __future__ import annotations

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

CHUNK_BYTES = 16 * 1024 * 1024       # small chunks: the first layer waits for one only
PREFETCH_CHUNKS = 4                   # chunks read ahead on threads …
PREFETCH_BYTES = 256 * 1024 * 1024    # … while what is read ahead stays under this
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
    get chunked reads with prefetch; without it each tensor is one range request."""

    def __init__(self, files: list[RemoteFile], *, normalise=lambda k: k,
                 chunk_bytes: int = CHUNK_BYTES, prefetch: int = PREFETCH_CHUNKS,
                 report: Callable[[int, int], None] | None = None):
        self.files = files
        self.report = report               # (bytes of the plan read so far, bytes planned)
        self._planned_bytes = self._done_bytes = 0
        self._report_lock = threading.Lock()
        self.chunk_bytes, self.prefetch = chunk_bytes, max(0, prefetch)
        self.entries: dict[str, _Entry] = {}
        for index, remote in enumerate(files):
            header = _read_header(remote)
            for raw, entry in header.tensors.items():
                self.entries[normalise(raw)] = _Entry(index, raw, entry, header.data_start + entry.begin,
                                                      header.data_start + entry.end)
        self.shapes = {k: e.shape for k, e in self.entries.items()}
        self.floating = {k: e.stored.floating for k, e in self.entries.items()}
        self.key_file = {k: files[e.file].filename for k, e in self.entries.items()}
        self._chunks: list[tuple[int, int, int, list[str]]] = []   # file, begin, end, keys
        self._chunk_of: dict[str, int] = {}
        self._pending: dict[int, Future] = {}
        self._left: dict[int, set[str]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def keys(self):
        return self.entries.keys()

    def plan(self, keys_in_order) -> None:
        """Group the tensors to be read, in this order, into chunks of adjacent byte ranges."""
        self._chunks, self._chunk_of = [], {}
        for key in keys_in_order:
            if key in self._chunk_of or key not in self.entries:
                continue
            e = self.entries[key]
            if self._chunks:
                file, begin, end, members = self._chunks[-1]
                if file == e.file and e.begin == end and e.end - begin <= self.chunk_bytes:
                    self._chunks[-1] = (file, begin, e.end, members + [key])
                    self._chunk_of[key] = len(self._chunks) - 1
                    continue
            self._chunks.append((e.file, e.begin, e.end, [key]))
            self._chunk_of[key] = len(self._chunks) - 1
        self._left = {i: set(c[3]) for i, c in enumerate(self._chunks)}
        self._planned_bytes = sum(end - begin for _, begin, end, _ in self._chunks)
        self._done_bytes = 0
        if self.prefetch and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.prefetch,
                                            thread_name_prefix="esd-stream")

    def _fetch(self, index: int) -> bytearray:
        file, begin, end, _ = self._chunks[index]
        data = self.files[file].read(begin, end - begin)
        if self.report is not None:
            with self._report_lock:
                self._done_bytes += end - begin
                done = self._done_bytes
            self.report(done, self._planned_bytes)
        return data

    def _chunk(self, index: int) -> Future:
        future = self._pending.get(index)
        if future is None:
            future = Future()
            try:
                future.set_result(self._fetch(index))
            except BaseException as exc:  # noqa: BLE001 - re-raised by .result()
                future.set_exception(exc)
            self._pending[index] = future
        ahead_bytes = 0
        for ahead in range(index + 1, min(len(self._chunks), index + 1 + self.prefetch)):
            _, begin, end, _ = self._chunks[ahead]
            if ahead_bytes + (end - begin) > PREFETCH_BYTES:
                break             # bounded read-ahead: a larger chunk is read when it is asked for
            ahead_bytes += end - begin
            if ahead not in self._pending and self._pool is not None:
                self._pending[ahead] = self._pool.submit(self._fetch, ahead)
        return future

    def tensor(self, key: str) -> torch.Tensor:
        """A float32 CPU copy of one tensor, owned by the caller."""
        e = self.entries[key]
        index = self._chunk_of.get(key)
        if index is None:                               # not planned: read it alone
            data = self.files[e.file].read(e.begin, e.end - e.begin)
            return _to_float32(memoryview(data), e)
        data = self._chunk(index).result()
        _, begin, end, _ = self._chunks[index]
        left = self._left.get(index)
        if left is not None:
            left.discard(key)
            if not left:                                # chunk used up: free it
                self._pending.pop(index, None)
        if (e.stored.dtype == "F32" and (e.begin, e.end) == (begin, end) and left is not None
                and not left and sys.byteorder == "little" and e.end > e.begin):
            # a float32 tensor that is its whole chunk, now no one else's: the tensor takes
            # the chunk's buffer itself, so it is never in memory twice (as on the cached path)
            tensor = torch.frombuffer(data, dtype=torch.float32).view(e.shape)
        else:
            tensor = _to_float32(memoryview(data)[e.begin - begin:e.end - begin], e)
        for old in [i for i in self._pending if i < index]:
            self._pending.pop(old).cancel()             # skipped by the caller
        return tensor

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


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
