"""The costliest requests we know how to write, up to the 2 MiB body limit: many values of one
multi-valued attribute, long strings, deep nesting, many PATCH operations on one multi-valued
attribute, long value filters, many members. `worst()` lists each once (run by `make test`);
`requests()` draws them at random sizes for `make fuzz`, where the harness checks that no
request takes more than SCIMLEDGER_FUZZ_MAX_CPU seconds of CPU.

Ids are the harness's placeholders (@@U0@@, @@G0@@), filled in when sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import strategies as st

from tests.fuzz.strategies import GROUP, USER, Request

MiB = 1024 * 1024
FULL = 2 * MiB - 4096  # a body just under the default limit
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
MULTI = ("emails", "phoneNumbers", "roles", "entitlements", "x509Certificates", "addresses")
VALUES = 1000  # Settings.max_multi_values
MEMBERS = 10000  # Settings.max_patch_members


def _post(kind: str, body: dict[str, Any]) -> Request:
    return Request("POST", f"/scim/v2/{kind}", body=orjson.dumps(body))


def _patch(target: str, operations: list[dict[str, Any]]) -> Request:
    body = {"schemas": [PATCH_OP], "Operations": operations}
    return Request("PATCH", f"/scim/v2/{target}", body=orjson.dumps(body))


def _user(prefix: str, **attributes: Any) -> dict[str, Any]:
    return {"schemas": [USER], "userName": f"{prefix}-@@Q@@@contoso.com", **attributes}


def _value(attribute: str, i: int, width: int = 0) -> dict[str, Any]:
    pad = "a" * width
    if attribute == "addresses":
        return {"type": "work", "streetAddress": f"{i} Main St {pad}"}
    return {"type": "work", "value": f"v{i}{pad}@contoso.com"}


def _fitting(per_item: int) -> int:
    return FULL // per_item


def many_values(attribute: str, n: int, width: int = 0) -> Request:
    return _post(
        "Users", _user("many", **{attribute: [_value(attribute, i, width) for i in range(n)]})
    )


def long_string(length: int) -> Request:
    return _post("Users", _user("long", displayName="x" * length))


def nested(depth: int, copies: int) -> Request:
    one = b"[" * depth + b'"x"' + b"]" * depth
    head = orjson.dumps(_user("deep"))[:-1]
    return Request(
        "POST", "/scim/v2/Users", body=head + b',"roles":[' + b",".join([one] * copies) + b"]}"
    )


def many_keys(n: int) -> Request:
    return _post("Users", _user("keys", name={f"k{i}": "v" for i in range(n)}))


def filtered_patch(values: int, operations: int, terms: int = 1) -> Request:
    """One user's emails filled, then `operations` value-filtered operations matched on them."""
    ops: list[dict[str, Any]] = [
        {"op": "add", "path": "emails", "value": [_value("emails", i) for i in range(values)]}
    ]
    for i in range(operations):
        condition = " or ".join(f'value eq "v{i}-{j}@contoso.com"' for j in range(terms))
        ops.append({"op": "remove", "path": f"emails[{condition}].display"})
    return _patch("Users/@@U0@@", ops)


def listed_remove(values: int) -> Request:
    listed = [{"value": f"V{i}@CONTOSO.COM", "type": "x"} for i in range(values)]
    return _patch(
        "Users/@@U0@@",
        [
            {"op": "add", "path": "emails", "value": [_value("emails", i) for i in range(values)]},
            {"op": "remove", "path": "emails", "value": listed},
        ],
    )


def many_adds(operations: int, per_operation: int) -> Request:
    ops = [
        {
            "op": "add",
            "path": "roles",
            "value": [_value("roles", i * per_operation + j) for j in range(per_operation)],
        }
        for i in range(operations)
    ]
    return _patch("Users/@@U0@@", ops)


def long_paths(operations: int, length: int) -> Request:
    path = 'emails[value eq "' + "p" * max(0, length - 26) + '"].display'
    return _patch(
        "Users/@@U0@@",
        [{"op": "replace", "path": path + " " * (i % 2), "value": "d"} for i in range(operations)],
    )


def pathless_keys(n: int) -> Request:
    value = {f'emails[value eq "k{i}"].display': "d" for i in range(n)}
    return _patch("Users/@@U0@@", [{"op": "replace", "value": value}])


def members(n: int, distinct: bool) -> Request:
    ids = [
        f"@@U{i % 7}@@" if not distinct else f"00000000-0000-4000-8000-{i:012d}" for i in range(n)
    ]
    return _post(
        "Groups",
        {"schemas": [GROUP], "displayName": "g-@@Q@@", "members": [{"value": m} for m in ids]},
    )


def member_patches(operations: int, per_operation: int) -> Request:
    ops = [
        {
            "op": "add" if i % 2 else "remove",
            "path": "members",
            "value": [{"value": f"@@U{j % 7}@@"} for j in range(per_operation)],
        }
        for i in range(operations)
    ]
    return _patch("Groups/@@G0@@", ops)


def big_search(n: int) -> Request:
    return Request(
        "POST",
        "/scim/v2/Users/.search",
        body=orjson.dumps({"filter": "userName pr", **{f"x{i}": i for i in range(n)}}),
    )


def worst() -> list[Request]:
    """Each shape once, at the sizes that cost most: at, just past, and far past the limits."""
    return [
        many_values("emails", VALUES),
        many_values("emails", VALUES + 1),
        many_values("emails", 20_000),
        many_values("emails", _fitting(50)),
        many_values("addresses", VALUES, width=1900),
        long_string(65536),
        long_string(FULL),
        nested(31, 1),
        nested(1000, _fitting(2003)),
        nested(2, _fitting(8)),
        many_keys(_fitting(14)),
        filtered_patch(VALUES, 999),
        filtered_patch(VALUES, 999, terms=20),
        listed_remove(VALUES),
        many_adds(999, 1),
        many_adds(40, 25),
        long_paths(999, 1024),
        long_paths(999, 1025),
        pathless_keys(_fitting(48)),
        members(MEMBERS, distinct=False),
        members(_fitting(50), distinct=False),
        members(_fitting(50), distinct=True),
        member_patches(999, 38),
        big_search(_fitting(17)),
    ]


_SHAPES: list[tuple[Callable[[int], Request], int]] = [
    (lambda n: many_values("emails", n), _fitting(50)),
    (lambda n: many_values("roles", n, width=64), 4 * VALUES),
    (long_string, FULL),
    (lambda n: nested(1 + n % 1000, max(1, n)), 60_000),
    (many_keys, _fitting(14)),
    (lambda n: filtered_patch(min(n, VALUES), 999), 2 * VALUES),
    (lambda n: filtered_patch(VALUES, min(n, 999), terms=20), 999),
    (listed_remove, 2 * VALUES),
    (lambda n: many_adds(min(n, 999), 2), 999),
    (lambda n: long_paths(999, n), 1100),
    (pathless_keys, _fitting(48)),
    (lambda n: members(n, distinct=n % 2 == 0), _fitting(50)),
    (lambda n: member_patches(999, min(n, 38)), 38),
    (big_search, _fitting(17)),
]


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """One costly shape at a size from small to the most the body limit lets it have."""
    shape, most = draw(st.sampled_from(_SHAPES))
    size = draw(
        st.one_of(st.integers(1, most), st.just(most), st.sampled_from([VALUES, VALUES + 1]))
    )
    return shape(min(size, most))
