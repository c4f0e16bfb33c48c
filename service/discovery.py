"""Discovery endpoints (RFC 7644 §4): what this server really supports, nothing more."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from domain.core_schemas import RESOURCE_SCHEMAS, Schema
from infra.config import Settings
from service.errors import ScimError, scim_json
from service.feeds.sets import EVENT_URIS
from service.state import DATABASE, PRINCIPAL, SETTINGS, base_url

LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
SPC_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
RESOURCE_TYPE_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ResourceType"


def _resource_type(name: str, endpoint: str) -> dict[str, Any]:
    """A resource type (RFC 7643 §6) of its schemas in domain/core_schemas.py."""
    core, *extensions = RESOURCE_SCHEMAS[name]
    item: dict[str, Any] = {
        "id": name,
        "name": name,
        "endpoint": endpoint,
        "description": core["description"],
        "schema": core["id"],
    }
    if extensions:
        item["schemaExtensions"] = [{"schema": s["id"], "required": False} for s in extensions]
    return item


# Resource types are announced only once their endpoints exist (see service/app.py).
RESOURCE_TYPES: dict[str, dict[str, Any]] = {
    "User": _resource_type("User", "/Users"),
    "Group": _resource_type("Group", "/Groups"),
}

ENABLED_RESOURCES = web.AppKey("enabled_resources", tuple)


def _meta(request: web.Request, resource_type: str, path: str) -> dict[str, str]:
    return {"resourceType": resource_type, "location": f"{base_url(request)}{path}"}


def _enabled(request: web.Request) -> tuple[str, ...]:
    enabled: tuple[str, ...] = request.app.get(ENABLED_RESOURCES, ())
    return enabled


def _announce_limits(attributes: list[dict[str, Any]], settings: Settings) -> None:
    """Say the limits a value is refused past (400 invalidValue) in its attribute's description.

    RFC 7643 has a structured place for the body size (bulk.maxPayloadSize) and the page size
    (filter.maxResults) only: no attribute characteristic for a length or a count, and strict
    clients (scim2-models, hence scim2-client) refuse a ServiceProviderConfig with members of
    an extension. The description is the one place every client reads without breaking.
    """
    for attribute in attributes:
        if attribute.get("mutability") in ("readOnly", "immutable"):
            continue
        said = []
        if attribute.get("type") in ("string", "reference", "binary"):
            said.append(f"At most {settings.max_string_length} characters.")
        if attribute.get("multiValued") and attribute["name"] == "members":
            said.append(
                f"At most {settings.max_patch_members} members in a POST or PUT body, or in one"
                " PATCH operation."
            )
        elif attribute.get("multiValued"):
            said.append(f"At most {settings.max_multi_values} values.")
        if said:
            description = attribute.get("description", "").rstrip()
            attribute["description"] = " ".join([description, *said]).strip()
        _announce_limits(attribute.get("subAttributes", []), settings)


def _schemas(request: web.Request) -> list[dict[str, Any]]:
    settings = request.app[SETTINGS]
    out: list[dict[str, Any]] = []
    for name in _enabled(request):
        # The core schema and the enterprise extension (domain/core_schemas.py), then the
        # tenant's declared extensions: what requests are validated against, and nothing else.
        for declared in (*RESOURCE_SCHEMAS[name], *_declared(request, name)):
            schema = copy.deepcopy(declared)
            _announce_limits(schema["attributes"], settings)
            schema["meta"] = _meta(request, "Schema", f"/Schemas/{schema['id']}")
            out.append(schema)
    return out


def _declared(request: web.Request, resource_type: str) -> list[Schema]:
    """The extension schemas the caller's tenant declares for a resource type."""
    principal = request.get(PRINCIPAL)
    declarations = principal.declared if principal is not None else ()
    return [d["schema"] for d in declarations if d["resourceType"] == resource_type]


def _list(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schemas": [LIST_RESPONSE],
        "totalResults": len(resources),
        "itemsPerPage": len(resources),
        "startIndex": 1,
        "Resources": resources,
    }


async def service_provider_config(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    users = "User" in _enabled(request)
    return scim_json(
        {
            "schemas": [SPC_SCHEMA],
            "documentationUri": "https://github.com/scimledger/scimledger#readme",
            "patch": {"supported": users},
            # No bulk endpoint; maxPayloadSize still says how large any request body may be.
            "bulk": {
                "supported": False,
                "maxOperations": 0,
                "maxPayloadSize": settings.max_body_bytes,
            },
            "filter": {"supported": users, "maxResults": settings.max_results},
            "changePassword": {"supported": False},
            "sort": {"supported": users},
            "etag": {"supported": users},
            # RFC 9865: both index and cursor paging; nextCursor is omitted on the last page.
            "pagination": {
                "cursor": users,
                "index": users,
                "defaultPaginationMethod": "index",
                "defaultPageSize": settings.max_results,
                "maxPageSize": settings.max_results,
            },
            "authenticationSchemes": [
                {
                    "type": "oauthbearertoken",
                    "name": "OAuth Bearer Token",
                    "description": "Bearer token issued by `scimledger tenants create`",
                    "primary": True,
                }
            ],
            **(await _security_events(request)),
            "meta": _meta(request, "ServiceProviderConfig", "/ServiceProviderConfig"),
        }
    )


async def _security_events(request: web.Request) -> dict[str, Any]:
    """RFC 9967 §4 `securityEvents`, for a tenant with event streams (`scimledger feeds`).

    "Absent indicates the provider ... is not currently configured for Security Events": so a
    tenant without streams gets none, and strict clients (scim2-models refuses members it does
    not know) keep working for every tenant that does not use feeds. No asynchronous requests
    (`Prefer: respond-async` is not supported): asyncRequest "none".
    """
    principal = request.get(PRINCIPAL)
    if principal is None:
        return {}
    configured = await request.app[DATABASE].pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM feed_streams WHERE tenant_id = $1)", principal.tenant_id
    )
    if not configured:
        return {}
    return {"securityEvents": {"asyncRequest": "none", "eventUris": list(EVENT_URIS)}}


async def resource_types(request: web.Request) -> web.Response:
    items = []
    for name in _enabled(request):
        item = {"schemas": [RESOURCE_TYPE_SCHEMA], **copy.deepcopy(RESOURCE_TYPES[name])}
        declared = [{"schema": s["id"], "required": False} for s in _declared(request, name)]
        if declared:
            item["schemaExtensions"] = [*item.get("schemaExtensions", []), *declared]
        item["meta"] = _meta(request, "ResourceType", f"/ResourceTypes/{name}")
        items.append(item)
    rid = request.match_info.get("id")
    if rid is None:
        return scim_json(_list(items))
    for item in items:
        if item["id"] == rid:
            return scim_json(item)
    raise ScimError(404, f"ResourceType {rid} not found")


async def schemas(request: web.Request) -> web.Response:
    items = _schemas(request)
    sid = request.match_info.get("id")
    if sid is None:
        return scim_json(_list(items))
    for item in items:
        if item["id"] == sid:
            return scim_json(item)
    raise ScimError(404, f"Schema {sid} not found")


async def root_search(request: web.Request) -> web.Response:
    """A query at the server root, across resource types (RFC 7644 §3.4.2.1, §3.4.3), is a MAY
    that this server does not implement: 501, as §3.12 lists for an unsupported operation."""
    raise ScimError(501, "Search at the server root is not supported; search a resource endpoint")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/scim/v2/.search", root_search)
    app.router.add_get("/scim/v2/ServiceProviderConfig", service_provider_config)
    app.router.add_get("/scim/v2/ResourceTypes", resource_types)
    app.router.add_get("/scim/v2/ResourceTypes/{id}", resource_types)
    app.router.add_get("/scim/v2/Schemas", schemas)
    app.router.add_get("/scim/v2/Schemas/{id}", schemas)
