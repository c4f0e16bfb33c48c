"""SCIM filters (RFC 7644 §3.4.2.2) and sortBy compiled to parameterised SQL.

scim2-models parses the filter; `FilterCompiler` walks its tree and emits a boolean SQL
expression over the row alias of an `AttributeMap` (`u` for the users view). Nothing the
client sends is ever spliced into the SQL: attribute names only select entries of the map,
whose SQL fragments are constants of this module (or, for a tenant's declared extension
attributes, quoted literals of what the operator declared: service/scim/declared_filter.py),
and every value becomes a `$n` parameter.

Semantics:
- Each comparison is a boolean that may be NULL for an absent attribute; NOT is compiled as
  `(...) IS NOT TRUE`, so NULL always reads as "does not match", also under negation.
- `ne` follows RFC 7644: an absent attribute is not equal to anything (`IS DISTINCT FROM`).
  On a multi-valued attribute (`emails.value ne "x"`) it holds when no value equals "x".
- `x eq null` means `not (x pr)` and `x ne null` means `x pr`.
- caseExact=false strings compare `lower()` on both sides (RFC 7643 §2.2, §8.7.1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from scim2_models import ScimFilter
from scim2_models.path import (
    AttrPath,
    CompareOperator,
    Comparison,
    FilterNode,
    FilterVisitor,
    LogicalExpr,
    LogicalOperator,
    Not,
    Path,
    Present,
    ValuePath,
)

from service.errors import ScimError
from service.scim.declared import Declared
from service.scim.declared_filter import with_declared
from service.scim.filter_values import (
    ValueComparisons,
    _check_text,
    _FilterError,
    _present,
    _present_json,
)
from service.scim.sql_attributes import (
    GROUP_ATTRIBUTES,
    USER_ATTRIBUTES,
    Attribute,
    AttributeMap,
    Kind,
    SqlParams,
)

__all__ = [
    "GROUP_ATTRIBUTES",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_LENGTH",
    "USER_ATTRIBUTES",
    "AttributeMap",
    "FilterCompiler",
    "SqlParams",
    "_FilterError",
    "compile_filter",
    "compile_sort",
    "group_filter_sql",
    "group_sort_sql",
    "user_filter_sql",
    "user_sort_sql",
]

MAX_FILTER_LENGTH = 4096
"""Longest filter accepted, in characters."""
MAX_FILTER_DEPTH = 32
"""Deepest nesting accepted, counting parentheses, brackets, not, and/or and value paths."""


def _check_nesting(expression: str) -> None:
    """Refuse brackets nested deeper than MAX_FILTER_DEPTH (outside string literals).

    scim2-models counts only not/and/or/value-path nodes, so `((((...))))` is otherwise
    unbounded.
    """
    depth = 0
    in_string = False
    escaped = False
    for char in expression:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "([":
            depth += 1
            if depth > MAX_FILTER_DEPTH:
                raise _FilterError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels")
        elif char in ")]":
            depth -= 1


def _parse_filter(expression: str) -> FilterNode:
    """Parse a filter with scim2-models; any failure is a _FilterError."""
    if len(expression) > MAX_FILTER_LENGTH:
        raise _FilterError(f"filter is longer than {MAX_FILTER_LENGTH} characters")
    _check_nesting(expression)
    try:
        return ScimFilter(expression).ast
    except RecursionError:
        raise _FilterError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels") from None
    except Exception as e:  # InvalidFilterException, or anything else the parser raises
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise _FilterError(f"invalid filter: {detail}") from None


def _and_terms(node: FilterNode) -> tuple[FilterNode, ...]:
    if isinstance(node, LogicalExpr) and node.op == LogicalOperator.and_:
        return node.terms
    return (node,)


class FilterCompiler(ValueComparisons, FilterVisitor[str]):
    """Compile a parsed filter into a SQL boolean expression, adding values to `params`.

    `scope` resolves attribute names: the resource's AttributeMap at the top, the
    sub-attributes of a value row inside `attr[...]`.
    """

    def __init__(self, attribute_map: AttributeMap, params: SqlParams) -> None:
        self.map = attribute_map
        self.params = params
        self._scope: Mapping[str, Attribute] | None = None  # inside a value path
        self._depth = 0
        self._aliases = 0

    def compile(self, expression: str) -> str:
        return self.visit(_parse_filter(expression))

    def visit(self, node: FilterNode) -> str:
        # Counted as scim2-models counts (and/or chains, not, value paths); it refuses
        # deeper trees itself, this keeps the recursion bounded for trees built otherwise.
        nests = isinstance(node, LogicalExpr | Not | ValuePath)
        self._depth += nests
        try:
            if self._depth > MAX_FILTER_DEPTH:
                raise _FilterError(f"filter is nested deeper than {MAX_FILTER_DEPTH} levels")
            return super().visit(node)
        finally:
            self._depth -= nests

    # --- resolution

    def _resolve(self, path: AttrPath) -> tuple[Attribute, Attribute | None]:
        """The attribute a path names and the sub-attribute, if any."""
        if self._scope is not None:
            found = None if path.uri or path.sub_attr else self._scope.get(path.attr.lower())
            if found is None:
                raise _FilterError(f"unknown sub-attribute in value filter: {path}")
            return found, None
        attribute = self.map.lookup(path)
        if attribute is None:
            raise _FilterError(f"unknown attribute in filter: {path}")
        if path.sub_attr is None:
            return attribute, None
        sub = attribute.sub(path.sub_attr)
        if sub is None:
            raise _FilterError(f"unknown attribute in filter: {path}")
        return attribute, sub

    def _alias(self) -> str:
        self._aliases += 1
        return f"v{self._aliases}"

    def _exists(self, attribute: Attribute, condition: Callable[[str], str]) -> str:
        """EXISTS over the values of a multi-valued attribute; `condition(alias)` → SQL."""
        assert attribute.source is not None
        alias = self._alias()
        source = attribute.source.replace("{alias}", alias)
        return f"EXISTS (SELECT 1 FROM {source} WHERE {condition(alias)})"

    # --- nodes

    def visit_logical_expr(self, node: LogicalExpr) -> str:
        joiner = " AND " if node.op == LogicalOperator.and_ else " OR "
        return "(" + joiner.join(self.visit(term) for term in node.terms) + ")"

    def visit_not(self, node: Not) -> str:
        return f"(({self.visit(node.expr)}) IS NOT TRUE)"

    def visit_present(self, node: Present) -> str:
        if self._is_undeclared(node.attr_path):
            return self._undeclared(node.attr_path, _present_json)
        attribute, sub = self._resolve(node.attr_path)
        if attribute.kind is not Kind.MULTI:
            return _present(sub or attribute)
        if sub is None:
            return self._exists(attribute, lambda alias: "TRUE")
        target = sub
        return self._exists(attribute, lambda alias: _present(target.bound(alias)))

    def visit_comparison(self, node: Comparison) -> str:
        if node.value is None:
            if node.op == CompareOperator.eq:
                return self.visit_not(Not(Present(node.attr_path)))
            if node.op == CompareOperator.ne:
                return self.visit_present(Present(node.attr_path))
            raise _FilterError(f"{node.op.value} cannot compare with null")
        if self._is_undeclared(node.attr_path):
            if node.op == CompareOperator.ne:
                equal = Comparison(node.attr_path, CompareOperator.eq, node.value)
                return f"(({self.visit_comparison(equal)}) IS NOT TRUE)"
            return self._undeclared(
                node.attr_path, lambda item: self._compare_json(item, node.op, node.value)
            )
        attribute, sub = self._resolve(node.attr_path)
        if attribute.kind is not Kind.MULTI:
            return self._compare(sub or attribute, node.op, node.value)
        # A comparison on a multi-valued complex attribute compares its "value" (RFC 7644
        # §3.4.2.2); it holds when some value matches, and ne when none is equal.
        target = sub or attribute.sub("value")
        if target is None:
            raise _FilterError(f"{attribute.name} has no value sub-attribute to compare")
        op = node.op
        negate = op == CompareOperator.ne
        if negate:
            op = CompareOperator.eq
        if (
            attribute.value_keys is not None
            and target.name == "value"
            and op == CompareOperator.eq
            and isinstance(node.value, str)
            and node.value
        ):
            condition = self._value_key(attribute, "*", node.value)
        else:
            condition = self._exists(
                attribute, lambda alias: self._compare(target.bound(alias), op, node.value)
            )
        return f"(({condition}) IS NOT TRUE)" if negate else condition

    def visit_value_path(self, node: ValuePath) -> str:
        if self._is_undeclared(node.attr_path):
            raise _FilterError(
                f"value filters on undeclared extension attributes are not supported: "
                f"{node.attr_path}"
            )
        attribute, sub = self._resolve(node.attr_path)
        if self._scope is not None:
            raise _FilterError("value filters cannot be nested")
        if sub is not None or node.sub_attr is not None:
            raise _FilterError(f"invalid value path on {node.attr_path}")
        if attribute.kind is Kind.MULTI:
            keyed = self._keyed_value_path(attribute, node.val_filter)
            if keyed is not None:
                return keyed
            return self._exists(attribute, lambda alias: self._inner(attribute, alias, node))
        if attribute.sub_attributes:  # e.g. manager[value eq "..."], name[givenName sw "a"]
            return self._inner(attribute, None, node)
        raise _FilterError(f"{attribute.name} is not a multi-valued attribute")

    def _inner(self, attribute: Attribute, alias: str | None, node: ValuePath) -> str:
        subs = attribute.sub_attributes
        if alias is not None:
            subs = {name: sub.bound(alias) for name, sub in subs.items()}
        self._scope = subs
        try:
            return self.visit(node.val_filter)
        finally:
            self._scope = None

    def _keyed_value_path(self, attribute: Attribute, val_filter: FilterNode) -> str | None:
        """`emails[type eq "work" and value eq "x"]` (and Entra's `emails[type eq "work"].value
        eq "x"`) as a lookup in the GIN-indexed keys, plus EXISTS for any other terms."""
        if attribute.value_keys is None:
            return None
        value: str | None = None
        type_: str | None = None
        rest = False
        for term in _and_terms(val_filter):
            if (
                isinstance(term, Comparison)
                and term.op == CompareOperator.eq
                and isinstance(term.value, str)
                and term.value
                and term.attr_path.uri is None
                and term.attr_path.sub_attr is None
            ):
                name = term.attr_path.attr.lower()
                if name == "value" and value is None:
                    value = term.value
                    continue
                if name == "type" and type_ is None and ":" not in term.value:
                    type_ = term.value
                    continue
            rest = True
        if value is None:
            return None
        condition = self._value_key(attribute, type_ or "*", value)
        # The keys join type and value with ":", so a value holding ":" is rechecked.
        if rest or (type_ is not None and ":" in value):
            node = ValuePath(AttrPath(attribute.name), val_filter)
            full = self._exists(attribute, lambda alias: self._inner(attribute, alias, node))
            condition = f"({condition} AND {full})"
        return condition

    def _value_key(self, attribute: Attribute, type_: str, value: str) -> str:
        # lower() in SQL, so the key is lower-cased exactly as the indexed function does.
        key = self.params.add(_check_text(f"{type_}:{value}"))
        return f"{attribute.value_keys} @> ARRAY[lower({key})]::text[]"


# --- the lookups identity providers send ---------------------------------------------------

# `userName eq "x"`, `externalId eq "x"`, `displayName eq "x"`: what Entra sends before every
# create. Written exactly so (one space each side of a lower-case `eq`, a plain attribute name,
# a quoted value without escapes or control characters) a filter is always valid, and is
# compiled without the parser by the same comparison code the parser's tree would reach.
_SIMPLE_EQ = re.compile(r'([A-Za-z][A-Za-z0-9_]*) eq "([^"\\\x00-\x1f]*)"')
# The same lookup on an extension attribute by its full name (`urn:…:2.0:User:badge`):
# the URN is everything before the last colon.
_SIMPLE_URN_EQ = re.compile(r'(urn:[!-~]+):([A-Za-z][A-Za-z0-9_-]*) eq "([^"\\\x00-\x1f]*)"')


def _simple_eq(attribute_map: AttributeMap, expression: str, params: SqlParams) -> str | None:
    """The SQL of an `attr eq "value"` filter on a string attribute; None for anything else."""
    if len(expression) > MAX_FILTER_LENGTH:
        return None
    match = _SIMPLE_EQ.fullmatch(expression)
    if match is not None:
        path, value = AttrPath(match[1]), match[2]
    elif attribute_map.declared and (match := _SIMPLE_URN_EQ.fullmatch(expression)):
        path, value = AttrPath(match[2], uri=match[1]), match[3]
    else:
        return None
    attribute = attribute_map.lookup(path)
    if attribute is None or attribute.kind is not Kind.STRING:
        return None
    return FilterCompiler(attribute_map, params)._compare_string(
        attribute, CompareOperator.eq, value
    )


# --- public API -------------------------------------------------------------------------


def compile_filter(attribute_map: AttributeMap, expression: str, params: SqlParams) -> str:
    """A SQL boolean expression for a SCIM filter; parameters are added only on success."""
    scratch = SqlParams(list(params.values))
    try:
        sql = _simple_eq(attribute_map, expression, scratch) or FilterCompiler(
            attribute_map, scratch
        ).compile(expression)
    except ScimError:
        raise
    except _FilterError as e:
        raise ScimError(400, str(e), "invalidFilter") from None
    except RecursionError:
        detail = f"filter is nested deeper than {MAX_FILTER_DEPTH} levels"
        raise ScimError(400, detail, "invalidFilter") from None
    except Exception as e:  # never a 500 for a filter
        raise ScimError(400, f"invalid filter: {e}", "invalidFilter") from None
    params.values.extend(scratch.values[len(params.values) :])
    return sql


def compile_sort(attribute_map: AttributeMap, sort_by: str) -> str:
    """The SQL expression to ORDER BY for sortBy; caseExact=false strings sort by lower()."""
    try:
        path = Path(sort_by.strip()).ast
    except Exception:
        path = None
    if not isinstance(path, AttrPath):
        raise ScimError(400, "sortBy must be an attribute name", "invalidValue")
    attribute = attribute_map.lookup(path)
    if attribute is not None and attribute.kind is not Kind.MULTI and path.sub_attr:
        attribute = attribute.sub(path.sub_attr)
    if attribute is None:
        raise ScimError(
            400,
            f"cannot sort by {path}: not an attribute with a single value of a simple type"
            " (multi-valued and complex attributes are no sort keys, RFC 7644 §3.4.2.3)",
            "invalidValue",
        )
    if attribute.kind in (Kind.MULTI, Kind.COMPLEX) or attribute.sql is None:
        raise ScimError(400, f"cannot sort by {path}: not a single value", "invalidValue")
    if attribute.kind is Kind.STRING and not attribute.case_exact:
        return f"lower({attribute.sql})"
    return attribute.sql


def user_filter_sql(expression: str, params: SqlParams, declared: Declared | None = None) -> str:
    """A SQL boolean expression over alias u; raises service.errors.ScimError(400, detail,
    "invalidFilter")."""
    return compile_filter(with_declared(USER_ATTRIBUTES, declared), expression, params)


def user_sort_sql(sort_by: str, declared: Declared | None = None) -> str:
    """SQL expression (no user data inlined) for sortBy; unknown/multi-valued attribute ->
    ScimError(400, ..., "invalidValue")."""
    return compile_sort(with_declared(USER_ATTRIBUTES, declared), sort_by)


def group_filter_sql(expression: str, params: SqlParams, declared: Declared | None = None) -> str:
    """A SQL boolean expression over alias g (scim_groups); 400 invalidFilter on error."""
    return compile_filter(with_declared(GROUP_ATTRIBUTES, declared), expression, params)


def group_sort_sql(sort_by: str, declared: Declared | None = None) -> str:
    return compile_sort(with_declared(GROUP_ATTRIBUTES, declared), sort_by)
