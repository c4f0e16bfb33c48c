"""SCIM paths as clients write them: `/scim/v2/users`, `/scim/v2/Users/?filter=…` and
`/scim/v2//Users` (a tenant URL ending in `/` joined with `/Users`).

Microsoft's reference implementation answers all of these, and identity providers send them.
A redirect is no answer (Entra does not follow one on POST or PATCH), so the same handler
answers: `SpellingsResource` routes another spelling of an endpoint to the handler of its
canonical path, and the `canonical_path` middleware hands that handler (and every middleware
after it: auth, the audit record, the access log) the request as if the canonical path had
been sent. Endpoint names fold case; ids keep theirs. Paths outside /scim/v2 are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource, AbstractRoute, MatchInfoError, _InfoDict
from yarl import URL

from service.state import REQUEST_ID, Handler

PREFIX = ("scim", "v2")
_ENDPOINTS = {
    name.lower(): name
    for name in ("Users", "Groups", "Schemas", "ResourceTypes", "ServiceProviderConfig", ".search")
}
# Endpoints followed by an id (Users/Groups also by `.search`).
_WITH_ID = frozenset({"Users", "Groups", "Schemas", "ResourceTypes"})
_SEARCHABLE = frozenset({"Users", "Groups"})


def canonical_path(raw_path: str) -> str | None:
    """The (percent-encoded) path our routes are written for, when `raw_path` is another
    spelling of a SCIM endpoint; None when it is already canonical or names no endpoint."""
    if raw_path[1:5].lower() != "scim" and not raw_path.startswith("//"):
        return None  # the common case outside SCIM, decided without splitting
    parts = [part for part in raw_path.split("/") if part]
    if len(parts) < 3 or len(parts) > 4 or (parts[0].lower(), parts[1].lower()) != PREFIX:
        return None
    endpoint = _ENDPOINTS.get(parts[2].lower())
    if endpoint is None or (endpoint == ".search" and len(parts) > 3):
        return None
    canonical = ["", *PREFIX, endpoint]
    if len(parts) == 4:
        if endpoint not in _WITH_ID:
            return None
        tail = parts[3]
        if endpoint in _SEARCHABLE and tail.lower() == ".search":
            tail = ".search"
        canonical.append(tail)
    path = "/".join(canonical)
    return None if path == raw_path else path


def _with_path(url: URL, raw_path: str) -> URL:
    return URL.build(path=raw_path, query_string=url.raw_query_string, encoded=True)


class SpellingsResource(AbstractResource):
    """Registered last, under the index key "/": the router asks it only about a path no
    route matched, and it answers with the match of that path's canonical spelling."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        super().__init__()
        self._router = router

    @property
    def canonical(self) -> str:
        return "/"

    async def resolve(
        self, request: web.Request
    ) -> tuple[web.UrlMappingMatchInfo | None, set[str]]:
        path = canonical_path(request.rel_url.raw_path)
        if path is None:
            return None, set()
        match = await self._router.resolve(request.clone(rel_url=_with_path(request.rel_url, path)))
        if isinstance(match, MatchInfoError):
            allowed: set[str] = getattr(match.http_exception, "allowed_methods", set())
            return None, set(allowed)
        return match, set()

    def url_for(self, **kwargs: str) -> URL:
        raise NotImplementedError("other spellings have no URL of their own")

    def add_prefix(self, prefix: str) -> None:
        raise NotImplementedError("other spellings are of the application's own paths")

    def get_info(self) -> _InfoDict:
        return {}

    def raw_match(self, path: str) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator[AbstractRoute]:
        return iter(())


@web.middleware
async def canonical_spelling(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Hand the rest of the chain the request under its canonical path (first middleware)."""
    path = canonical_path(request.rel_url.raw_path)
    if path is None:
        return await handler(request)
    canonical = request.clone(rel_url=_with_path(request.rel_url, path))
    try:
        return await handler(canonical)
    finally:
        # A clone has a copy of the state: the reply is prepared with this request (by aiohttp
        # for a plain reply), whose X-Request-Id (stamp_request_id) is the clone's id.
        if REQUEST_ID in canonical:
            request[REQUEST_ID] = canonical[REQUEST_ID]


def add_routes(app: web.Application) -> None:
    """After every other route: it only answers what they did not."""
    app.router.register_resource(SpellingsResource(app.router))
