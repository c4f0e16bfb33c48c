"""SETs as RFC 9967 shapes them: our claims against the RFC's own example SETs (a fixture),
built from domain events with no database."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from domain.group import Group
from domain.user import User
from service.feeds import sets

EXAMPLES: dict[str, Any] = {
    k: v
    for k, v in json.loads(
        (Path(__file__).parent / "fixtures" / "rfc9967_example_sets.json").read_text()
    ).items()
    if not k.startswith("_")
}
EXAMPLE_URIS = {uri for example in EXAMPLES.values() for uri in example["events"]}
EXAMPLE_CLAIMS = {claim for example in EXAMPLES.values() for claim in example}
ALL = frozenset(sets.EVENT_NAMES)


def _set(change: sets.Change, *, method: str | None, full: bool) -> dict[str, Any]:
    events = sets.payload_events(change, method=method, full=full, wanted=ALL)
    return sets.claims(
        issuer="https://scim.example.com/scim/v2",
        audience="https://scim.example.com/events/98d52461",
        jti=uuid.uuid4().hex,
        iat=1458505044,
        txn="b7b953f11cc6489bbfb87834747cc4c1",
        subject=sets.sub_id(change),
        events=events,
    )


def _pending(aggregate: Any) -> list[Any]:
    return list(aggregate.collect_events())


def _user_lifecycle() -> list[tuple[str | None, list[Any]]]:
    """(HTTP method, events of that one request) for create, put, patch, deactivate, delete."""
    uid = uuid.uuid4()
    user = User.provision(
        uid,
        uuid.uuid4(),
        {
            "userName": "jdoe",
            "externalId": "jdoe",
            "name": {"givenName": "John", "familyName": "Doe"},
            "emails": [{"type": "work", "value": "jdoe@example.com"}],
            "enterprise": {"department": "Sales"},
        },
    )
    requests: list[tuple[str | None, list[Any]]] = [("POST", _pending(user))]
    state = user.state
    state["title"] = "Boss"
    state["enterprise"] = {"department": "Ops"}
    user.update(state)
    requests.append(("PUT", _pending(user)))
    state = user.state
    state["emails"] = [{"type": "work", "value": "john@example.com"}]
    user.update(state)
    requests.append(("PATCH", _pending(user)))
    state = user.state
    state["active"] = False
    user.update(state)
    requests.append(("PATCH", _pending(user)))
    state = user.state
    state["active"] = True
    user.update(state)
    requests.append(("PATCH", _pending(user)))
    user.deprovision()
    requests.append(("DELETE", _pending(user)))
    return requests


def _all_sets(full: bool) -> list[dict[str, Any]]:
    out = []
    for method, events in _user_lifecycle():
        for change in sets.changes_of(events):
            out.append(_set(change, method=method, full=full))
    group = Group.create(uuid.uuid4(), uuid.uuid4(), "crm", "crmUsers")
    out += [_set(c, method="POST", full=full) for c in sets.changes_of(_pending(group))]
    group.change_membership([str(uuid.uuid4())], [])
    out += [_set(c, method="PATCH", full=full) for c in sets.changes_of(_pending(group))]
    return out


@pytest.mark.parametrize("full", [False, True])
def test_our_sets_use_the_rfc_claims_uris_and_subject_format(full: bool) -> None:
    produced = _all_sets(full)
    assert len(produced) == 8
    for token in produced:
        # §2.1: the subject is sub_id in the "scim" format, never `sub`.
        assert "sub" not in token
        assert set(token) <= EXAMPLE_CLAIMS | {"txn"}
        assert set(token) >= {"iss", "iat", "jti", "aud", "txn", "sub_id", "events"}
        subject = token["sub_id"]
        assert subject["format"] == "scim"
        assert re.fullmatch(r"/(Users|Groups)/[0-9a-f-]{36}", subject["uri"])
        assert set(subject) <= {"format", "uri", "externalId", "id"}
        for uri, payload in token["events"].items():
            assert uri in EXAMPLE_URIS or uri in sets.EVENT_URIS, uri
            # §2.2 and §2.4: the payload has the attribute names the RFC example for the
            # same URI has (version may be there or not), exactly one of data/attributes.
            example = next((e["events"][uri] for e in EXAMPLES.values() if uri in e["events"]),
                           None)
            if example is not None:
                assert set(payload) - {"version"} == set(example) - {"version"}, uri
            assert not ({"data", "attributes"} <= set(payload))
            if "version" in payload:
                assert re.fullmatch(r'W/"\d+"', payload["version"])


def test_the_lifecycle_gives_the_rfc_event_uris_in_order() -> None:
    notice = [sorted(t["events"]) for t in _all_sets(False)]
    p = sets.PREFIX
    assert notice == [
        [p + "prov:create:notice"],
        [p + "prov:put:notice"],
        [p + "prov:patch:notice"],
        [p + "prov:deactivate", p + "prov:patch:notice"],
        [p + "prov:activate", p + "prov:patch:notice"],
        [p + "prov:delete"],
        [p + "prov:create:notice"],
        [p + "prov:patch:notice"],
    ]
    full = [sorted(t["events"]) for t in _all_sets(True)]
    assert full[0] == [p + "prov:create:full"] and full[2] == [p + "prov:patch:full"]


def test_notice_names_the_changed_attributes_extension_ones_by_urn() -> None:
    produced = _all_sets(False)
    create = produced[0]["events"][sets.CREATE + ":notice"]["attributes"]
    assert create[0] == "id" and {"userName", "name", "emails", "externalId"} <= set(create)
    assert sets.ENTERPRISE_SCHEMA + ":department" in create
    put = produced[1]["events"][sets.PUT + ":notice"]["attributes"]
    assert sorted(put) == sorted(["title", sets.ENTERPRISE_SCHEMA + ":department"])
    assert produced[2]["events"][sets.PATCH + ":notice"]["attributes"] == ["emails"]


def test_full_form_carries_data_as_section_2_4_defines_it() -> None:
    produced = _all_sets(True)
    data = produced[0]["events"][sets.CREATE + ":full"]["data"]
    # §2.4.1: the created resource as the provider holds it, with its assigned id.
    assert data["userName"] == "jdoe" and data["id"] == produced[0]["sub_id"]["uri"][7:]
    assert data[sets.ENTERPRISE_SCHEMA] == {"department": "Sales"}
    # §2.4.2: a PatchOp as applied.
    patch = produced[2]["events"][sets.PATCH + ":full"]["data"]
    assert patch["schemas"] == [sets.PATCH_SCHEMA]
    assert patch["Operations"] == [
        {"op": "replace", "path": "emails", "value": [
            {"type": "work", "value": "john@example.com"}]}
    ]
    members = produced[7]["events"][sets.PATCH + ":full"]["data"]["Operations"]
    assert members[0]["op"] == "add" and members[0]["path"] == "members"
    assert produced[6]["sub_id"]["externalId"] == "crmUsers"


def test_a_stream_gets_only_the_events_it_names() -> None:
    method, events = _user_lifecycle()[3]  # the deactivating PATCH
    (change,) = sets.changes_of(events)
    only = sets.payload_events(
        change, method=method, full=False, wanted=frozenset({"prov:deactivate"})
    )
    assert list(only) == [sets.DEACTIVATE]
    none = sets.payload_events(
        change, method=method, full=False, wanted=frozenset({"prov:create"})
    )
    assert none == {}


def test_a_group_extension_change_is_a_patch_naming_the_attribute_by_urn() -> None:
    urn = "urn:ietf:params:scim:schemas:extension:CustomExtensionName:2.0:Group"
    group = Group.create(uuid.uuid4(), uuid.uuid4(), "crm", "crmUsers")
    _pending(group)
    group.update("crm", "crmUsers", {urn: {"CostCentre": "C-42"}})
    (change,) = sets.changes_of(_pending(group))
    notice = _set(change, method="PATCH", full=False)["events"][sets.PATCH + ":notice"]
    assert notice["attributes"] == [f"{urn}:CostCentre"]
    group.update("crm", "crmUsers", {})
    (change,) = sets.changes_of(_pending(group))
    assert change.operations == [{"op": "remove", "path": f"{urn}:CostCentre"}]
