"""SCIM Error responses (RFC 7644 §3.12)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from domain.errors import bounded
from service import exceptions

SCIM_CONTENT_TYPE = "application/scim+json"
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"


class ScimError(Exception):
    """An error reply. Its detail is bounded (domain.errors.bounded): many quote the client's
    input, and the provisioning log keeps the detail of every failed request."""

    def __init__(
        self,
        status: int,
        detail: str,
        scim_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.detail = bounded(detail)
        super().__init__(self.detail)
        self.status = status
        self.scim_type = scim_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"schemas": [ERROR_SCHEMA], "status": str(self.status)}
        if self.scim_type:
            body["scimType"] = self.scim_type
        body["detail"] = self.detail
        return body

    def response(self) -> web.Response:
        return scim_json(self.body(), status=self.status, headers=self.headers)


def scim_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        headers=headers,
        content_type=SCIM_CONTENT_TYPE,
    )


def not_found(kind: str, resource_id: str) -> ScimError:
    return ScimError(404, f"{kind} {resource_id} not found")


def invalid_value(detail: str) -> ScimError:
    return ScimError(400, detail, "invalidValue")


def invalid_syntax(detail: str) -> ScimError:
    return ScimError(400, detail, "invalidSyntax")


def uniqueness(detail: str) -> ScimError:
    return ScimError(409, detail, "uniqueness")


def precondition_failed(detail: str = "The resource has changed (ETag mismatch)") -> ScimError:
    return ScimError(412, detail)


# The service layer's refusals (service/exceptions.py), as SCIM errors: status and scimType.
_OF_SERVICE: dict[type[exceptions.ServiceError], tuple[int, str | None]] = {
    exceptions.NotFound: (404, None),
    exceptions.Invalid: (400, "invalidValue"),
    exceptions.Taken: (409, "uniqueness"),
    exceptions.PreconditionFailed: (412, None),
    exceptions.Conflict: (409, "mutability"),
}


def scim_error_of(error: exceptions.ServiceError) -> ScimError:
    status, scim_type = _OF_SERVICE.get(type(error), (500, None))
    return ScimError(status, error.detail, scim_type)
