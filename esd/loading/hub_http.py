"""Requests to the Hub and what their failures mean.

Owns: every request our code sends to the Hub or its CDN goes through `hub_request`
(huggingface_hub's own `http_backoff`: 429 honouring `Retry-After`, 5xx and dropped
connections retried; a timeout on every call, `ESD_HUB_TIMEOUT_S`; a Hub that cannot be
reached at all or does not answer raises `HubUnreachable` at once, so the cache may serve);
`hub_json_pages` (a paginated listing that follows `Link: rel="next"` only on the Hub's own
origin, refuses a page it has seen and stops at `MAX_PAGES`: huggingface_hub's `paginate`
follows any link, with the token); and `hub_failure`, the one mapping of a hub or network
exception to a typed `ESDFailure`.

Must not: know which files a model needs, the cache layout or the disk budget; build a path.
The token (`HF_TOKEN`) is read by huggingface_hub, sent to the Hub's origin only, and never
appears in a message.
"""
from __future__ import annotations

import os
import urllib.parse

from esd import diskfull
from esd.failures import ESDFailure

MAX_PAGES = 1000                  # tree pages of one listing (the Hub sends 1,000 entries each)
CLIENT_CLOSED = "client has been closed"   # huggingface_hub's thread bug after a lost connection
REFRESH_STATUSES = (401, 403, 410)  # from the CDN: a signed URL that expired


def hub_retries() -> int:
    """Tries of one hub request (`ESD_HUB_RETRIES`, default 5)."""
    return max(1, int(os.environ.get("ESD_HUB_RETRIES", "5")))


def hub_backoff_s() -> float:
    """First wait between tries (`ESD_HUB_BACKOFF_S`, default 1 s), doubling."""
    return float(os.environ.get("ESD_HUB_BACKOFF_S", "1"))


def hub_timeout_s() -> float:
    """Seconds a request may wait to connect or for the next bytes (`ESD_HUB_TIMEOUT_S`,
    default 60): a Hub that accepts connections and never answers cannot hang a worker or the
    orchestrator's budget admission."""
    return float(os.environ.get("ESD_HUB_TIMEOUT_S", "60"))


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT.rstrip("/")


def same_origin(url: str, other: str) -> bool:
    from esd.hub_pages import origin    # the one origin rule (scheme, host, port)
    return origin(url) == origin(other)


class HubUnreachable(Exception):
    """The Hub did not answer at all (connection refused, DNS, or silent past the timeout)."""


def _retried_transport_errors() -> tuple[type, ...]:
    """A connection that broke mid-answer: worth another try. Not reaching the Hub at all
    (connect errors, timeouts) is `HubUnreachable`, at once."""
    import httpx2
    return (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError, httpx2.CloseError)


def hub_request(method: str, url: str, *, token: str | bool | None = None, stream: bool = False,
                follow_redirects: bool = True, headers: dict | None = None,
                hub: str | None = None, **kwargs):
    """One request with a timeout and huggingface_hub's backoff (`ESD_HUB_RETRIES` tries,
    from `ESD_HUB_BACKOFF_S`). The token goes only to the Hub's origin (`hub`, default the
    configured endpoint). `stream=True` returns a context manager whose response body is not
    read yet. Raises `HubUnreachable`, or the client's own error once the retries are spent."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, http_backoff, http_stream_backoff
    sent = {"Accept-Encoding": "identity"}
    if same_origin(url, hub or endpoint()):
        sent.update(build_hf_headers(token=token))
    sent.update(headers or {})
    options = dict(max_retries=hub_retries() - 1, base_wait_time=hub_backoff_s(),
                   max_wait_time=max(8.0, hub_backoff_s()),
                   retry_on_exceptions=_retried_transport_errors(), headers=sent,
                   follow_redirects=follow_redirects, timeout=hub_timeout_s(), **kwargs)
    call = http_stream_backoff if stream else http_backoff
    try:
        return call(method, url, **options)
    except (httpx2.ConnectError, httpx2.TimeoutException, ConnectionRefusedError) as exc:
        raise HubUnreachable(_unreachable_text(exc)) from exc


def _unreachable_text(exc: BaseException) -> str:
    import httpx2
    if isinstance(exc, httpx2.TimeoutException) and not isinstance(exc, httpx2.ConnectTimeout):
        return f"no answer within {hub_timeout_s():g} s (ESD_HUB_TIMEOUT_S)"
    return f"{type(exc).__name__}: {exc}"


def hub_json(url: str, params: dict | None = None):
    """The JSON of a Hub API answer; an error answer raises huggingface_hub's typed error."""
    from huggingface_hub.utils import hf_raise_for_status
    response = hub_request("GET", url, params=params)
    hf_raise_for_status(response)
    return response.json()


def hub_json_pages(url: str, params: dict | None = None) -> list:
    """Every item of a paginated Hub listing, walked by `esd.hub_pages.PageWalk` (the one
    rule: `Link: rel="next"` followed on the Hub's own origin only, never twice to the same
    page, at most `MAX_PAGES` pages) with `hub_request`'s timeouts and backoff; a walk cut
    short is a `bad_hub_response` (the token is never sent to another host)."""
    from esd.hub_pages import PageWalk
    walk = PageWalk(url, params, max_pages=MAX_PAGES,
                    request=lambda page, query: hub_request("GET", page, params=query))
    items: list = []
    for page in walk.pages():
        if not isinstance(page, list):
            raise ESDFailure("resolve", "bad_hub_response", f"{_path(url)}: expected a list")
        items.extend(page)
    if walk.stopped:
        raise ESDFailure("resolve", "bad_hub_response", f"{_path(url)}: {walk.stopped}",
                         retryable=False)
    return items


def _path(url: str) -> str:
    return urllib.parse.urlsplit(url).path


# --------------------------------------------------------------------------- failures

def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _from_cdn(exc: BaseException, hub: str | None) -> bool:
    """The answer came from another host than the Hub (the CDN a resolve redirected to)."""
    response = getattr(exc, "response", None)
    url = getattr(getattr(response, "request", None), "url", None)
    return url is not None and not same_origin(str(url), hub or endpoint())


def _cause(exc: BaseException) -> BaseException | None:
    """huggingface_hub wraps the error of a metadata request in `LocalEntryNotFoundError`."""
    seen = 0
    inner = exc.__cause__ or exc.__context__
    while inner is not None and seen < 5:
        if _status(inner) is not None:
            return inner
        inner, seen = inner.__cause__ or inner.__context__, seen + 1
    return None


def offline_hint(repo_id: str, cache) -> str:
    return (f"the hub ({endpoint()}) cannot be reached and {repo_id} is not in the local "
            f"cache {cache}; on a machine without internet access set HF_HUB_OFFLINE=1 to use "
            "the local cache only")


def rate_limited(name: str, stage: str = "resolve") -> ESDFailure:
    return ESDFailure(stage, "rate_limited", f"{name}: the hub answered 429 Too Many Requests "
                      "(its rate limits) after retries; retry later, or log in (HF_TOKEN) for "
                      "higher limits")


def expired_url(name: str, status: int | None, stage: str = "resolve") -> ESDFailure:
    return ESDFailure(stage, "expired_url", f"{name}: the CDN refused the download link the hub "
                      f"gave ({status}: a signed URL that expired); a retry asks for a new one")


def hub_failure(exc: BaseException, repo_id: str, revision: str | None = None, *,
                stage: str = "resolve", cache=None, what: str = "",
                hub: str | None = None) -> ESDFailure:
    """The typed failure of a hub or network exception (the one mapping). `what` names the
    file or request, `cache` is where downloads were written (for a full disk), `hub` the
    Hub's origin when it is not the configured endpoint."""
    from huggingface_hub import errors
    import httpx2
    name = f"{repo_id}@{revision}" if revision else repo_id
    where = f"{name}: {what}: " if what else f"{name}: "
    if isinstance(exc, ESDFailure):
        return exc
    if diskfull.is_disk_full(exc):
        return diskfull.disk_full_failure(getattr(exc, "filename", None) or cache, stage)
    if isinstance(exc, HubUnreachable):
        return ESDFailure(stage, "network_error", f"{where}{offline_hint(repo_id, cache)} "
                          f"({exc})", retryable=True)
    if isinstance(exc, errors.LocalEntryNotFoundError) and _cause(exc) is not None:
        return hub_failure(_cause(exc), repo_id, revision, stage=stage, cache=cache, what=what,
                           hub=hub)
    status = _status(exc)
    if isinstance(exc, errors.GatedRepoError):
        if status == 403:
            return ESDFailure(stage, "gated", f"{name} is gated and the token given (HF_TOKEN) "
                              "has no access: request access on the model's page",
                              retryable=False)
        return ESDFailure(stage, "gated", f"{name} is gated: request access on the hub and set "
                          "HF_TOKEN", retryable=False)
    if isinstance(exc, errors.RepositoryNotFoundError):
        if status == 401 and os.environ.get("HF_TOKEN"):
            return ESDFailure(stage, "unauthorized", f"{name}: not found or HF_TOKEN has no "
                              "access (401)")
        return ESDFailure(stage, "repo_not_found", f"{name}: no such repository on the hub "
                          "(or it is private: set HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ESDFailure(stage, "revision_not_found", f"{name}: no such revision")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return ESDFailure(stage, "corrupt_file", f"{where}not in the repo at this commit")
    if isinstance(exc, errors.HFValidationError):
        return ESDFailure(stage, "invalid_id", f"{name!r} is not a valid hub id: {exc}")
    if isinstance(exc, errors.IncompleteSnapshotError):
        return ESDFailure(stage, "download_interrupted", f"{name}: cached snapshot is "
                          f"incomplete and the hub cannot be reached: {exc}")
    if status is not None:
        if status == 429:
            return rate_limited(name, stage)
        if status in REFRESH_STATUSES and _from_cdn(exc, hub):
            return expired_url(name, status, stage)
        if status in (401, 403):
            return ESDFailure(stage, "unauthorized", f"{where}access denied ({status})")
        if status >= 500:
            return ESDFailure(stage, "hub_unavailable", f"{where}hub answered {status}")
        return ESDFailure(stage, "network_error", f"{where}hub error {status}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return ESDFailure(stage, "network_error", f"{name}: the hub cannot be reached and the "
                          "files are not in the local cache; set HF_HUB_OFFLINE=1 if this "
                          "machine has no internet access")
    if isinstance(exc, RuntimeError) and CLIENT_CLOSED in str(exc):
        return ESDFailure(stage, "network_error", f"{name}: the connection to the hub broke "
                          "during the download (huggingface_hub: client closed)", retryable=True)
    if isinstance(exc, (ConnectionError, TimeoutError, httpx2.ConnectError,
                        httpx2.TimeoutException)):
        return ESDFailure(stage, "network_error", f"{where}{type(exc).__name__}: {exc}")
    if isinstance(exc, (OSError, httpx2.TransportError, httpx2.HTTPError)):
        return ESDFailure(stage, "download_interrupted",
                          f"{where}download failed: {type(exc).__name__}: {exc}")
    return ESDFailure(stage, "hub_unavailable", f"{where}{type(exc).__name__}: {exc}")
