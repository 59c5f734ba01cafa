"""A stand-in HuggingFace Hub for the tests: two real HTTP servers on 127.0.0.1 (the Hub and
its CDN) that the real huggingface_hub client talks to.

Owns: repos built by the tests (`HubServer.add_repo`), the endpoints huggingface_hub 2.4
uses (model info with `sha`, recursive tree listing with LFS sizes and no `xetHash`,
paths-info, resolve HEAD/GET with `X-Repo-Commit`/`ETag`/`X-Linked-Etag`/`X-Linked-Size`,
a 302 to the CDN for LFS files, CDN `Range` → 206 + `Content-Range`, typed errors by
`X-Error-Code`), fault knobs (`Faults`) and a log of every request with its headers.
The model listing `GET /api/models` (`HubServer.add_model`: tags such as
`base_model:adapter:<base>`, downloads, likes, dates, gated/private) answers as the Hub does:
`filter` tags (all must match), `author`, `search`, `sort` descending, `limit`, `expand` /
`full`, pages of `Listing.page_size` linked by `Link: <…>; rel="next"`.

Must not: listen on anything but 127.0.0.1, or know anything of the project's code.

Workers reach it as subprocesses: `HubServer.client_env()` gives the environment
(`HF_ENDPOINT` set before import, Xet and telemetry off, `HF_HUB_OFFLINE` unset).
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5",
                ".ckpt", ".onnx_data")
TOKEN_PREFIX = "Bearer "


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)   # sha -> files
    # sha -> path -> (git oid, sha256 of an LFS file else None): hashed once when the commit
    # is added, not on every listing or resolve (a 1 GB file takes seconds to hash)
    hashes: dict[str, dict[str, tuple[str, str | None]]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)                   # branch/tag/pr -> sha
    gated: bool = False
    tokens: set[str] = field(default_factory=set)   # tokens with access (gated repos)
    meta: dict = field(default_factory=dict)         # listing metadata (`add_model`)

    def commit_of(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        return None


@dataclass
class Faults:
    """Fault knobs; counters count down as they fire. All off by default."""
    rate_limit: int = 0              # next N Hub requests: 429 with Retry-After
    retry_after: int = 0             # seconds in Retry-After
    rate_limit_paths: str = ""       # only requests whose path contains this ("" = all)
    server_error: int = 0            # next N Hub requests: 503
    cdn_server_error: int = 0        # next N CDN requests: 503
    cut_after: int | None = None     # CDN transfers close the connection after this many body bytes
    cut_count: int = 0               # … for the next N transfers
    ignore_range: bool = False       # CDN answers 200 with the whole file to a Range request
    cdn_forbidden: int = 0           # next N CDN requests: 403 (an expired signed URL)
    bandwidth_bps: float | None = None   # CDN bytes per second, shared by all transfers
    gone_after: int | None = None    # after this many Hub requests, every connection is dropped
    # "lying sizes": the tree listing and paths-info report every file's size times this
    # factor (< 1 under-reports); resolve headers and the bytes served stay true
    listed_size_factor: float = 1.0
    # hostile answers
    silent_api: bool = False         # /api requests are accepted and never answered
    tree_link: str = ""              # tree pages carry Link rel=next: "self" (the same page) or
                                     # "foreign" (the same path on another origin: the CDN's)
    commit_sha: str | None = None    # model info and X-Repo-Commit answer this as the commit


@dataclass
class Listing:
    """Knobs of `GET /api/models`."""
    page_size: int = 3               # models per page (the Hub's is up to 1000): lists span pages
    next_url: str | None = None      # every page's `next` link points here (a loop, another host)
    queries: list = field(default_factory=list)   # the query of every listing request, parsed


@dataclass
class LoggedRequest:
    server: str          # "hub" or "cdn"
    method: str
    path: str            # unquoted path without the query
    headers: dict[str, str]
    raw_path: str = ""   # the path as sent (revisions like refs%2Fpr%2F1 still quoted)
    status: int = 0
    time: float = 0.0
    body_bytes_sent: int = 0   # of a file body: how much the client actually took
    ended: float | None = None  # when a file body was sent whole

    @property
    def token(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[len(TOKEN_PREFIX):] if auth.startswith(TOKEN_PREFIX) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HubServer:
    """The Hub on one port and its CDN on another, sharing repos, knobs and the log."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.listing = Listing()
        self.log: list[LoggedRequest] = []
        self.blobs: dict[str, bytes] = {}       # sha256 -> content (the CDN's store)
        self.hub_requests = 0
        self._lock = threading.Lock()
        self._silence = threading.Event()       # set: silent requests give up and drop
        self._bandwidth_lock = threading.Lock()
        self._bandwidth_next = 0.0
        self._servers: list[_Server] = []
        self.hub_port = self.cdn_port = 0

    # ------------------------------------------------------------ lifecycle
    def start(self, hub_port: int = 0, cdn_port: int = 0) -> "HubServer":
        for role, port in (("hub", hub_port), ("cdn", cdn_port)):
            server = _Server(("127.0.0.1", port), _make_handler(self, role))
            threading.Thread(target=server.serve_forever, name=f"hubsim-{role}",
                             daemon=True).start()
            self._servers.append(server)
        self.hub_port = self._servers[0].server_address[1]
        self.cdn_port = self._servers[1].server_address[1]
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def restart(self) -> None:
        """Up again on the same ports (after `stop`)."""
        self.start(self.hub_port, self.cdn_port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self.cdn_port}"

    def reset(self) -> None:
        with self._lock:
            self.repos.clear()
            self.blobs.clear()
            self.faults = Faults()
            self.listing = Listing()
            self.log.clear()
            self.hub_requests = 0
            self._silence.set()                 # release the requests held by silent_api
            self._silence = threading.Event()

    def client_env(self, hf_home: Path, token: str | None = None) -> dict[str, str]:
        """Environment for a subprocess using huggingface_hub against this server. The
        caller removes `HF_HUB_OFFLINE` and `TRANSFORMERS_OFFLINE` (either makes the client
        offline): `subprocess_env` does both."""
        env = {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(hf_home),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ETAG_TIMEOUT": "5",
               "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
        if token:
            env["HF_TOKEN"] = token
        return env

    def subprocess_env(self, hf_home: Path, token: str | None = None,
                       base: dict | None = None) -> dict[str, str]:
        """`base` (default os.environ) with `client_env` applied and offline switches removed."""
        import os
        env = dict(os.environ if base is None else base)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN",
                     "HUGGINGFACE_HUB_CACHE"):
            env.pop(name, None)
        env.update(self.client_env(hf_home, token))
        return env

    # ------------------------------------------------------------ repos
    def add_repo(self, repo_id: str, files: "Path | dict[str, bytes]", revision: str = "main",
                 gated: bool = False, tokens: tuple[str, ...] = ()) -> str:
        """Add a commit holding `files` (a directory, or path → bytes) under `revision`;
        returns its sha. Adding again under another revision adds another commit."""
        if isinstance(files, (str, Path)):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes()
                     for p in sorted(root.rglob("*")) if p.is_file()}
        files = dict(files)
        hashes = {path: (git_oid(data), sha256(data) if is_lfs(path) else None)
                  for path, data in files.items()}
        sha = hashlib.sha1(json.dumps({k: hashes[k][0] for k in sorted(files)})
                           .encode() + repo_id.encode() + revision.encode()).hexdigest()
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.commits[sha] = files
            repo.hashes[sha] = hashes
            repo.refs[revision] = sha
            repo.gated = repo.gated or gated
            repo.tokens.update(tokens)
            for path, data in files.items():
                if is_lfs(path):
                    self.blobs[hashes[path][1]] = data
        return sha

    def add_model(self, repo_id: str, files: "Path | dict[str, bytes] | None" = None, *,
                  tags=(), downloads: int = 0, likes: int = 0, created_at: str | None = None,
                  last_modified: str | None = None, library_name: str | None = "transformers",
                  pipeline_tag: str | None = "text-generation", gated: "bool | str" = False,
                  private: bool = False, tokens: tuple[str, ...] = ()) -> str:
        """A repo the model listing shows, with its metadata (`tree_tags` makes the
        `base_model:…` tags); `files` default to a bare config. Returns the commit sha."""
        sha = self.add_repo(repo_id, files if files is not None else {"config.json": b"{}"},
                            gated=bool(gated), tokens=tokens)
        with self._lock:
            repo = self.repos[repo_id]
            order = len(self.repos)
            created_at = created_at or f"2024-01-01T{order % 24:02d}:00:00.000Z"
            repo.meta.update(tags=list(tags), downloads=downloads, likes=likes,
                             createdAt=created_at, lastModified=last_modified or created_at,
                             library_name=library_name, pipeline_tag=pipeline_tag,
                             private=private, gated=(gated if isinstance(gated, str)
                                                     else "auto" if gated else False))
        return sha

    def move_ref(self, repo_id: str, files: "Path | dict[str, bytes]",
                 revision: str = "main") -> str:
        """"Moved main": a new commit holding `files` becomes `revision` of `repo_id` (the
        old commit stays reachable by its sha), as after a push; returns the new sha."""
        old = self.repos[repo_id].refs.get(revision) if repo_id in self.repos else None
        sha = self.add_repo(repo_id, files, revision=revision)
        if sha == old:
            raise ValueError(f"{repo_id}: the new {revision} has the same files as the old one")
        return sha

    # ------------------------------------------------------------ log queries
    def requests(self, server: str | None = None, method: str | None = None,
                 contains: str = "") -> list[LoggedRequest]:
        with self._lock:
            log = list(self.log)
        return [r for r in log if (server is None or r.server == server)
                and (method is None or r.method == method) and contains in r.path]

    def fetched_files(self, repo_id: str) -> set[str]:
        """Files of `repo_id` whose content was fetched (a resolve GET, or a CDN GET after a
        resolve of that file)."""
        names = set()
        by_blob = {}
        with self._lock:
            for repo in (self.repos.get(repo_id),):
                if repo is None:
                    continue
                for hashes in repo.hashes.values():
                    for path, (_, lfs_oid) in hashes.items():
                        if lfs_oid is not None:
                            by_blob[lfs_oid] = path
        for r in self.requests():
            resolve = _split_resolve(r.raw_path)
            if r.server == "hub" and r.method == "GET" and resolve and resolve[0] == repo_id:
                names.add(resolve[2])
            elif r.server == "cdn" and r.method == "GET":
                blob = r.path.rsplit("/", 1)[-1]
                if blob in by_blob:
                    names.add(by_blob[blob])
        return names

    def resolve_calls(self, repo_id: str) -> list[tuple[str, str, str]]:
        """(method, revision, filename) of every resolve call to `repo_id`."""
        out = []
        for r in self.requests("hub"):
            resolve = _split_resolve(r.raw_path)
            if resolve and resolve[0] == repo_id:
                out.append((r.method, resolve[1], resolve[2]))
        return out

    def resolved_revisions(self, repo_id: str) -> set[str]:
        """The revisions (as in the URL) of every resolve call to `repo_id`."""
        return {revision for _, revision, _ in self.resolve_calls(repo_id)}

    # ------------------------------------------------------------ internals
    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def _take(self, knob: str) -> bool:
        """Fire a counting knob once if it is still > 0."""
        with self._lock:
            value = getattr(self.faults, knob)
            if value > 0:
                setattr(self.faults, knob, value - 1)
                return True
            return False

    def _throttle(self, nbytes: int) -> None:
        bps = self.faults.bandwidth_bps
        if not bps:
            return
        with self._bandwidth_lock:
            now = time.monotonic()
            start = max(now, self._bandwidth_next)
            self._bandwidth_next = start + nbytes / bps
            wait = self._bandwidth_next - now
        if wait > 0:
            time.sleep(wait)


def _make_handler(hub: HubServer, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the structured log is `hub.log`
            pass

        # -------------------------------------------------- plumbing
        def _begin(self) -> LoggedRequest:
            parsed = urllib.parse.urlsplit(self.path)
            entry = LoggedRequest(role, self.command, urllib.parse.unquote(parsed.path),
                                  {k.lower(): v for k, v in self.headers.items()},
                                  raw_path=parsed.path, time=time.time())
            self.query = urllib.parse.parse_qs(parsed.query)
            self.raw_path = parsed.path
            hub._record(entry)
            self.entry = entry
            return entry

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  content_type: str = "application/json") -> None:
            self.entry.status = status
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
            self._send(status, json.dumps(data).encode(), headers)

        def _error(self, status: int, code: str | None, message: str,
                   headers: dict | None = None) -> None:
            headers = dict(headers or {})
            if code:
                headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
            self._json({"error": message}, status, headers)

        def _drop(self) -> None:
            self.entry.status = -1
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def do_HEAD(self):
            self._dispatch()

        def do_GET(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def _dispatch(self):
            self._begin()
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            try:
                (self._hub if role == "hub" else self._cdn)()
            except (BrokenPipeError, ConnectionResetError):
                pass

        # -------------------------------------------------- the Hub
        def _hub(self):
            with hub._lock:
                hub.hub_requests += 1
                count = hub.hub_requests
            if hub.faults.gone_after is not None and count > hub.faults.gone_after:
                return self._drop()
            path = self.entry.path
            if hub.faults.silent_api and path.startswith("/api/"):
                hub._silence.wait(600)          # accepted, never answered
                return self._drop()
            if (hub.faults.rate_limit and hub.faults.rate_limit_paths in path
                    and hub._take("rate_limit")):
                return self._error(429, None, "rate limited",
                                   {"Retry-After": str(hub.faults.retry_after)})
            if hub._take("server_error"):
                return self._error(503, None, "service unavailable")
            parts = self.raw_path.strip("/").split("/")
            if parts == ["api", "models"]:
                return self._list_models()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._api(parts[2] + "/" + parts[3], parts[4:])
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = parts[0] + "/" + parts[1]
                revision = urllib.parse.unquote(parts[3])
                filename = urllib.parse.unquote("/".join(parts[4:]))
                return self._resolve(repo_id, revision, filename)
            self._error(404, None, f"no route {self.entry.path}")

        def _repo_and_commit(self, repo_id: str, revision: str):
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.meta.get("private") and self.entry.token not in repo.tokens):
                self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}")
                return None, None
            if hub.faults.commit_sha and revision == hub.faults.commit_sha:
                revision = "main"                 # the lie is served as if it were a commit
            sha = repo.commit_of(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return repo, None
            return repo, sha

        def _api(self, repo_id: str, rest: list[str]):
            kind = rest[0] if rest else ""
            revision = urllib.parse.unquote(rest[1]) if len(rest) > 1 else "main"
            if kind not in ("", "revision", "tree", "paths-info"):
                return self._error(404, None, f"no route {self.entry.path}")
            repo, sha = self._repo_and_commit(repo_id, revision)
            if sha is None:
                return
            files = repo.commits[sha]
            if kind in ("", "revision"):
                info = {"id": repo_id, "modelId": repo_id, "sha": hub.faults.commit_sha or sha,
                        "private": False, "gated": "auto" if repo.gated else False, "disabled": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)], "tags": []}
                info.update({**_listed_fields(repo), "sha": info["sha"]} if repo.meta else {})
                return self._json(info)
            if kind == "paths-info":
                form = urllib.parse.parse_qs(self.body.decode())
                wanted = form.get("paths", [])
                return self._json([_listed(_tree_entry(p, files[p], repo.hashes[sha][p]),
                                           hub.faults)
                                   for p in wanted if p in files])
            prefix = urllib.parse.unquote("/".join(rest[2:])).strip("/")
            recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
            headers = {}
            if hub.faults.tree_link:
                origin = hub.endpoint if hub.faults.tree_link == "self" else hub.cdn
                headers["Link"] = f'<{origin}{self.path}>; rel="next"'
            return self._json([_listed(e, hub.faults)
                               for e in _tree(files, repo.hashes[sha], prefix, recursive)],
                              headers=headers)

        def _list_models(self):
            """`GET /api/models` as the Hub answers it: filters, sort descending, pages."""
            query, token = self.query, self.entry.token
            hub.listing.queries.append(query)
            with hub._lock:
                models = [r for r in hub.repos.values()
                          if not r.meta.get("private") or token in r.tokens]
            for tag in query.get("filter", []):
                models = [r for r in models if tag in r.meta.get("tags", ())]
            for author in query.get("author", []):
                models = [r for r in models if r.repo_id.split("/")[0] == author]
            for text in query.get("search", []):
                models = [r for r in models if text.lower() in r.repo_id.lower()]
            sort = query.get("sort", [""])[0]
            if sort:
                ascending = query.get("direction", ["-1"])[0] == "1"
                models.sort(key=lambda r: (r.meta.get(sort) is not None,
                                           r.meta.get(sort) or 0, r.repo_id),
                            reverse=not ascending)
            limit = int(query.get("limit", ["0"])[0] or 0)
            size = min(limit, hub.listing.page_size) if limit else hub.listing.page_size
            cursor = int(query.get("cursor", ["0"])[0])
            page = models[cursor:cursor + size]
            expand = query.get("expand", [])
            full = query.get("full", ["false"])[0].lower() == "true"
            headers = {}
            if cursor + size < len(models):
                rest = {k: v for k, v in query.items() if k != "cursor"}
                rest["cursor"] = [str(cursor + size)]
                url = hub.listing.next_url or (f"{hub.endpoint}/api/models?"
                                               f"{urllib.parse.urlencode(rest, doseq=True)}")
                headers["Link"] = f'<{url}>; rel="next"'
            return self._json([_listing_item(r, expand, full) for r in page], 200, headers)

        def _resolve(self, repo_id: str, revision: str, filename: str):
            repo, sha = self._repo_and_commit(repo_id, revision)
            if sha is None:
                return
            token = self.entry.token
            if repo.gated and token not in repo.tokens:
                if token is None:
                    return self._error(401, "GatedRepo", f"Access to model {repo_id} is "
                                       "restricted. You must have access to it and be "
                                       "authenticated to access it. Please log in.")
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted "
                                   "and you are not in the authorized list.")
            files = repo.commits[sha]
            if filename not in files:
                return self._error(404, "EntryNotFound", f"{filename} does not exist at {sha}",
                                   {"X-Repo-Commit": sha})
            data = files[filename]
            oid, digest = repo.hashes[sha][filename]
            headers = {"X-Repo-Commit": hub.faults.commit_sha or sha, "ETag": f'"{oid}"',
                       "Accept-Ranges": "bytes"}
            if is_lfs(filename):
                headers.update({"X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data)),
                                "Location": f"{hub.cdn}/blobs/{digest}?expires="
                                            f"{int(time.time()) + 3600}&sig={digest[:12]}"})
                return self._send(302, b"", headers)
            self._send_ranged(data, headers)

        # -------------------------------------------------- the CDN
        def _cdn(self):
            if hub._take("cdn_forbidden"):
                return self._error(403, None, "Request has expired")
            if hub._take("cdn_server_error"):
                return self._error(503, None, "service unavailable")
            parts = self.entry.path.strip("/").split("/")
            data = hub.blobs.get(parts[-1]) if parts[:1] == ["blobs"] else None
            if data is None:
                return self._error(404, None, "NoSuchKey")
            self._send_ranged(data, {"ETag": f'"{parts[-1]}"', "Accept-Ranges": "bytes"},
                              cdn=True)

        def _send_ranged(self, data: bytes, headers: dict, cdn: bool = False):
            start, end, status = 0, len(data) - 1, 200
            wanted = self.headers.get("Range")
            if wanted and not (cdn and hub.faults.ignore_range):
                try:
                    start, end = _parse_range(wanted, len(data))
                except ValueError:
                    return self._error(416, None, f"bad range {wanted}",
                                       {"Content-Range": f"bytes */{len(data)}"})
                status = 206
                headers = dict(headers, **{"Content-Range": f"bytes {start}-{end}/{len(data)}"})
            body = data[start:end + 1]
            self.entry.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = None
            if cdn and hub.faults.cut_after is not None and hub._take("cut_count"):
                cut = hub.faults.cut_after
            sent = 0
            step = 64 * 1024
            while sent < len(body):
                piece = body[sent:sent + step]
                if cut is not None and sent + len(piece) > cut:
                    self.wfile.write(piece[:max(0, cut - sent)])
                    self.wfile.flush()
                    return self._drop()
                if cdn:
                    hub._throttle(len(piece))
                self.wfile.write(piece)
                sent += len(piece)
                self.entry.body_bytes_sent = sent
            self.entry.ended = time.time()

    return Handler


def overlapping_safetensors(data: bytes) -> bytes:
    """A safetensors file whose header lies: two tensors of the same shape and dtype made to
    read the same bytes (the second's offsets point at the first's), the file otherwise the
    same. The safetensors library refuses it; a reader trusting offsets reads wrong bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    by_size: dict[tuple, list[str]] = {}
    for name in names:
        entry = header[name]
        by_size.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(name)
    first, second = next(group for group in by_size.values() if len(group) >= 2)[:2]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _split_resolve(raw_path: str) -> tuple[str, str, str] | None:
    """(repo_id, revision, filename) of a resolve URL path, else None."""
    parts = raw_path.strip("/").split("/")
    if len(parts) >= 5 and parts[2] == "resolve":
        return (parts[0] + "/" + parts[1], urllib.parse.unquote(parts[3]),
                urllib.parse.unquote("/".join(parts[4:])))
    return None


def _parse_range(header: str, size: int) -> tuple[int, int]:
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ValueError(header)
    first, _, last = spec.strip().partition("-")
    if first == "":             # suffix range: the last N bytes
        n = int(last)
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    end = min(end, size - 1)
    if start > end or start >= size:
        raise ValueError(header)
    return start, end


def tree_tags(relation: str, *bases: str) -> list[str]:
    """The tags the Hub gives a model derived from `bases` (`base_model:<relation>:<id>`)."""
    return [f"base_model:{b}" for b in bases] + [f"base_model:{relation}:{b}" for b in bases]


# fields of a listed model the Hub returns without `expand` (and `full` adds the rest)
LISTING_DEFAULT_FIELDS = ("_id", "id", "modelId", "likes", "trendingScore", "private",
                          "downloads", "tags", "pipeline_tag", "library_name", "createdAt")


def _listed_fields(repo: Repo) -> dict:
    meta = repo.meta
    return {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": repo.refs.get("main"), "private": bool(meta.get("private")),
            "gated": meta.get("gated", "auto" if repo.gated else False), "disabled": False,
            "downloads": meta.get("downloads", 0), "likes": meta.get("likes", 0),
            "trendingScore": 0, "tags": list(meta.get("tags", [])),
            "pipeline_tag": meta.get("pipeline_tag"), "library_name": meta.get("library_name"),
            "createdAt": meta.get("createdAt"), "lastModified": meta.get("lastModified")}


def _listing_item(repo: Repo, expand: list[str], full: bool) -> dict:
    fields = _listed_fields(repo)
    if full:
        files = repo.commits.get(repo.refs.get("main", ""), {})
        return {**fields, "siblings": [{"rfilename": p} for p in sorted(files)]}
    wanted = ("_id", "id", *expand) if expand else LISTING_DEFAULT_FIELDS
    return {k: fields[k] for k in wanted if k in fields}


def _tree_entry(path: str, data: bytes, hashes: tuple[str, str | None]) -> dict:
    oid, lfs_oid = hashes
    entry = {"type": "file", "oid": oid, "size": len(data), "path": path}
    if lfs_oid is not None:
        entry["lfs"] = {"oid": lfs_oid, "size": len(data), "pointerSize": 134}
    return entry


def _listed(entry: dict, faults: Faults) -> dict:
    """A tree entry as the listing reports it: sizes scaled by `listed_size_factor`."""
    if faults.listed_size_factor == 1.0 or entry["type"] != "file":
        return entry
    entry = dict(entry, size=int(entry["size"] * faults.listed_size_factor))
    if "lfs" in entry:
        entry["lfs"] = dict(entry["lfs"], size=entry["size"])
    return entry


def _tree(files: dict[str, bytes], hashes: dict[str, tuple[str, str | None]], prefix: str,
          recursive: bool) -> list[dict]:
    out, dirs = [], set()
    for path in sorted(files):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rel = path[len(prefix) + 1:] if prefix else path
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(([prefix] if prefix else []) + parts[:i])
            if folder not in dirs and (recursive or i == 1):
                dirs.add(folder)
                out.append({"type": "directory", "oid": git_oid(folder.encode()), "size": 0,
                            "path": folder})
        if recursive or len(parts) == 1:
            out.append(_tree_entry(path, files[path], hashes[path]))
    return out


# ---------------------------------------------------------------- pytest fixtures

_SHARED: HubServer | None = None


def shared_server() -> HubServer:
    """One server per test session (started on first use, stopped at exit)."""
    global _SHARED
    if _SHARED is None:
        import atexit
        _SHARED = HubServer().start()
        atexit.register(_SHARED.stop)
    return _SHARED


try:
    import pytest

    @pytest.fixture
    def hub():
        """The session's stand-in Hub, emptied (repos, knobs, log) for this test."""
        server = shared_server()
        if not server._servers:     # a test stopped it ("the Hub is gone")
            server.restart()
        server.reset()
        yield server
        server.reset()
except ImportError:  # used outside pytest (bench/)
    pass
