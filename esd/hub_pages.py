"""Following the Hub's paginated listings (`Link: <url>; rel="next"`), bounded and guarded.

huggingface_hub's own `paginate` follows every `next` link it is given, as often as it is
given, and sends the request's headers (the token among them) wherever the link points. A
listing here follows the same protocol with the same parts of the library (`http_backoff`:
429 and 5xx retried, `Retry-After` honoured; `hf_raise_for_status`: typed errors), and:
- stops at `max_pages` pages, or when a `next` names a page already fetched (a loop);
- never follows a `next` on another origin (scheme, host, port) than the first page's, so
  the token never leaves the Hub it was meant for.
A stop is reported through `PageWalk.stopped` (a sentence saying why), never silently.

Owns: the page walk, for every listing of the project (`esd/model_tree.py`'s models, the
loader's tree listings through `esd/loading/hub_http.py`). Knows nothing of what is listed.
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator

MAX_PAGES = 500


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port made explicit."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


@dataclass
class PageWalk:
    """The pages of one listing: iterate `pages()`; afterwards `stopped` says why the walk
    ended early (None when the Hub said there was no next page)."""
    url: str
    params: dict | list | None = None
    headers: dict | None = None
    max_pages: int = MAX_PAGES
    timeout: float | None = None
    # how a page is fetched, `request(url, params) -> response`; default: huggingface_hub's
    # `http_backoff` with `headers` (the loader passes its own, with its timeouts)
    request: Callable | None = None
    stopped: str | None = None
    fetched: int = 0

    def pages(self) -> Iterator[list]:
        from huggingface_hub.utils import hf_raise_for_status
        home = origin(self.url)
        seen: set[str] = set()
        url, params = self.url, self.params
        while url is not None:
            response = (self.request or self._get)(url, params)
            hf_raise_for_status(response)
            seen.add(str(response.request.url))
            self.fetched += 1
            yield response.json()
            url, params = response.links.get("next", {}).get("url"), None
            if url is None:
                return
            url = urllib.parse.urljoin(str(response.request.url), url)
            self.stopped = self._refusal(url, home, seen)
            if self.stopped:
                return

    def _get(self, url: str, params):
        from huggingface_hub.utils import http_backoff
        return http_backoff("GET", url, params=params, headers=self.headers, timeout=self.timeout)

    def _refusal(self, url: str, home: tuple, seen: set[str]) -> str | None:
        if origin(url) != home:
            return (f"the next page is on another host ({url.split('?')[0]}); not followed, "
                    f"so the token stays with {self.url.split('?')[0]}")
        if url in seen:
            return f"the next page repeats a page already read ({url}); the listing loops"
        if self.fetched >= self.max_pages:
            return f"stopped after {self.max_pages} pages"
        return None
