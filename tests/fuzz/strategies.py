"""Hypothesis strategies for hostile SCIM requests.

Every strategy mixes valid input (what Entra sends), near-valid input (one thing wrong) and
garbage. Ids of resources that exist are not known while examples are drawn, so bodies, paths
and filters carry placeholders that the harness fills in when it sends the request:
`@@U3@@` is the id of the 4th user created so far (modulo how many exist), `@@G1@@` a group's,
`@@N@@` a fresh random UUID, `@@Q@@` a fresh unique token.
"""

from __future__ import annotations

import base64
import json
import random
import string
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
AD_GROUP = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"

# Strings that broke parsers somewhere once: NUL, unpaired surrogates, bidi and BOM marks,
# SQL and LIKE metacharacters, JSON look-alikes, case-folding oddities.
NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x\udc80y",
    "\ud83d\ude00",
    "\U0010ffff",
    "é",
    "\u202e",
    "\ufeff",
    "\u2028",
    "\x7f",
    "\\",
    '"',
    "'",
    "%",
    "_",
    "' OR 1=1 --",
    "$1",
    "null",
    "true",
    "True",
    "1e309",
    "-0",
    "\n",
    "\t",
    "\uff21\uff22\uff23",  # fullwidth ABC
    "İ",
    "ß",
    "{}",
    "[]",
    "@@N@@",
    "not-a-uuid",
    "00000000-0000-0000-0000-000000000000",
]


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in n draws (hypothesis favours 0 and the bounds, so not `== 0`)."""
    return st.integers(0, n - 1).map(lambda k: k == n // 2)


_any_char = st.characters(exclude_categories=())  # surrogates and controls included


def _noise(n: int, seed: int) -> str:
    """n characters that do not compress (PostgreSQL compresses long values before indexing
    them, so "x" * 9000 fits an index entry and a random 3000 characters do not)."""
    return "".join(random.Random(seed).choices(string.ascii_letters + string.digits, k=n))


huge = st.one_of(
    st.sampled_from([300, 2_800, 9_000, 70_000]).flatmap(
        lambda n: st.sampled_from(["x" * n, "é" * n, ("ab\x00" * n)[:n], "\U0001f600" * (n // 4)])
    ),
    st.tuples(st.sampled_from([1_000, 2_700, 4_000, 20_000]), st.integers(0, 2**32)).map(
        lambda t: _noise(*t)
    ),
)
text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(NASTY),
    st.text(alphabet=_any_char, max_size=8),
    huge,
)
short_text = st.one_of(st.text(max_size=12), st.sampled_from(NASTY))
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)

USER_KEYS = [
    "schemas",
    "id",
    "meta",
    "userName",
    "externalId",
    "displayName",
    "nickName",
    "title",
    "active",
    "name",
    "emails",
    "phoneNumbers",
    "addresses",
    "roles",
    "manager",
    "groups",
    ENTERPRISE,
    f"{ENTERPRISE}:department",
    "name.givenName",
    "USERNAME",
    "Emails",
]
GROUP_KEYS = ["schemas", "id", "meta", "displayName", "externalId", "members", "DISPLAYNAME"]
PATCH_KEYS = ["schemas", "Operations", "operations", "op", "path", "value"]
keys = st.one_of(st.sampled_from(USER_KEYS + GROUP_KEYS + PATCH_KEYS), short_text)

json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)


def _ids(kind: str) -> st.SearchStrategy[str]:
    """A placeholder for an existing resource id, or some other id."""
    return st.one_of(
        st.integers(0, 50).map(lambda k: f"@@{kind}{k}@@"),
        st.integers(0, 50).map(lambda k: f"@@{kind}{k}@@"),
        st.integers(0, 50).map(lambda k: f"@@{'G' if kind == 'U' else 'U'}{k}@@"),
        st.just("@@N@@"),
        short_text,
    )


user_ids = _ids("U")
group_ids = _ids("G")


@st.composite
def mutated(draw: st.DrawFn, value: Any, key_pool: list[str]) -> Any:
    """`value` (an object) with 0-3 things wrong: a key dropped, retyped, recased, nested."""
    if not isinstance(value, dict):
        return value
    body = dict(value)
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["drop", "set", "case", "nest", "dup"]))
        key = draw(st.sampled_from(sorted(body) or key_pool))
        if what == "drop":
            body.pop(key, None)
        elif what == "set":
            body[draw(st.one_of(st.just(key), st.sampled_from(key_pool)))] = draw(json_values)
        elif what == "case" and key in body:
            body[key.swapcase()] = body.pop(key)
        elif what == "nest":
            body[key] = [body.get(key)]
        elif what == "dup":
            body[key.upper()] = draw(json_values)
    return body


# -- users ---------------------------------------------------------------------------------


def _items(value: st.SearchStrategy[Any]) -> st.SearchStrategy[list[dict[str, Any]]]:
    item = st.fixed_dictionaries(
        {"value": value},
        optional={
            "type": st.sampled_from(["work", "home", "other", "mobile", "Work"]),
            "primary": st.one_of(st.booleans(), st.sampled_from(["True", "False", "yes"])),
            "display": short_text,
        },
    )
    return st.lists(item, max_size=3)


user_names = st.one_of(
    st.integers(0, 10**9).map(lambda n: f"fuzz{n}@contoso.com"),
    st.integers(0, 30).map(lambda n: f"dup{n}@contoso.com"),  # collide on purpose
    text,
)


# @@Q@@ becomes a fresh value on every send: hypothesis replays near-identical examples, and
# a valid create should not turn into a 409 because of that.
unique_names = st.just("u@@Q@@@contoso.com")
words = st.text(alphabet=string.ascii_letters + " -'é", min_size=1, max_size=16)


@st.composite
def valid_user_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """What Entra sends on a create or a PUT, with valid values throughout."""
    name = draw(unique_names)
    body: dict[str, Any] = {
        "schemas": [USER, ENTERPRISE],
        "externalId": "@@Q@@",
        "userName": name,
        "active": draw(st.sampled_from([True, False, "True", "False"])),
        "displayName": draw(words),
        "emails": [{"primary": True, "type": "work", "value": name}],
        "name": {"givenName": draw(words), "familyName": draw(words)},
        "addresses": None,
        "manager": None,
    }
    if draw(st.booleans()):
        body[ENTERPRISE] = {
            "department": draw(words),
            "employeeNumber": str(draw(st.integers(0, 99999))),
        }
    if draw(one_in(3)):
        body[ENTERPRISE] = {**body.get(ENTERPRISE, {}), "manager": {"value": "@@U1@@"}}
    if draw(st.booleans()):
        body["phoneNumbers"] = [{"type": "mobile", "value": str(draw(st.integers(0, 10**9)))}]
    return body


@st.composite
def user_bodies(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        valid = draw(valid_user_bodies())
        return draw(st.one_of(st.just(valid), mutated(valid, USER_KEYS)))
    return draw(hostile_user_bodies())


@st.composite
def hostile_user_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {
        "schemas": draw(
            st.one_of(
                st.just([USER, ENTERPRISE]),
                st.just([USER]),
                st.lists(st.one_of(st.sampled_from([USER, GROUP, PATCH_OP]), short_text)),
                json_values,
            )
        ),
        "userName": draw(user_names),
    }
    optional = {
        "externalId": text,
        "displayName": text,
        "active": st.one_of(st.booleans(), st.sampled_from(["True", "False", "false", "0"])),
        "name": st.fixed_dictionaries(
            {}, optional={"givenName": text, "familyName": text, "formatted": short_text}
        ),
        "emails": _items(st.one_of(user_names, text)),
        "phoneNumbers": _items(short_text),
        "addresses": st.lists(
            st.fixed_dictionaries({"type": short_text, "locality": text, "primary": scalars}),
            max_size=2,
        ),
        "roles": st.lists(json_values, max_size=2),
        "manager": st.one_of(st.none(), user_ids, st.fixed_dictionaries({"value": user_ids})),
        ENTERPRISE: st.fixed_dictionaries(
            {},
            optional={
                "department": text,
                "employeeNumber": st.one_of(text, numbers),
                "manager": st.one_of(
                    user_ids,
                    st.fixed_dictionaries({"value": user_ids}),
                    st.lists(st.fixed_dictionaries({"value": user_ids}), max_size=2),
                ),
            },
        ),
        "groups": st.lists(st.fixed_dictionaries({"value": group_ids}), max_size=2),
        "id": user_ids,
        "meta": json_values,
    }
    for key in draw(st.sets(st.sampled_from(sorted(optional)), max_size=6)):
        body[key] = draw(optional[key])
    return draw(st.one_of(st.just(body), mutated(body, USER_KEYS), json_values))


# -- groups --------------------------------------------------------------------------------

member_refs = st.one_of(
    st.fixed_dictionaries(
        {"value": st.one_of(user_ids, group_ids)},
        optional={"display": short_text, "type": st.sampled_from(["User", "Group", "x"])},
    ),
    user_ids,
    json_values,
)


@st.composite
def group_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {
        "schemas": draw(st.one_of(st.just([GROUP]), st.just([GROUP, AD_GROUP]), json_values)),
        "displayName": draw(st.one_of(st.just("Fuzz Group @@Q@@"), text, scalars)),
    }
    if draw(st.booleans()):
        body["externalId"] = draw(st.one_of(text, scalars))
    if draw(st.booleans()):
        body["members"] = draw(st.one_of(st.lists(member_refs, max_size=5), json_values))
    return draw(st.one_of(st.just(body), mutated(body, GROUP_KEYS), json_values))


# -- filters -------------------------------------------------------------------------------

FILTER_ATTRIBUTES = [
    "userName",
    "UserName",
    "displayName",
    "externalId",
    "id",
    "active",
    "title",
    "emails",
    "emails.value",
    "emails.type",
    "emails.primary",
    "phoneNumbers.value",
    "addresses.locality",
    "name.givenName",
    "name.familyName",
    "name",
    "meta.created",
    "meta.lastModified",
    "meta.resourceType",
    "meta",
    "members",
    "members.value",
    "members.type",
    "manager",
    "manager.value",
    "employeeNumber",
    f"{USER}:userName",
    f"{ENTERPRISE}:employeeNumber",
    f"{ENTERPRISE}:manager.value",
    f"{GROUP}:displayName",
    "urn:bogus:attr",
    "emails.bogus",
    "nosuch",
    "x.y.z",
]
COMPARE_OPS = ["eq", "ne", "co", "sw", "ew", "gt", "lt", "ge", "le", "EQ", "Sw", "xx", "=="]
filter_values = st.one_of(
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "True",
            "1",
            "-1.5",
            "1e309",
            '"2026-01-01T00:00:00Z"',
            '"0001-01-01T00:00:00+05:00"',
            '"9999-12-31T23:59:59-05:00"',
            '"0000-01-01T00:00:00Z"',
            '"99999-01-01T00:00:00Z"',
            '"work"',
            '"User"',
            '"@@U1@@"',
            '"@@G0@@"',
            '"@@N@@"',
            '""',
            '"\\"',
            "unquoted",
        ]
    ),
    text.map(lambda s: json.dumps(s)),  # escapes as JSON does (\u0000, \ud800)
    short_text,
)


@st.composite
def comparisons(draw: st.DrawFn) -> str:
    attribute = draw(st.one_of(st.sampled_from(FILTER_ATTRIBUTES), short_text))
    if draw(one_in(6)):
        return f"{attribute} pr"
    return f"{attribute} {draw(st.sampled_from(COMPARE_OPS))} {draw(filter_values)}"


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        children.map(lambda f: f"({f})"),
        children.map(lambda f: f"not ({f})"),
        st.tuples(children, st.sampled_from(["and", "or", "AND", "xor"]), children).map(" ".join),
        st.tuples(st.sampled_from(["emails", "members", "addresses", "name", "x"]), children).map(
            lambda t: f"{t[0]}[{t[1]}]"
        ),
        children.map(lambda f: f'emails[type eq "work"].value eq "{f[:8]}"'),
    )


filters_valid = st.recursive(comparisons(), _combine, max_leaves=6)


@st.composite
def mutate_text(draw: st.DrawFn, value: str) -> str:
    """Insert, delete, replace or duplicate characters; truncate; nest deeply."""
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "dup", "deep"]))
        at = draw(st.integers(0, len(value)))
        if what == "insert":
            value = value[:at] + draw(st.sampled_from('()[]"\\ .:,')) + value[at:]
        elif what == "delete":
            value = value[:at] + value[at + 1 :]
        elif what == "replace":
            value = value[:at] + draw(st.text(alphabet=_any_char, max_size=2)) + value[at + 1 :]
        elif what == "truncate":
            value = value[:at]
        elif what == "dup":
            value = value + " and " + value
        else:
            depth = draw(st.sampled_from([20, 33, 200, 3000]))
            value = "(" * depth + value + ")" * depth
    return value


filters = st.one_of(filters_valid, filters_valid.flatmap(mutate_text), text)

# -- PATCH ---------------------------------------------------------------------------------

USER_PATHS = [
    "displayName",
    "userName",
    "externalId",
    "title",
    "active",
    "name",
    "name.givenName",
    "name.bogus",
    "emails",
    'emails[type eq "work"].value',
    'emails[type eq "work"]',
    'emails[value eq "@@U1@@"].primary',
    'emails[type eq "work" and primary eq true].value',
    'phoneNumbers[type eq "mobile"].value',
    'addresses[type eq "work"].locality',
    "addresses",
    "roles",
    "manager",
    "manager.value",
    f"{ENTERPRISE}:manager",
    f"{ENTERPRISE}:department",
    f"{ENTERPRISE}:employeeNumber",
    ENTERPRISE,
    f"{USER}:displayName",
    "urn:bogus:thing",
    "id",
    "meta.created",
    "groups",
    "members",
]
GROUP_PATHS = [
    "members",
    'members[value eq "@@U1@@"]',
    'members[value eq "@@U2@@" or value eq "@@G0@@"]',
    'members[display eq "x"]',
    "displayName",
    "externalId",
    f"{GROUP}:members",
    f"{GROUP}:displayName",
    "id",
    "meta",
    "schemas",
    "bogus",
]
OP_NAMES = st.one_of(
    st.sampled_from(["add", "replace", "remove", "Add", "Replace", "Remove", "REMOVE"]),
    short_text,
    json_values,
)
patch_values = st.one_of(
    json_values,
    st.lists(member_refs, max_size=4),
    st.fixed_dictionaries({"value": st.one_of(user_ids, text)}),
    st.dictionaries(st.sampled_from(USER_KEYS + USER_PATHS + GROUP_KEYS), json_values, max_size=4),
)


@st.composite
def operations(draw: st.DrawFn) -> Any:
    operation: dict[str, Any] = {"op": draw(OP_NAMES)}
    if draw(st.integers(0, 4)):
        operation["path"] = draw(
            st.one_of(
                st.sampled_from(USER_PATHS + GROUP_PATHS),
                st.sampled_from(USER_PATHS + GROUP_PATHS).flatmap(mutate_text),
                filters,
                json_values,
            )
        )
    if draw(st.integers(0, 5)):
        operation["value"] = draw(patch_values)
    return draw(st.one_of(st.just(operation), mutated(operation, PATCH_KEYS), json_values))


ENTRA_USER_OPS = st.one_of(
    st.tuples(st.just("displayName"), words),
    st.tuples(st.just("title"), st.one_of(words, st.just(""))),
    st.tuples(st.just("active"), st.sampled_from(["False", "True", False, True])),
    st.tuples(st.just('emails[type eq "work"].value'), unique_names),
    st.tuples(st.just("name.givenName"), words),
    st.tuples(st.just(f"{ENTERPRISE}:department"), words),
    st.tuples(st.just(f"{ENTERPRISE}:manager"), st.just("@@U2@@")),
    st.tuples(st.just("userName"), unique_names),
    st.tuples(st.just('phoneNumbers[type eq "mobile"].value'), st.integers(0, 10**6).map(str)),
).map(lambda t: {"op": "Replace", "path": t[0], "value": t[1]})
ENTRA_NO_PATH_OPS = st.dictionaries(
    st.sampled_from(["displayName", "name.familyName", f"{ENTERPRISE}:costCenter", "title"]),
    words,
    min_size=1,
).map(lambda v: {"op": "replace", "value": v})
ENTRA_GROUP_OPS = st.one_of(
    st.tuples(st.sampled_from(["Add", "Remove"]), st.integers(0, 50)).map(
        lambda t: {"op": t[0], "path": "members", "value": [{"value": f"@@U{t[1]}@@"}]}
    ),
    words.map(lambda w: {"op": "Replace", "path": "displayName", "value": f"Group {w}"}),
)


@st.composite
def patch_bodies(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        # The shapes Entra sends (for a user or a group: the other kind answers 400).
        valid = st.one_of(ENTRA_USER_OPS, ENTRA_NO_PATH_OPS, ENTRA_GROUP_OPS)
        return {"schemas": [PATCH_OP], "Operations": draw(st.lists(valid, min_size=1, max_size=3))}
    body = {
        "schemas": draw(st.one_of(st.just([PATCH_OP]), st.just([PATCH_OP.upper()]), json_values)),
        "Operations": draw(st.one_of(st.lists(operations(), max_size=4), json_values)),
    }
    return draw(st.one_of(st.just(body), mutated(body, PATCH_KEYS), json_values))


# -- list queries --------------------------------------------------------------------------

int_params = st.one_of(
    st.integers(-5, 200).map(str),
    st.sampled_from(["0", "-0", "1e3", "10" * 20, "9" * 5000, "0x10", " 5", "", "abc"]),
    st.sampled_from([str(2**63 - 1), str(2**63), str(2**64), str(10**39), str(-(2**63))]),
    st.integers(-(2**70), 2**70).map(str),
    short_text,
)
attribute_lists = st.one_of(
    st.lists(st.sampled_from([*FILTER_ATTRIBUTES, "groups", "members", "schemas"]), max_size=4).map(
        ",".join
    ),
    text,
)
# Cursors shaped like ours (base64url of [created, id]) with extreme or wrong parts.
forged_cursors = st.tuples(
    st.one_of(
        st.sampled_from(
            [
                "2026-01-01T00:00:00+00:00",
                "2026-01-01",
                "0001-01-01T00:00:00+14:00",
                "9999-12-31T23:59:59-14:00",
                "0001-01-01T00:00:00",
                "24:00",
            ]
        ),
        short_text,
        json_values,
    ),
    st.one_of(st.just("00000000-0000-0000-0000-000000000000"), json_values),
).map(
    lambda t: (
        base64.urlsafe_b64encode(json.dumps(list(t)).encode("utf-8", "surrogatepass"))
        .decode()
        .rstrip("=")
    )
)
QUERY_PARAMS = {
    "filter": filters,
    "count": int_params,
    "startIndex": int_params,
    "sortBy": st.one_of(st.sampled_from(FILTER_ATTRIBUTES), text),
    "sortOrder": st.one_of(st.sampled_from(["ascending", "descending", "DESCENDING"]), short_text),
    "attributes": attribute_lists,
    "excludedAttributes": attribute_lists,
    "cursor": st.one_of(
        st.just(""),
        st.sampled_from(["WyJ4IiwieSJd", "W10", "bnVsbA", "WzEsMl0", "!!!", "=" * 5]),
        forged_cursors,
        text,
    ),
    "count ": int_params,
    "bogus": short_text,
}
# Sensible values, so that one hostile parameter is not hidden behind another's 400.
SANE_PARAMS = {
    "filter": st.sampled_from(
        [
            'userName eq "u1@contoso.com"',
            'displayName sw "a"',
            "active eq true",
            'emails[type eq "work"].value co "@"',
            'members.value eq "@@U0@@"',
            'meta.lastModified gt "2020-01-01T00:00:00Z"',
        ]
    ),
    "count": st.integers(0, 20).map(str),
    "startIndex": st.integers(1, 20).map(str),
    "sortBy": st.sampled_from(["userName", "displayName", "meta.created", "externalId"]),
    "sortOrder": st.sampled_from(["ascending", "descending"]),
    "attributes": st.sampled_from(["userName", "displayName,members", "emails.value"]),
    "excludedAttributes": st.sampled_from(["members", "groups", "name.givenName"]),
}


@st.composite
def query_params(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A few parameters: one of them hostile, the others mostly sensible."""
    names = draw(st.lists(st.sampled_from(sorted(QUERY_PARAMS)), max_size=4, unique=True))
    hot = draw(st.sampled_from(names)) if names else None
    out = []
    for name in names:
        hostile = name == hot or name not in SANE_PARAMS or draw(one_in(4))
        out.append((name, draw(QUERY_PARAMS[name] if hostile else SANE_PARAMS[name])))
    return out


@st.composite
def search_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {"schemas": [SEARCH]}
    for name, value in draw(query_params()):
        body[name.strip()] = draw(st.one_of(st.just(value), json_values))
    return draw(st.one_of(st.just(body), mutated(body, list(QUERY_PARAMS)), json_values))


# -- whole requests ------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str  # may hold placeholders; percent-encoded by the harness
    query: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _dumps(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii escapes NUL and unpaired surrogates as \u0000 / \ud800: valid JSON text.
    # Without it, surrogates reach the bytes raw (surrogatepass): invalid UTF-8 on purpose.
    dumped = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    return dumped.encode("utf-8", "surrogatepass")


@st.composite
def encoded(draw: st.DrawFn, value: Any) -> bytes:
    """JSON bytes of `value`, sometimes broken: truncated, bad bytes, BOM, deep nesting."""
    raw = _dumps(value, draw(st.integers(0, 4)) > 0)
    if draw(st.booleans()):
        return raw
    what = draw(st.integers(0, 12))
    if what == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif what == 1:
        at = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\x00", b"\xc3", b"}", b"\\u"]))
        raw = raw[:at] + bad + raw[at:]
    elif what == 2:
        raw = b"\xef\xbb\xbf" + raw
    elif what == 3:
        depth = draw(st.sampled_from([100, 1_000, 1_100, 20_000]))
        raw = (b'{"a":' * depth) + b"1" + (b"}" * depth) if draw(st.booleans()) else b"[" * depth
    elif what == 4:
        raw = draw(st.sampled_from([b"", b"null", b"[]", b'""', b"0", b"NaN", b"\x00"]))
    return raw


IF_MATCH = st.one_of(
    st.integers(0, 12).map(lambda n: f'W/"{n}"'),
    st.sampled_from(["*", '"1"', "W/", 'W/"', ",", 'W/"1", W/"2"', "garbage", " "]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
CONTENT_TYPES = [
    "application/scim+json",
    "application/json",
    "application/scim+json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "garbage/",
]


# Bearer values no token has: non-ASCII, a line separator, a valid token with a tail. (aiohttp's
# client drops lone surrogates and refuses control characters, so invalid UTF-8 in a header is
# sent over a raw socket by tests/test_boundaries.py instead.)
CREDENTIALS = [
    "Bearer x",
    "Basic abc",
    "bearer",
    "",
    "Bearer é",
    "Bearer \u0100",
    "Bearer a\u2028b",
    "Bearer \udcff\udcfe",
    "Bearer @@A@@é",
]


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    out: dict[str, str] = {}
    if draw(st.integers(0, 3)):
        out["Content-Type"] = draw(st.sampled_from(CONTENT_TYPES))
    if draw(one_in(4)):
        out["If-Match"] = draw(IF_MATCH)
    if draw(one_in(6)):
        out["If-None-Match"] = draw(IF_MATCH)
    if draw(one_in(40)):
        out["Authorization"] = draw(st.sampled_from(CREDENTIALS))
    if draw(one_in(10)):
        out["X-Request-Id"] = draw(st.sampled_from(["../../etc", "a" * 200, "x y"]))
    return out


def _resource_path(kind: str) -> st.SearchStrategy[str]:
    ids = user_ids if kind == "Users" else group_ids
    return ids.map(lambda i: f"/scim/v2/{kind}/{i}")


@st.composite
def spelled(draw: st.DrawFn, path: str) -> str:
    """Sometimes the same path as clients also write it: the endpoint in another case, a
    trailing slash, a doubled one (a tenant URL ending in `/` joined with `/Users`)."""
    if not path.startswith("/scim/v2/") or not draw(one_in(4)):
        return path
    endpoint, sep, rest = path.removeprefix("/scim/v2/").partition("/")
    case = draw(st.sampled_from([str.lower, str.upper, str.swapcase, str]))
    slash = draw(st.sampled_from(["/", "//"]))
    return f"/scim/v2{slash}{case(endpoint)}{sep}{rest}" + draw(st.sampled_from(["", "/"]))


# -- the audit API: GETs with an audit token (the harness fills @@A@@) ----------------------

AUDIT_BEARER = "Bearer @@A@@"
timestamps = st.one_of(
    st.sampled_from(
        [
            "2026-01-01T00:00:00Z",
            "0001-01-01T00:00:00+05:00",  # year 0 in UTC
            "9999-12-31T23:59:59-05:00",  # year 10000 in UTC
            "0000-01-01T00:00:00Z",
            "99999-01-01T00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-13-01T00:00:00Z",
        ]
    ),
    short_text,
)
# Page tokens shaped like the API's own (base64url of [activity_at, transaction id]).
page_tokens = st.tuples(
    st.one_of(timestamps, json_values),
    st.one_of(st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 1e300, True]), numbers),
).map(lambda t: base64.urlsafe_b64encode(json.dumps(list(t)).encode()).decode().rstrip("="))
audit_text = st.one_of(st.sampled_from(NASTY), text)  # NUL and surrogates often
AUDIT_PARAMS = {
    "identity": audit_text,
    "changeId": audit_text,
    "errorCode": audit_text,
    "from": timestamps,
    "to": timestamps,
    "action": st.one_of(st.sampled_from(["create", "update", "delete", "other"]), short_text),
    "status": st.one_of(st.sampled_from(["success", "failure", "skipped"]), short_text),
    "target": st.one_of(user_ids, short_text),
    "limit": int_params,
    "next": st.one_of(page_tokens, short_text),
    "format": st.sampled_from(["csv", "jsonl", "xml", ""]),
}


@st.composite
def audit_requests(draw: st.DrawFn) -> Request:
    path = draw(
        st.sampled_from(
            [
                "/audit/v1/entries",
                "/audit/v1/export",
                "/audit/v1/entries/@@N@@",
                "/audit/v1/resources/@@U0@@/history",
                "/audit/v1/resources/@@U0@@",
            ]
        )
    )
    names = draw(
        st.lists(st.sampled_from(sorted(AUDIT_PARAMS)), min_size=1, max_size=3, unique=True)
    )
    query = [(name, draw(AUDIT_PARAMS[name])) for name in names]
    if path.endswith("@@U0@@"):
        query.append(("at", draw(timestamps)))
    return Request("GET", path, query, None, {"Authorization": AUDIT_BEARER})


@st.composite
def requests(draw: st.DrawFn) -> Request:
    if draw(one_in(6)):
        return draw(audit_requests())
    kind = draw(st.sampled_from(["Users", "Groups"]))
    bodies = user_bodies() if kind == "Users" else group_bodies()
    verb = draw(
        st.sampled_from(
            "create create get list list search put patch patch patch delete other".split()
        )
    )
    query: list[tuple[str, str]] = []
    body: Any = None
    if verb == "create":
        method, path, body = "POST", f"/scim/v2/{kind}", draw(bodies)
    elif verb == "get":
        method, path = "GET", draw(_resource_path(kind))
        query = draw(query_params())
    elif verb == "list":
        method, path, query = "GET", f"/scim/v2/{kind}", draw(query_params())
    elif verb == "search":
        method, path, body = "POST", f"/scim/v2/{kind}/.search", draw(search_bodies())
    elif verb == "put":
        method, path, body = "PUT", draw(_resource_path(kind)), draw(bodies)
    elif verb == "patch":
        method, path, body = "PATCH", draw(_resource_path(kind)), draw(patch_bodies())
        if draw(one_in(4)):
            query = draw(query_params())
    elif verb == "delete":
        method, path = "DELETE", draw(_resource_path(kind))
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]))
        path = draw(
            st.sampled_from(
                [
                    f"/scim/v2/{kind}",
                    f"/scim/v2/{kind}/.search",
                    f"/scim/v2/{kind}/@@U0@@/extra",
                    "/scim/v2/ServiceProviderConfig",
                    "/scim/v2/Schemas",
                    "/scim/v2/Schemas/urn:bogus",
                    "/scim/v2/ResourceTypes/User",
                    "/scim/v2/Bulk",
                    "/scim/v2/Me",
                    "/scim/v2/",
                    "/scim/v2/%00",
                ]
            )
        )
        body = draw(st.one_of(st.none(), json_values, bodies, patch_bodies()))
    raw = None if body is None and method in ("GET", "DELETE") else draw(encoded(body))
    return Request(method, draw(spelled(path)), query, raw, draw(headers()))
