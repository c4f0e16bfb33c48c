"""SCIM User JSON to and from the canonical user state; attribute selection. Pure: no database."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from domain import InvalidValue, User
from service.errors import ScimError
from service.scim.representation import (
    ENTERPRISE_SCHEMA,
    USER_SCHEMA,
    select_attributes,
    user_document,
    user_from_scim,
    user_resource,
)

MANAGER_ID = "6f1c1f7e-2b8e-4f0e-9a53-4a3c1d2e5f60"
USER_ID = "2819c223-7f76-453a-919d-413861904646"
BASE = "https://scim.example.com/scim/v2"

# ENTRA.md: the POST /Users body, exactly as Entra sends it.
ENTRA_POST: dict[str, Any] = {
    "schemas": [
        "urn:ietf:params:scim:schemas:core:2.0:User",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User",
    ],
    "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
    "userName": "Test_User@contoso.com",
    "active": True,
    "addresses": None,
    "manager": None,
    "emails": [{"primary": True, "type": "work", "value": "Test_User@contoso.com"}],
    "meta": {"resourceType": "User"},
    "name": {
        "formatted": "givenName familyName",
        "familyName": "familyName",
        "givenName": "givenName",
    },
    "roles": [],
}

ENTRA_POST_STATE: dict[str, Any] = {
    "active": True,
    "emails": [{"primary": True, "type": "work", "value": "Test_User@contoso.com"}],
    "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
    "name": {
        "familyName": "familyName",
        "formatted": "givenName familyName",
        "givenName": "givenName",
    },
    "userName": "Test_User@contoso.com",
}

RICH_STATE: dict[str, Any] = User.normalise(
    {
        "userName": "bjensen@example.com",
        "active": False,
        "externalId": "bjensen",
        "displayName": "Babs Jensen",
        "nickName": "Babs",
        "title": "Tour Guide",
        "userType": "Employee",
        "preferredLanguage": "en-US",
        "locale": "en-US",
        "timezone": "America/Los_Angeles",
        "profileUrl": "https://login.example.com/bjensen",
        "name": {"givenName": "Barbara", "familyName": "Jensen", "middleName": "Jane"},
        "emails": [
            {"value": "bjensen@example.com", "type": "work", "primary": True},
            {"value": "babs@jensen.org", "type": "home"},
        ],
        "phoneNumbers": [{"value": "555-555-8377", "type": "work"}],
        "addresses": [
            {"streetAddress": "100 Universal City Plaza", "locality": "Hollywood", "type": "work"}
        ],
        "roles": [{"value": "Admin", "type": "WindowsAzureActiveDirectoryRole", "primary": False}],
        "enterprise": {"employeeNumber": "701984", "department": "Tour Operations"},
        "manager": MANAGER_ID,
    }
)


def invalid(excinfo: pytest.ExceptionInfo[ScimError]) -> tuple[int, str | None, str]:
    error = excinfo.value
    return error.status, error.scim_type, error.detail


# -- user_from_scim -----------------------------------------------------------------------


def test_entra_create_body_gives_the_canonical_state() -> None:
    assert User.normalise(user_from_scim(ENTRA_POST)) == ENTRA_POST_STATE


def test_the_body_is_not_changed() -> None:
    body = copy.deepcopy(ENTRA_POST)
    user_from_scim(body)
    assert body == ENTRA_POST


def test_read_only_unknown_and_null_attributes_are_ignored() -> None:
    body = {
        "userName": "a@contoso.com",
        "id": "not-ours",
        "meta": {"resourceType": "User", "created": "2020-01-01T00:00:00Z"},
        "groups": [{"value": "g1"}],
        "schemas": ["whatever"],
        "favouriteColour": "blue",
        "displayName": None,
        "nickName": "",
        "name": None,
        "emails": None,
        ENTERPRISE_SCHEMA: None,
    }
    # No default for `active` here: an absent one stays absent (the domain decides what that means).
    assert User.normalise(user_from_scim(body)) == {"userName": "a@contoso.com"}


def test_attribute_names_are_case_insensitive() -> None:
    body = {
        "UserName": "a@contoso.com",
        "DisplayName": "Alice",
        "ACTIVE": "False",
        "Name": {"GivenName": "Alice", "FAMILYNAME": "Smith"},
        "Emails": [{"Value": "a@contoso.com", "Type": "work", "Primary": "True"}],
        ENTERPRISE_SCHEMA.upper(): {"EmployeeNumber": "42", "Manager": {"Value": MANAGER_ID}},
    }
    assert User.normalise(user_from_scim(body)) == {
        "active": False,
        "displayName": "Alice",
        "emails": [{"primary": True, "type": "work", "value": "a@contoso.com"}],
        "enterprise": {"employeeNumber": "42"},
        "manager": MANAGER_ID,
        "name": {"familyName": "Smith", "givenName": "Alice"},
        "userName": "a@contoso.com",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, True),
        (False, False),
        ("True", True),
        ("False", False),
        ("true", True),
        ("false", False),
        ("FALSE", False),
    ],
)
def test_active_accepts_booleans_and_their_strings(raw: object, expected: bool) -> None:
    state = User.normalise(user_from_scim({"userName": "a", "active": raw}))
    assert state["active"] is expected


@pytest.mark.parametrize(
    "body", [{"userName": "a"}, {"userName": "a", "active": None}, {"userName": "a", "active": ""}]
)
def test_absent_or_null_active_stays_unassigned(body: dict[str, Any]) -> None:
    # RFC 7644 §3.5.2.2: no default at this layer (User.provision defaults a new user to active).
    desired = user_from_scim(body)
    assert "active" not in desired
    assert User.normalise(desired) == {"userName": "a"}


@pytest.mark.parametrize("raw", ["yes", "0", 1, 0, [], {"value": True}])
def test_active_refuses_anything_else(raw: object) -> None:
    with pytest.raises(ScimError) as excinfo:
        user_from_scim({"userName": "a", "active": raw})
    status, scim_type, detail = invalid(excinfo)
    assert (status, scim_type) == (400, "invalidValue")
    assert "active" in detail


def test_primary_as_a_string_becomes_a_boolean() -> None:
    # Entra sends app roles with "primary": "False".
    body = {
        "userName": "a",
        "roles": [
            {"primary": "False", "type": "WindowsAzureActiveDirectoryRole", "value": "Admin"},
        ],
    }
    roles = User.normalise(user_from_scim(body))["roles"]
    assert roles == [
        {"primary": False, "type": "WindowsAzureActiveDirectoryRole", "value": "Admin"}
    ]


def test_unknown_sub_attributes_of_items_are_dropped() -> None:
    body = {"userName": "a", "emails": [{"value": "a@x", "$ref": None, "extra": {"x": 1}}]}
    assert user_from_scim(body)["emails"] == [{"value": "a@x"}]


@pytest.mark.parametrize(
    "manager",
    [
        {"value": MANAGER_ID, "$ref": f"{BASE}/Users/{MANAGER_ID}"},
        MANAGER_ID,
        [{"$ref": f"{BASE}/Users/{MANAGER_ID}", "value": MANAGER_ID}],
        {"Value": MANAGER_ID.upper()},  # the domain canonicalises the id
    ],
)
def test_manager_in_every_form_entra_sends(manager: object) -> None:
    body = {"userName": "a", ENTERPRISE_SCHEMA: {"manager": manager}}
    assert User.normalise(user_from_scim(body))["manager"] == MANAGER_ID


@pytest.mark.parametrize("manager", [None, "", [], {}, {"value": None}, {"value": ""}])
def test_empty_manager_clears_it(manager: object) -> None:
    body = {"userName": "a", ENTERPRISE_SCHEMA: {"manager": manager, "department": "X"}}
    assert User.normalise(user_from_scim(body)) == {
        "enterprise": {"department": "X"},
        "userName": "a",
    }


def test_top_level_manager_is_the_enterprise_manager_unless_the_extension_has_one() -> None:
    assert user_from_scim({"userName": "a", "manager": MANAGER_ID})["manager"] == MANAGER_ID
    other = "11111111-1111-4111-8111-111111111111"
    body = {"userName": "a", "manager": other, ENTERPRISE_SCHEMA: {"manager": MANAGER_ID}}
    assert user_from_scim(body)["manager"] == MANAGER_ID


@pytest.mark.parametrize(
    ("body", "attribute"),
    [
        ({"userName": 42}, "userName"),
        ({"userName": "a", "displayName": ["x"]}, "displayName"),
        ({"userName": "a", "emails": {"value": "a@x"}}, "emails"),
        ({"userName": "a", "emails": ["a@x"]}, "emails"),
        ({"userName": "a", "emails": [{"value": 7}]}, "emails.value"),
        ({"userName": "a", "emails": [{"value": "a@x", "primary": "maybe"}]}, "emails.primary"),
        ({"userName": "a", "name": "Alice Smith"}, "name"),
        ({"userName": "a", "name": {"givenName": 1}}, "name.givenName"),
        ({"userName": "a", ENTERPRISE_SCHEMA: "x"}, ENTERPRISE_SCHEMA),
        ({"userName": "a", ENTERPRISE_SCHEMA: {"department": 3}}, "department"),
        ({"userName": "a", ENTERPRISE_SCHEMA: {"manager": 3}}, "manager"),
        ({"userName": "a", ENTERPRISE_SCHEMA: {"manager": [{"value": "a"}, "b"]}}, "manager"),
    ],
)
def test_wrong_json_types_are_invalid_values_naming_the_attribute(
    body: dict[str, Any], attribute: str
) -> None:
    with pytest.raises(ScimError) as excinfo:
        user_from_scim(body)
    status, scim_type, detail = invalid(excinfo)
    assert (status, scim_type) == (400, "invalidValue")
    assert attribute in detail


def test_a_body_that_is_not_an_object_is_invalid_syntax() -> None:
    with pytest.raises(ScimError) as excinfo:
        user_from_scim([{"userName": "a"}])  # type: ignore[arg-type]
    assert excinfo.value.scim_type == "invalidSyntax"


def test_missing_user_name_is_left_to_the_domain() -> None:
    desired = user_from_scim({"displayName": "No Name"})
    assert desired == {"displayName": "No Name"}
    with pytest.raises(InvalidValue) as excinfo:
        User.normalise(desired)
    assert excinfo.value.attribute == "userName"


# -- user_document ------------------------------------------------------------------------


def test_document_shape() -> None:
    document = user_document(RICH_STATE)
    assert document["schemas"] == [USER_SCHEMA, ENTERPRISE_SCHEMA]
    assert document["userName"] == "bjensen@example.com"
    assert document["active"] is False
    assert document["name"] == {
        "familyName": "Jensen",
        "givenName": "Barbara",
        "middleName": "Jane",
    }
    assert document[ENTERPRISE_SCHEMA] == {
        "department": "Tour Operations",
        "employeeNumber": "701984",
        "manager": {"value": MANAGER_ID},
    }
    assert "enterprise" not in document and "manager" not in document
    assert "id" not in document and "meta" not in document


def test_document_without_extension_lists_the_core_schema_only() -> None:
    document = user_document(ENTRA_POST_STATE)
    assert document["schemas"] == [USER_SCHEMA]
    assert ENTERPRISE_SCHEMA not in document


def test_manager_alone_makes_the_extension() -> None:
    state = User.normalise({"userName": "a", "manager": MANAGER_ID})
    assert user_document(state)[ENTERPRISE_SCHEMA] == {"manager": {"value": MANAGER_ID}}


def test_document_of_a_user_without_active_has_no_active() -> None:
    state = User.normalise({"userName": "a"})
    assert "active" not in user_document(state)


@pytest.mark.parametrize("state", [RICH_STATE, ENTRA_POST_STATE, User.normalise({"userName": "a"})])
def test_document_round_trips_to_the_same_state(state: dict[str, Any]) -> None:
    assert User.normalise(user_from_scim(user_document(state))) == state


def test_document_is_a_copy() -> None:
    state = copy.deepcopy(RICH_STATE)
    document = user_document(state)
    document["emails"][0]["value"] = "changed"
    document[ENTERPRISE_SCHEMA]["department"] = "changed"
    assert state == RICH_STATE


# -- user_resource ------------------------------------------------------------------------


def resource(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "user_id": USER_ID,
        "version": 3,
        "created": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "last_modified": datetime(2024, 2, 3, 4, 5, 6, 789000, tzinfo=UTC),
        "location": f"{BASE}/Users/{USER_ID}",
    }
    arguments.update(overrides)
    return user_resource(RICH_STATE, **arguments)


def test_resource_carries_id_and_meta() -> None:
    full = resource()
    assert list(full)[:2] == ["schemas", "id"]
    assert full["id"] == USER_ID
    assert full["meta"] == {
        "resourceType": "User",
        "created": "2024-01-02T03:04:05Z",
        "lastModified": "2024-02-03T04:05:06.789000Z",
        "location": f"{BASE}/Users/{USER_ID}",
        "version": 'W/"3"',
    }
    assert "groups" not in full
    document = user_document(RICH_STATE)
    assert {key: full[key] for key in document if key != ENTERPRISE_SCHEMA} == {
        key: value for key, value in document.items() if key != ENTERPRISE_SCHEMA
    }


def test_resource_times_are_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    full = resource(
        created=datetime(2024, 1, 2, 5, 4, 5, tzinfo=plus_two),
        last_modified=datetime(2024, 1, 2, 3, 4, 5),  # naive: taken as UTC
    )
    assert full["meta"]["created"] == "2024-01-02T03:04:05Z"
    assert full["meta"]["lastModified"] == "2024-01-02T03:04:05Z"


def test_resource_manager_has_a_ref_and_groups_when_given() -> None:
    groups = [{"value": "g1", "display": "Staff", "type": "direct"}]
    full = resource(groups=groups)
    assert full[ENTERPRISE_SCHEMA]["manager"] == {
        "value": MANAGER_ID,
        "$ref": f"{BASE}/Users/{MANAGER_ID}",
    }
    assert full["groups"] == groups
    # A resource read back as a PUT body gives the same state.
    assert User.normalise(user_from_scim(full)) == RICH_STATE


# -- select_attributes --------------------------------------------------------------------


def test_no_selection_returns_everything() -> None:
    assert select_attributes(resource(), None, None) == resource()
    assert select_attributes(resource(), "", " ") == resource()


def test_attributes_return_the_listed_ones_plus_id_and_schemas() -> None:
    selected = select_attributes(resource(), "userName", None)
    assert selected == {
        "schemas": [USER_SCHEMA, ENTERPRISE_SCHEMA],
        "id": USER_ID,
        "userName": "bjensen@example.com",
    }


def test_attributes_are_case_insensitive_and_unknown_ones_ignored() -> None:
    selected = select_attributes(resource(), "USERNAME, DisplayName,nope,name.nope", None)
    assert set(selected) == {"schemas", "id", "userName", "displayName"}


def test_attributes_with_sub_attributes() -> None:
    selected = select_attributes(resource(), "name.givenName,emails.value", None)
    assert selected["name"] == {"givenName": "Barbara"}
    assert selected["emails"] == [{"value": "bjensen@example.com"}, {"value": "babs@jensen.org"}]


def test_attributes_with_schema_urns() -> None:
    selected = select_attributes(
        resource(),
        f"{USER_SCHEMA}:userName,{ENTERPRISE_SCHEMA}:employeeNumber,{ENTERPRISE_SCHEMA}:manager.value",
        None,
    )
    assert selected == {
        "schemas": [USER_SCHEMA, ENTERPRISE_SCHEMA],
        "id": USER_ID,
        "userName": "bjensen@example.com",
        ENTERPRISE_SCHEMA: {"employeeNumber": "701984", "manager": {"value": MANAGER_ID}},
    }
    whole = select_attributes(resource(), ENTERPRISE_SCHEMA.lower(), None)
    assert whole[ENTERPRISE_SCHEMA] == resource()[ENTERPRISE_SCHEMA]


def test_meta_only_when_listed_or_by_default() -> None:
    assert "meta" not in select_attributes(resource(), "userName", None)
    assert select_attributes(resource(), "userName,meta", None)["meta"] == resource()["meta"]
    assert select_attributes(resource(), "meta.version", None)["meta"] == {"version": 'W/"3"'}
    assert "meta" in select_attributes(resource(), None, "emails")
    assert "meta" not in select_attributes(resource(), None, "meta")


def test_excluded_attributes() -> None:
    selected = select_attributes(
        resource(groups=[{"value": "g1"}]),
        None,
        f"emails,name.familyName,groups,{ENTERPRISE_SCHEMA}:manager,phoneNumbers.type",
    )
    assert "emails" not in selected and "groups" not in selected
    assert selected["name"] == {"givenName": "Barbara", "middleName": "Jane"}
    assert selected[ENTERPRISE_SCHEMA] == {
        "department": "Tour Operations",
        "employeeNumber": "701984",
    }
    assert selected["phoneNumbers"] == [{"value": "555-555-8377"}]
    assert selected["userName"] == "bjensen@example.com"


def test_id_and_schemas_cannot_be_excluded() -> None:
    selected = select_attributes(resource(), None, "id,schemas,userName")
    assert selected["id"] == USER_ID
    assert selected["schemas"] == [USER_SCHEMA, ENTERPRISE_SCHEMA]
    assert "userName" not in selected


def test_group_members_excluded() -> None:
    group = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "id": "g1",
        "displayName": "Staff",
        "members": [{"value": USER_ID}],
        "meta": {"resourceType": "Group"},
    }
    selected = select_attributes(group, None, "members")
    assert selected == {key: value for key, value in group.items() if key != "members"}
    qualified = select_attributes(
        group, "urn:ietf:params:scim:schemas:core:2.0:Group:displayName", None
    )
    assert qualified == {"schemas": group["schemas"], "id": "g1", "displayName": "Staff"}


def test_selection_does_not_change_the_resource() -> None:
    full = resource()
    before = copy.deepcopy(full)
    select_attributes(full, "name.givenName", None)
    select_attributes(full, None, "name.givenName,emails.value")
    assert full == before
