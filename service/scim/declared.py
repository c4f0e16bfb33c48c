"""Values of a tenant's declared extension attributes, checked and coerced by their schema.

A declared attribute's value is checked against its type (RFC 7643 §2.3) and kept in its
canonical form: the URN and attribute names spelt as declared, booleans from "True"/"False"
(Entra's), a single value of a multi-valued attribute as a list of one. Anything else is a 400
invalidValue naming the attribute, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from domain.schema import is_extension_urn
from infra.schemas import unique_indexed
from service.errors import ScimError, invalid_value

Declared = dict[str, dict[str, Any]]  # case-folded URN -> schema


def declared_for(declarations: Iterable[Any], resource_type: str) -> Declared:
    """The schemas a tenant declares for one resource type (Principal.declared)."""
    return {
        d["schema"]["id"].casefold(): d["schema"]
        for d in declarations
        if d["resourceType"] == resource_type
    }


def coerce_declared(state: Mapping[str, Any], declared: Declared) -> dict[str, Any]:
    """`state` (a user state, or a group's extensions) with its declared extensions checked
    and in canonical form; other keys as they are."""
    if not declared:
        return dict(state)
    out: dict[str, Any] = {}
    for key, value in state.items():
        schema = declared.get(key.casefold()) if is_extension_urn(key) else None
        if schema is None:
            out[key] = value
            continue
        if not isinstance(value, Mapping):
            raise invalid_value(f"{schema['id']} must be an object of attributes")
        out[schema["id"]] = _object(value, schema["attributes"], schema["id"], ":")
    return out


def _object(
    value: Mapping[str, Any], attributes: list[dict[str, Any]], where: str, separator: str
) -> dict[str, Any]:
    specs = {a["name"].casefold(): a for a in attributes}
    out: dict[str, Any] = {}
    for name, item in value.items():
        spec = specs.get(name.casefold()) if isinstance(name, str) else None
        if spec is None:
            raise invalid_value(f"{where}{separator}{name} is not an attribute of {where}")
        label = f"{where}{separator}{spec['name']}"
        if item is None or item == "" or item == [] or spec.get("mutability") == "readOnly":
            continue  # RFC 7644 §3.5.1: values a client sends for readOnly SHALL be ignored
        if spec["multiValued"]:
            items = item if isinstance(item, list) else [item]
            out[spec["name"]] = [_value(v, spec, label) for v in items]
        else:
            if isinstance(item, list):
                raise invalid_value(f"{label} is single-valued, not a list")
            out[spec["name"]] = _value(item, spec, label)
    # RFC 7643 §2.2 `required`, where the resource carries this extension (or complex value):
    # users recorded before a declaration are not refused for an extension they do not have.
    missing = [
        a["name"]
        for a in attributes
        if a.get("required") and a.get("mutability") != "readOnly" and a["name"] not in out
    ]
    if out and missing:
        raise invalid_value(f"{where}{separator}{missing[0]} is required")
    return out


_BOOLEANS = {"true": True, "false": False}


def _value(value: Any, spec: Mapping[str, Any], label: str) -> Any:
    kind = spec["type"]
    if kind in ("string", "reference"):
        if isinstance(value, str):
            return value
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().casefold() in _BOOLEANS:
            return _BOOLEANS[value.strip().casefold()]
    elif kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "decimal":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    elif kind == "dateTime":
        if isinstance(value, str):
            try:
                datetime.fromisoformat(value.replace("Z", "+00:00"))
                return value
            except ValueError:
                pass
    elif kind == "complex" and isinstance(value, Mapping):
        return _object(value, spec.get("subAttributes", []), label, ".")
    raise invalid_value(f"{label} must be a {kind}, not {str(value)[:100]!r}")


def hidden(declarations: Iterable[Any], resource_type: str, attributes: str | None) -> list[str]:
    """Full names of declared attributes a reply leaves out: `returned: never` and
    `mutability: writeOnly` always (RFC 7643 §2.2), `returned: request` unless `attributes`
    names it (or its schema)."""
    asked = {path.strip().casefold() for path in (attributes or "").split(",")}
    out: list[str] = []
    for schema in declared_for(declarations, resource_type).values():
        for attribute in schema["attributes"]:
            name = f"{schema['id']}:{attribute['name']}"
            returned = attribute.get("returned")
            if (
                returned == "never"
                or attribute.get("mutability") == "writeOnly"
                or (
                    returned == "request"
                    and name.casefold() not in asked
                    and schema["id"].casefold() not in asked
                )
            ):
                out.append(name)
    return out


def excluding(excluded: str | None, names: list[str]) -> str | None:
    """An excludedAttributes value that also leaves out `names`."""
    if not names:
        return excluded
    return ",".join([*([excluded] if excluded else []), *names])


def unique_attributes(declared: Declared) -> list[tuple[str, str, bool, str]]:
    """(URN, attribute, caseExact, type) of the declared attributes whose values are unique in
    the tenant: single-valued ones of a simple type with `uniqueness: server` or `global`,
    each behind a unique index (infra/schemas.py)."""
    return [
        (schema["id"], name, case_exact, kind)
        for schema in declared.values()
        for name, case_exact, kind in unique_indexed(schema)
    ]


def check_immutable(
    before: Mapping[str, Any], after: Mapping[str, Any], declared: Declared
) -> None:
    """400 mutability when a write changes or clears a declared `mutability: immutable`
    attribute that already has a value (RFC 7644 §3.5.1: once set, the input must match).
    `before` and `after`: a user state, or a group's extensions."""
    if not declared:
        return
    for key, value in before.items():
        schema = declared.get(key.casefold()) if is_extension_urn(key) else None
        if schema is None or not isinstance(value, Mapping):
            continue
        immutable = [a for a in schema["attributes"] if a.get("mutability") == "immutable"]
        new = _by_urn(after, key) if immutable else {}
        for attribute in immutable:
            old = _by_name(value, attribute["name"])
            if old is not None and _by_name(new, attribute["name"]) != old:
                raise ScimError(
                    400,
                    f"{schema['id']}:{attribute['name']} is immutable: it was set to"
                    f" {str(old)[:100]!r} and cannot be changed",
                    "mutability",
                )


def _by_urn(state: Mapping[str, Any], urn: str) -> Mapping[str, Any]:
    for key, value in state.items():
        if key.casefold() == urn.casefold() and isinstance(value, Mapping):
            return value
    return {}


def _by_name(values: Mapping[str, Any], name: str) -> Any:
    for key, value in values.items():
        if key.casefold() == name.casefold():
            return value
    return None
