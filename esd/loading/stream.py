"""Disk-free streaming of safetensors weights from the Hub by HTTP range requests.

Owns: `RemoteFile` (one file of a pinned commit: one resolve (HEAD) gives the redirect
target, then byte ranges are read from it, every answer checked: 206, the exact
`Content-Range`, the exact length) and `StreamedSafetensors` (a tensor source like the
local checkpoint's: `keys`, `shapes`, `floating`, `tensor(key)`, `close`; its header is read
by a range request, adjacent tensors are merged into chunks, and a bounded number of chunks
is prefetched on threads while the caller computes).

Must not: write weights to disk, compute metrics, or decide which tensors are layers.

Retries (backoff doubling from `ESD_HUB_BACKOFF_S`, default 1 s, `ESD_HUB_RETRIES` tries,
default 5): 429 (waiting `Retry-After`), 5xx, cut connections and wrong range answers.
401/403/410 from the CDN mean an expired signed URL: a new HEAD refreshes it (not counted
as a try; at most `MAX_REFRESHES` per read). When the
retries are spent the failure is typed: `rate_limited`, `hub_unavailable`,
`download_interrupted` (all retryable by the orchestrator) or `bad_range_response`.
Memory: the chunks read ahead stay under `PREFETCH_BYTES` (at least one is read ahead; a
tensor larger than a chunk is one chunk of its own), plus the chunk in use and the float32
tensor handed out.
"""
from __future__ import annotations

import io
import struct
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from esd.failures import ESDFailure
from esd.loading.hub import hub_backoff_s, hub_retries
from esd.loading.checkpoint import (MAX_HEADER_BYTES, SafetensorEntry, TensorSource,
                                     float32_tensor, parse_safetensors_header)

CHUNK_BYTES = 16 * 1024 * 1024       # small chunks: the first layer waits for one only
PREFETCH_CHUNKS = 4                   # chunks read ahead on threads …
PREFETCH_BYTES = 256 * 1024 * 1024    # … while what is read ahead stays under this
FIRST_READ = 100_000              # header guess, as huggingface_hub's metadata reader
REFRESH_STATUSES = (401, 403, 410)
MAX_REFRESHES = 3                 # fresh signed URLs per read before giving up


class _WrongAnswer(Exception):
    """A range answer that is not the bytes asked for."""


@dataclass
class StreamStats:
    resolves: int = 0        # HEADs on /resolve
    range_requests: int = 0
    bytes_read: int = 0
    retries: int = 0


class RemoteFile:
    """One file of `repo_id` at a pinned `commit`, read by byte ranges."""

    def __init__(self, repo_id: str, commit: str, filename: str, *, endpoint: str | None = None,
                 token: str | None = None, stats: StreamStats | None = None, timeout: float = 30):
        from huggingface_hub import constants
        self.repo_id, self.commit, self.filename = repo_id, commit, filename
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.stats = stats or StreamStats()
        self.timeout = timeout
        self.url: str | None = None
        self.size: int | None = None
        self._lock = threading.Lock()

    @property
    def resolve_url(self) -> str:
        return (f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/"
                f"{urllib.parse.quote(self.filename)}")

    def _session(self):
        from huggingface_hub.utils import get_session
        return get_session()

    def resolve(self) -> None:
        """HEAD the resolve URL (with the token): the redirect target and the size."""
        from huggingface_hub.utils import build_hf_headers
        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"
        response = self._with_retries(lambda: self._session().head(
            self.resolve_url, headers=headers, follow_redirects=False, timeout=self.timeout),
            what=f"resolve {self.filename}", resolving=True)
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
        self.size = int(size) if size is not None else None

    def read(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the file."""
        if length <= 0:
            return b""
        with self._lock:
            if self.url is None:
                self.resolve()
        end = start + length - 1

        def attempt():
            url = self.url
            headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
            if _same_origin(url, self.endpoint):      # the token goes to the Hub only
                from huggingface_hub.utils import build_hf_headers
                headers.update(build_hf_headers(token=self.token))
            self.stats.range_requests += 1
            response = self._session().get(url, headers=headers, timeout=self.timeout)
            if response.status_code in REFRESH_STATUSES and url != self.resolve_url:
                with self._lock:
                    if self.url == url:
                        self.resolve()           # an expired signed URL: a fresh one
                raise _Refreshed()
            if response.status_code in (429,) or response.status_code >= 500:
                return response
            if response.status_code != 206:
                raise _WrongAnswer(f"status {response.status_code} to a range request")
            want = f"bytes {start}-{end}/"
            got = response.headers.get("content-range", "")
            if not got.startswith(want) or (self.size is not None
                                            and got != f"{want}{self.size}"):
                raise _WrongAnswer(f"Content-Range {got!r} for bytes={start}-{end}")
            if len(response.content) != length:
                raise _WrongAnswer(f"{len(response.content)} bytes for a range of {length}")
            return response

        response = self._with_retries(attempt, what=f"{self.filename} bytes {start}-{end}")
        self.stats.bytes_read += length
        return response.content

    def _with_retries(self, call, what: str, resolving: bool = False):
        """`call()` until it answers; 429/5xx/transport errors/wrong answers retried."""
        import httpx2
        name = f"{self.repo_id}@{self.commit[:12]}"
        last = ""
        reason = "download_interrupted"
        delay = hub_backoff_s()
        tries = hub_retries()
        refreshes = 0
        attempt = 0
        while attempt < tries:
            wait = delay
            try:
                response = call()
            except _Refreshed:
                # a fresh signed URL does not spend a try, but a CDN that refuses every
                # fresh URL is not retried for ever
                last, reason = "the CDN refused fresh signed URLs", "hub_unavailable"
                refreshes += 1
                self.stats.retries += 1
                if refreshes <= MAX_REFRESHES:
                    continue
                break
            except _WrongAnswer as exc:
                last, reason = str(exc), "bad_range_response"
            except httpx2.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                reason = "network_error" if isinstance(exc, (httpx2.ConnectError,
                                                             httpx2.TimeoutException)) \
                    else "download_interrupted"
            else:
                status = response.status_code
                if status == 429:
                    last, reason = "429 Too Many Requests", "rate_limited"
                    retry_after = response.headers.get("retry-after", "")
                    if retry_after.isdigit():
                        wait = max(wait, float(retry_after))
                elif status >= 500:
                    last, reason = f"status {status}", "hub_unavailable"
                elif resolving and status >= 400:
                    raise _resolve_failure(response, name, self.filename)
                else:
                    return response
            self.stats.retries += 1
            attempt += 1
            if attempt < tries:
                time.sleep(wait)
                delay *= 2
        retryable = reason != "bad_range_response"
        hint = " (HF_HUB_OFFLINE=1 uses the local cache only)" if reason == "network_error" else ""
        raise ESDFailure("load", reason, f"{name}: {what}: {last} after {tries} tries{hint}",
                         retryable=retryable)


class _Refreshed(Exception):
    pass


def _same_origin(url: str, endpoint: str) -> bool:
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(endpoint)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _resolve_failure(response, name: str, filename: str) -> ESDFailure:
    code = response.headers.get("x-error-code", "")
    status = response.status_code
    if code == "GatedRepo":
        return ESDFailure("resolve", "gated", f"{name} is gated: request access on the hub and "
                          "set HF_TOKEN")
    if code == "RepoNotFound":
        return ESDFailure("resolve", "repo_not_found", f"{name}: no such repository")
    if code in ("EntryNotFound", "RevisionNotFound"):
        return ESDFailure("resolve", "corrupt_file", f"{name}: {filename} is not in the repo")
    return ESDFailure("resolve", "unauthorized" if status in (401, 403) else "network_error",
                      f"{name}: resolve {filename}: status {status}")


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
                 chunk_bytes: int = CHUNK_BYTES, prefetch: int = PREFETCH_CHUNKS):
        self.files = files
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
        if self.prefetch and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.prefetch,
                                            thread_name_prefix="esd-stream")

    def _fetch(self, index: int) -> bytes:
        file, begin, end, _ = self._chunks[index]
        return self.files[file].read(begin, end - begin)

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
            if ahead_bytes and ahead_bytes + (end - begin) > PREFETCH_BYTES:
                break                                   # bounded memory read ahead
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
            return _to_float32(data, e)
        data = self._chunk(index).result()
        begin = self._chunks[index][1]
        tensor = _to_float32(data[e.begin - begin:e.end - begin], e)
        left = self._left.get(index)
        if left is not None:
            left.discard(key)
            if not left:                                # chunk used up: free it
                self._pending.pop(index, None)
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
    data_bytes = size - 8 - n if size is not None else sys.maxsize
    return parse_safetensors_header(raw, data_bytes, remote.filename)


def _to_float32(data: bytes, e: _Entry) -> torch.Tensor:
    return float32_tensor(e.stored, io.BytesIO(data).readinto)
