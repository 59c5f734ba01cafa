"""A base model's tree on the Hub, as rows of a model list: the base, its adapters and
fine-tunes (and, with `depth` 2, theirs), with the Hub's metadata beside each.

The Hub tags every derived model `base_model:<relation>:<base id>` (relations `adapter`,
`finetune`, `quantized`, `merge`); `GET /api/models?filter=<that tag>` lists them, sorted and
paged as `HfApi.list_models` asks (same query: `filter`, `author`, `search`, `sort` by the
Hub's names, `limit`, `expand`). Pages are walked by `esd/hub_pages.py` (bounded, never
following a `next` to another host with the token), requests go through huggingface_hub's
`http_backoff` (429 and 5xx retried, `Retry-After` honoured) and `hf_raise_for_status`
(typed errors), items are parsed into its `ModelInfo`.

Owns: `TreeQuery` (what to list), `walk_tree` (the rows, in order, and the notes a user must
read before the run: children left out, merges without one base, gated models without a
token, a listing cut short), `TreeError` (one sentence naming what failed). Knows nothing of
weights, metrics or the CSV format (`create_model_list.py` writes the rows); imports no torch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from esd.hub_pages import MAX_PAGES, PageWalk

RELATIONS = ("adapter", "finetune", "quantized", "merge")
DEFAULT_RELATIONS = ("adapter", "finetune")
# --sort value -> the Hub's name for it (as HfApi.list_models maps them)
SORTS = {"downloads": "downloads", "likes": "likes", "created_at": "createdAt",
         "last_modified": "lastModified"}
EXPAND = ["author", "downloads", "likes", "createdAt", "lastModified", "library_name",
          "pipeline_tag", "gated", "private", "tags", "sha"]
METADATA_COLUMNS = ("downloads", "likes", "created_at", "library_name", "pipeline_tag",
                    "gated", "private")
HUB_PAGE_LIMIT = 1000        # the Hub's largest page


class TreeError(Exception):
    """The tree cannot be listed; the message says what and why in one sentence."""


@dataclass(frozen=True)
class TreeQuery:
    base: str | None = None                 # None: the models matching author/search are roots
    relations: tuple[str, ...] = DEFAULT_RELATIONS
    sort: str = "downloads"
    limit: int = 100                        # children per parent (roots, without a base)
    author: str | None = None
    search: str | None = None
    depth: int = 1                          # levels below the roots
    include_base: bool = True
    pin: bool = False
    max_pages: int = MAX_PAGES


@dataclass(frozen=True)
class TreeRow:
    model_id: str
    source_model: str | None
    relation: str                           # "base" for a root
    info: object                            # huggingface_hub.ModelInfo
    revision: str | None = None             # the commit, with --pin

    def metadata(self) -> dict[str, str]:
        """The metadata columns, as text (`gated`: false/auto/manual; `private`: true/false)."""
        info = self.info
        created = info.created_at
        return {
            "downloads": "" if info.downloads is None else str(info.downloads),
            "likes": "" if info.likes is None else str(info.likes),
            "created_at": created.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            if created else "",
            "library_name": info.library_name or "",
            "pipeline_tag": info.pipeline_tag or "",
            "gated": str(info.gated).lower() if info.gated not in (None, "") else "false",
            "private": "true" if info.private else "false",
        }

    @property
    def gated(self) -> bool:
        return self.info.gated not in (None, False, "", "false")


@dataclass
class Tree:
    rows: list[TreeRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class HubListing:
    """The two requests a tree needs: one model's info, and a filtered, sorted listing."""

    def __init__(self, endpoint: str | None = None, token: str | bool | None = None,
                 max_pages: int = MAX_PAGES):
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.headers = build_hf_headers(token=token, library_name="esd-experiment")
        self.max_pages = max_pages
        self.stops: list[str] = []

    def info(self, repo_id: str):
        from huggingface_hub import ModelInfo
        from huggingface_hub.utils import hf_raise_for_status, http_backoff
        with hub_errors(f"reading {repo_id}", repo_id):
            response = http_backoff("GET", f"{self.endpoint}/api/models/{repo_id}",
                                    params={"expand": EXPAND}, headers=self.headers)
            hf_raise_for_status(response)
            return ModelInfo(**response.json())

    def models(self, *, tags=(), author=None, search=None, sort="downloads", count=100,
               what="listing models") -> list:
        """Up to `count` models having all `tags`, best first by `sort`."""
        from huggingface_hub import ModelInfo
        params = {"filter": list(tags), "author": author, "search": search,
                  "sort": SORTS[sort], "limit": min(count, HUB_PAGE_LIMIT), "expand": EXPAND}
        params = {k: v for k, v in params.items() if v not in (None, [])}
        walk = PageWalk(f"{self.endpoint}/api/models", params, self.headers, self.max_pages)
        found = []
        with hub_errors(what):
            for page in walk.pages():
                found += [ModelInfo(**{"siblings": None, **item}) for item in page]
                if len(found) >= count:
                    break
        if walk.stopped:
            self.stops.append(f"{what} was cut short: {walk.stopped}")
        return found[:count]


@contextmanager
def hub_errors(what: str, repo_id: str | None = None):
    """huggingface_hub's and the network's exceptions, as one-sentence TreeErrors."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    try:
        yield
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if repo_id and (isinstance(error, RepositoryNotFoundError) or status == 404):
            raise TreeError(f"{repo_id}: no such model on the Hub (or it is private and the "
                            f"token has no access to it)") from None
        if status == 429:
            raise TreeError(f"the Hub kept answering 429 Too Many Requests while {what}, "
                            f"after huggingface_hub's retries with backoff; wait a few minutes "
                            f"(a token has higher rate limits) and run again") from None
        if isinstance(error, HfHubHTTPError):
            raise TreeError(f"the Hub failed while {what}: {str(error).splitlines()[0]}") \
                from None
        raise TreeError(f"cannot reach the Hub while {what}: {error}") from None


def walk_tree(query: TreeQuery, hub: HubListing, token_set: bool) -> Tree:
    """The rows of `query`'s tree, roots first then level by level (each level in `--sort`
    order per parent), every model once; the notes to print before writing them."""
    tree, seen = Tree(), set()
    roots = _roots(query, hub)
    for root in roots:
        seen.add(root.id)
        if query.include_base:
            tree.rows.append(TreeRow(root.id, None, "base", root))
    left_out, merges, repeats, more = {}, 0, 0, []
    frontier = roots
    for _ in range(query.depth):
        next_frontier = []
        for parent in frontier:
            children, truncated = _children(query, hub, parent.id)
            if truncated:
                more.append(parent.id)
            for relation, child in children:
                if child.id in seen:
                    repeats += 1
                    continue
                seen.add(child.id)
                merges += relation == "merge"
                source = None if relation == "merge" else parent.id
                tree.rows.append(TreeRow(child.id, source, relation, child))
                next_frontier.append(child)
            if "quantized" not in query.relations:
                counted = _left_out(query, hub, parent.id, "quantized")
                if counted:
                    left_out.setdefault("quantized", []).append(counted)
        frontier = next_frontier
    if query.base and query.depth and len(tree.rows) == int(query.include_base):
        raise TreeError(_empty_tree(query, left_out))
    if not tree.rows:
        raise TreeError(f"no model on the Hub matches {_matching(query)}; nothing written")
    if query.pin:
        tree.rows = _pinned(tree.rows, hub)
    tree.notes = _notes(query, tree.rows, left_out, merges, repeats, more, hub.stops, token_set)
    return tree


def _roots(query: TreeQuery, hub: HubListing) -> list:
    if query.base:
        return [hub.info(query.base)]
    return hub.models(author=query.author, search=query.search, sort=query.sort,
                      count=query.limit, what=f"listing the models matching {_matching(query)}")


def _children(query: TreeQuery, hub: HubListing, parent: str) -> tuple[list, bool]:
    """[(relation, ModelInfo)] of `parent`, best first by `--sort`, at most `--limit`; and
    whether more were there. One listing per relation, merged (each is sorted already)."""
    found, ids = [], set()
    for relation in query.relations:
        for info in hub.models(tags=[f"base_model:{relation}:{parent}"], **_child_filter(query),
                               sort=query.sort, count=query.limit + 1,
                               what=f"listing the {relation} children of {parent}"):
            if info.id not in ids:
                ids.add(info.id)
                found.append((_relation_of(info, parent, relation), info))
    found.sort(key=lambda pair: _sort_key(pair[1], query.sort), reverse=True)
    return found[:query.limit], len(found) > query.limit


def _child_filter(query: TreeQuery) -> dict:
    """--author/--search narrow a base's children; without --base they chose the roots."""
    return {"author": query.author, "search": query.search} if query.base else {}


def _relation_of(info, parent: str, asked: str) -> str:
    """The relation the child's own `base_model:<relation>:<parent>` tag names."""
    for tag in info.tags or ():
        prefix, _, rest = tag.partition(":")
        relation, _, base = rest.partition(":")
        if prefix == "base_model" and base == parent and relation in RELATIONS:
            return relation
    return asked


def _sort_key(info, sort: str) -> tuple:
    value = getattr(info, sort, None)
    if isinstance(value, datetime):
        value = value.timestamp()
    return (value is not None, value or 0)


def _left_out(query: TreeQuery, hub: HubListing, parent: str, relation: str) -> str | None:
    """How many `relation` children `parent` has ("3", or "more than 100"), None if none."""
    found = hub.models(tags=[f"base_model:{relation}:{parent}"], **_child_filter(query),
                       sort=query.sort, count=query.limit + 1,
                       what=f"counting the {relation} children of {parent}")
    if not found:
        return None
    return f"more than {query.limit}" if len(found) > query.limit else str(len(found))


def _pinned(rows: list[TreeRow], hub: HubListing) -> list[TreeRow]:
    """Each row at its current commit, and each `source_model` at its parent's (`id@sha`, the
    key the parent's results carry), so a rerun reads the same weights and merges the same
    base."""
    shas = {row.model_id: row.info.sha or hub.info(row.model_id).sha for row in rows}
    for parent in {r.source_model for r in rows if r.source_model} - shas.keys():
        shas[parent] = hub.info(parent).sha          # a base left out by --no_base
    unpinned = next((model for model, sha in shas.items() if not sha), None)
    if unpinned:
        raise TreeError(f"{unpinned}: the Hub gave no commit to pin")
    return [replace(row, revision=shas[row.model_id], source_model=row.source_model
                    and f"{row.source_model}@{shas[row.source_model]}") for row in rows]


def _matching(query: TreeQuery) -> str:
    parts = [f"--author {query.author}" if query.author else "",
             f"--search {query.search}" if query.search else ""]
    return " ".join(p for p in parts if p)


def _empty_tree(query: TreeQuery, left_out: dict) -> str:
    relations = " or ".join(query.relations)
    matching = f" matching {_matching(query)}" if _matching(query) else ""
    also = "".join(f"; its {_total(counts)} {relation} children are left out (the analysis "
                   f"refuses quantized checkpoints)" for relation, counts in left_out.items())
    return (f"{query.base} has no {relations} children on the Hub{matching}{also}; "
            f"nothing written")


def _total(counts: list[str]) -> str:
    exact = sum(int(c) for c in counts if c.isdigit())
    return f"more than {exact}" if any(not c.isdigit() for c in counts) else str(exact)


def _notes(query, rows, left_out, merges, repeats, more, stops, token_set) -> list[str]:
    notes = []
    for relation, counts in left_out.items():
        notes.append(f"left out {_total(counts)} {relation} children: the analysis refuses "
                     f"quantized checkpoints (--relation {' '.join(query.relations)} "
                     f"{relation} lists them anyway)")
    if merges:
        notes.append(f"{_count(merges, 'merge child', 'merge children')} of several bases: "
                     f"source_model left empty (a merge has no one base to compare with)")
    if repeats:
        notes.append(f"{_count(repeats, 'model')} reached from more than one parent: listed "
                     f"once, under the first")
    if more:
        notes.append(f"{_count(len(more), 'parent')} with more than --limit {query.limit} "
                     f"children (first: {more[0]}): the {query.limit} with most {query.sort} "
                     f"are listed")
    notes += stops
    gated = [row.model_id for row in rows if row.gated]
    if gated and not token_set:
        shown = ", ".join(gated[:3]) + (", …" if len(gated) > 3 else "")
        notes.append(f"{len(gated)} of {len(rows)} models are gated ({shown}) and no Hugging "
                     f"Face token is set: they will fail as `gated` unless you log in "
                     f"(`hf auth login`) or set HF_TOKEN")
    return notes


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
