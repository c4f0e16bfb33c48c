"""A tenant's declared extension attributes as filter and sortBy attributes.

A declared single-valued attribute of a simple type reads as the JSON value kept under its
declared spelling (coerce_declared writes the URN and name as declared): a string compares
with its declared `caseExact` (`lower()` on both sides when false), a number as a number, a
boolean as a boolean, a dateTime as an instant (its offset applied), and each sorts as its
type (infra/schemas.py, `typed_sql`). Multi-valued and complex ones are filtered like
undeclared attributes (service/scim/filter.py, `_undeclared`) and cannot be sortBy keys.

The URN and names are the operator's declaration, never a client's input; they reach SQL as
quoted literals (an expression index on the same expression can serve the lookup).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson

from infra.schemas import typed_sql
from service.scim.declared import Declared
from service.scim.sql_attributes import Attribute, AttributeMap, Kind

_KINDS = {
    "string": Kind.STRING,
    "reference": Kind.STRING,
    "boolean": Kind.BOOLEAN,
    "integer": Kind.NUMBER,
    "decimal": Kind.NUMBER,
    "dateTime": Kind.DATETIME,
}


def declared_attribute(column: str, urn: str, spec: Mapping[str, Any]) -> Attribute | None:
    kind = _KINDS.get(spec["type"])
    if spec.get("multiValued") or kind is None:
        return None
    sql = typed_sql(column, urn, spec["name"], spec["type"])
    return Attribute(spec["name"], kind, sql, case_exact=bool(spec.get("caseExact")))


def declared_tables(column: str, declared: Declared) -> dict[str, dict[str, Attribute]]:
    """URN -> lower-cased attribute name -> Attribute, for the attributes modelled here."""
    tables: dict[str, dict[str, Attribute]] = {}
    for schema in declared.values():
        table: dict[str, Attribute] = {}
        for spec in schema["attributes"]:
            attribute = declared_attribute(column, schema["id"], spec)
            if attribute is not None:
                table[spec["name"].lower()] = attribute
        tables[schema["id"]] = table
    return tables


def with_declared(attribute_map: AttributeMap, declared: Declared | None) -> AttributeMap:
    """The map with a tenant's declared extensions' attributes (over `map.undeclared`)."""
    if not declared or attribute_map.undeclared is None:
        return attribute_map
    # Built once per set of declarations (every request brings its tenant's, as data).
    key = (id(attribute_map), orjson.dumps(list(declared.values())))
    found = _DECLARED_MAPS.get(key)
    if found is None:
        if len(_DECLARED_MAPS) >= _MAX_DECLARED_MAPS:
            _DECLARED_MAPS.clear()
        tables = declared_tables(attribute_map.undeclared, declared)
        found = _DECLARED_MAPS[key] = dataclasses.replace(attribute_map, declared=tables)
    return found


_DECLARED_MAPS: dict[tuple[int, bytes], AttributeMap] = {}
_MAX_DECLARED_MAPS = 512
