"""SCIM PATCH on a user document, in both of Entra's styles (ENTRA.md). Pure: no database."""

from __future__ import annotations

import copy
from typing import Any
from uuid import UUID, uuid4

import pytest

from domain import InvalidValue, User
from service.errors import ScimError
from service.scim.patch import PATCH_SCHEMA, apply_patch, parse_patch_request
from service.scim.representation import (
    ENTERPRISE_SCHEMA,
    USER_SCHEMA,
    user_document,
    user_from_scim,
)

EXT = ENTERPRISE_SCHEMA
MANAGER_ID = "6f1c1f7e-2b8e-4f0e-9a53-4a3c1d2e5f60"
OTHER_ID = "11111111-1111-4111-8111-111111111111"

# What Entra's create body (ENTRA.md) becomes in the domain.
STATE: dict[str, Any] = User.normalise(
    {
        "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
        "userName": "Test_User@contoso.com",
        "active": True,
        "emails": [{"primary": True, "type": "work", "value": "Test_User@contoso.com"}],
        "name": {
            "formatted": "givenName familyName",
            "familyName": "familyName",
            "givenName": "givenName",
        },
    }
)


def request(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_SCHEMA], "Operations": list(operations)}


def patched(state: dict[str, Any], *operations: dict[str, Any]) -> dict[str, Any]:
    """The whole way a PATCH goes: document, operations, desired state, canonical state."""
    document = user_document(state)
    result = apply_patch(document, parse_patch_request(request(*operations)))
    return User.normalise(user_from_scim(result))


def state_with(**changes: Any) -> dict[str, Any]:
    return User.normalise({**STATE, **changes})


def error_of(state: dict[str, Any], *operations: dict[str, Any]) -> tuple[int, str | None]:
    with pytest.raises(ScimError) as excinfo:
        patched(state, *operations)
    return excinfo.value.status, excinfo.value.scim_type


# -- the request --------------------------------------------------------------------------


def test_parse_normalises_operations() -> None:
    operations = parse_patch_request(
        request(
            {"op": "Add", "path": "nickName", "value": "Babs"},
            {"op": "REPLACE", "value": {"active": False}},
            {"op": "remove", "path": " title "},
        )
    )
    assert operations == [
        {"op": "add", "path": "nickName", "value": "Babs"},
        {"op": "replace", "path": None, "value": {"active": False}},
        {"op": "remove", "path": "title", "value": None},
    ]


def test_empty_operations_are_valid_and_change_nothing() -> None:
    assert parse_patch_request(request()) == []
    document = user_document(STATE)
    assert apply_patch(document, []) == document
    assert patched(STATE) == STATE


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "x",
        {"Operations": []},  # no schemas
        {"schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"], "Operations": []},
        {"schemas": PATCH_SCHEMA, "Operations": []},
        {"schemas": [PATCH_SCHEMA]},  # no Operations
        {"schemas": [PATCH_SCHEMA], "Operations": {"op": "add"}},
        {"schemas": [PATCH_SCHEMA], "Operations": ["add"]},
        {"schemas": [PATCH_SCHEMA], "Operations": [{"path": "title", "value": "x"}]},
        {"schemas": [PATCH_SCHEMA], "Operations": [{"op": "move", "path": "title"}]},
        {"schemas": [PATCH_SCHEMA], "Operations": [{"op": "add", "path": 3, "value": "x"}]},
    ],
)
def test_malformed_requests_are_invalid_syntax(body: Any) -> None:
    with pytest.raises(ScimError) as excinfo:
        parse_patch_request(body)
    assert (excinfo.value.status, excinfo.value.scim_type) == (400, "invalidSyntax")


def test_unknown_op_is_invalid_syntax_in_apply_too() -> None:
    with pytest.raises(ScimError) as excinfo:
        apply_patch(user_document(STATE), [{"op": "copy", "path": "title", "value": "x"}])
    assert excinfo.value.scim_type == "invalidSyntax"


def test_member_names_of_the_request_are_case_insensitive() -> None:
    body = {"Schemas": [PATCH_SCHEMA.upper()], "operations": [{"OP": "Add", "Path": "title"}]}
    assert parse_patch_request(body) == [{"op": "add", "path": "title", "value": None}]


# -- simple attributes --------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Replace", "replace", "REPLACE"])
@pytest.mark.parametrize(("raw", "expected"), [("False", False), ("false", False), (False, False)])
def test_disable_with_string_or_real_boolean(op: str, raw: object, expected: bool) -> None:
    assert patched(STATE, {"op": op, "path": "active", "value": raw})["active"] is expected


def test_reactivate_with_true_string() -> None:
    disabled = state_with(active=False)
    assert patched(disabled, {"op": "Replace", "path": "active", "value": "True"})["active"] is True


@pytest.mark.parametrize(
    "operation",
    [
        {"op": "remove", "path": "active"},
        {"op": "Remove", "path": "Active"},
        {"op": "remove", "path": f"{USER_SCHEMA}:active"},
        {"op": "replace", "path": "active", "value": None},
        {"op": "replace", "value": {"active": None}},
    ],
)
def test_remove_active_on_a_disabled_user_unassigns_it(operation: dict[str, Any]) -> None:
    # RFC 7644 §3.5.2.2: a removed attribute is unassigned; it must not read back as active.
    disabled = state_with(active=False)
    result = patched(disabled, operation)
    assert "active" not in result
    assert result == {key: value for key, value in disabled.items() if key != "active"}

    user = User.provision(uuid4(), UUID("00000000-0000-4000-8000-000000000001"), disabled)
    user.collect_events()
    operations = parse_patch_request(request(operation))
    user.update(user_from_scim(apply_patch(user_document(user.state), operations)))
    assert [type(event).__name__ for event in user.collect_events()] == ["UserActiveUnassigned"]
    assert "active" not in user.state
    assert user.active is False
    assert "active" not in user_document(user.state)
    # The same PATCH again (Entra retries) changes nothing.
    user.update(user_from_scim(apply_patch(user_document(user.state), operations)))
    assert user.collect_events() == []


def test_active_garbage_is_invalid_value() -> None:
    assert error_of(STATE, {"op": "Replace", "path": "active", "value": "nope"}) == (
        400,
        "invalidValue",
    )


def test_add_new_simple_attribute() -> None:
    result = patched(STATE, {"op": "Add", "path": "nickName", "value": "Babs"})
    assert result == state_with(nickName="Babs")


def test_replace_and_add_on_single_valued_set_it() -> None:
    result = patched(
        state_with(displayName="Old"),
        {"op": "Replace", "path": "displayName", "value": "New"},
        {"op": "add", "path": "Title", "value": "Boss"},
        {"op": "add", "path": "TITLE", "value": "Chief"},
    )
    assert result["displayName"] == "New"
    assert result["title"] == "Chief"


@pytest.mark.parametrize("op", ["replace", "add"])
@pytest.mark.parametrize("empty", ["", None])
def test_replace_or_add_with_empty_clears(op: str, empty: object) -> None:
    state = state_with(displayName="Old", nickName="N")
    result = patched(
        state,
        {"op": op, "path": "displayName", "value": empty},
        {"op": op, "path": "name", "value": empty},
        {"op": op, "path": "emails", "value": empty},
    )
    cleared = ("displayName", "name", "emails")
    assert result == {key: value for key, value in state.items() if key not in cleared}
    assert result["active"] is True  # untouched by the operations


def test_missing_value_reads_as_null() -> None:
    result = patched(state_with(displayName="Old"), {"op": "replace", "path": "displayName"})
    assert "displayName" not in result


def test_remove_simple_attribute() -> None:
    result = patched(state_with(title="Boss"), {"op": "Remove", "path": "title"})
    assert "title" not in result


def test_remove_without_path_is_no_target() -> None:
    assert error_of(STATE, {"op": "remove"}) == (400, "noTarget")


def test_remove_user_name_is_left_to_the_domain() -> None:
    document = apply_patch(user_document(STATE), [{"op": "remove", "path": "userName"}])
    with pytest.raises(InvalidValue):
        User.normalise(user_from_scim(document))


def test_wrong_value_type_for_a_string_is_invalid_value() -> None:
    assert error_of(STATE, {"op": "replace", "path": "displayName", "value": 3}) == (
        400,
        "invalidValue",
    )


# -- complex: name ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["name.givenName", "name.GivenName", "Name.GIVENNAME"])
def test_sub_attribute_path(path: str) -> None:
    result = patched(STATE, {"op": "Replace", "path": path, "value": "Barbara"})
    assert result["name"] == {**STATE["name"], "givenName": "Barbara"}


def test_add_complex_merges_sub_attributes() -> None:
    result = patched(
        STATE, {"op": "add", "path": "name", "value": {"MiddleName": "J", "givenName": "B"}}
    )
    assert result["name"] == {
        "familyName": "familyName",
        "formatted": "givenName familyName",
        "givenName": "B",
        "middleName": "J",
    }


def test_replace_complex_merges_and_null_sub_attribute_clears() -> None:
    # RFC 7644 §3.5.2.3: sub-attributes not given are left unchanged.
    result = patched(
        STATE, {"op": "replace", "path": "name", "value": {"givenName": "B", "formatted": None}}
    )
    assert result["name"] == {"familyName": "familyName", "givenName": "B"}


def test_remove_sub_attribute_and_whole_complex() -> None:
    result = patched(STATE, {"op": "remove", "path": "name.formatted"})
    assert result["name"] == {"familyName": "familyName", "givenName": "givenName"}
    assert "name" not in patched(STATE, {"op": "remove", "path": "name"})


def test_complex_value_must_be_an_object() -> None:
    assert error_of(STATE, {"op": "add", "path": "name", "value": "B J"}) == (400, "invalidValue")


# -- multi-valued -------------------------------------------------------------------------

HOME = {"type": "home", "value": "babs@jensen.org"}
WORK = {"primary": True, "type": "work", "value": "Test_User@contoso.com"}


@pytest.mark.parametrize(
    "path",
    [
        'emails[type eq "work"].value',
        'emails[type eq "work"].Value',
        'Emails[Type eq "Work"].value',
    ],
)
def test_replace_work_email_value(path: str) -> None:
    result = patched(
        state_with(emails=[WORK, HOME]), {"op": "Replace", "path": path, "value": "x@contoso.com"}
    )
    assert result["emails"] == [{**WORK, "value": "x@contoso.com"}, HOME]


@pytest.mark.parametrize("op", ["Replace", "Add"])
def test_work_email_is_created_when_missing(op: str) -> None:
    state = state_with(emails=[HOME])
    result = patched(
        state, {"op": op, "path": 'emails[type eq "work"].value', "value": "x@contoso.com"}
    )
    assert result["emails"] == [HOME, {"type": "work", "value": "x@contoso.com"}]
    no_emails = User.normalise({"userName": "a"})
    result = patched(
        no_emails, {"op": op, "path": 'emails[type eq "work"].value', "value": "x@contoso.com"}
    )
    assert result["emails"] == [{"type": "work", "value": "x@contoso.com"}]


def test_created_item_takes_every_equality_of_the_filter() -> None:
    result = patched(
        User.normalise({"userName": "a"}),
        {
            "op": "replace",
            "path": 'emails[type eq "work" and primary eq true].value',
            "value": "x@contoso.com",
        },
    )
    assert result["emails"] == [{"primary": True, "type": "work", "value": "x@contoso.com"}]


def test_filter_that_describes_no_item_cannot_create() -> None:
    assert error_of(
        User.normalise({"userName": "a"}),
        {"op": "replace", "path": 'emails[type ne "work"].value', "value": "x@contoso.com"},
    ) == (400, "noTarget")


def test_filter_with_and_selects_only_matching_items() -> None:
    other_work = {"type": "work", "value": "second@contoso.com"}
    state = state_with(emails=[WORK, other_work, HOME])
    result = patched(
        state,
        {
            "op": "replace",
            "path": 'emails[type eq "work" and primary eq true]',
            "value": {"value": "new@contoso.com", "primary": True},
        },
    )
    # The matched item is replaced; what the filter says about it is kept.
    assert result["emails"] == [
        {"primary": True, "type": "work", "value": "new@contoso.com"},
        other_work,
        HOME,
    ]


def test_replace_filtered_item_fills_in_the_filter() -> None:
    state = state_with(
        phoneNumbers=[{"type": "mobile", "value": "1"}, {"type": "work", "value": "2"}]
    )
    result = patched(
        state, {"op": "replace", "path": 'phoneNumbers[type eq "mobile"]', "value": {"value": "9"}}
    )
    assert result["phoneNumbers"] == [
        {"type": "mobile", "value": "9"},
        {"type": "work", "value": "2"},
    ]


def test_add_filtered_item_merges_or_creates() -> None:
    state = state_with(phoneNumbers=[{"type": "mobile", "value": "1", "display": "Mobile"}])
    result = patched(
        state, {"op": "add", "path": 'phoneNumbers[type eq "mobile"]', "value": {"value": "9"}}
    )
    assert result["phoneNumbers"] == [{"display": "Mobile", "type": "mobile", "value": "9"}]
    result = patched(
        STATE, {"op": "add", "path": 'phoneNumbers[type eq "mobile"]', "value": {"value": "9"}}
    )
    assert result["phoneNumbers"] == [{"type": "mobile", "value": "9"}]


def test_add_appends_and_skips_exact_repeats() -> None:
    result = patched(
        STATE,
        {
            "op": "add",
            "path": "emails",
            "value": [WORK, {"Value": "babs@jensen.org", "TYPE": "home"}],
        },
        {"op": "add", "path": "emails", "value": HOME},  # one object is one item
    )
    assert result["emails"] == [WORK, HOME]


def test_add_primary_demotes_the_old_primary() -> None:
    new = {"primary": "True", "type": "other", "value": "o@x"}
    result = patched(STATE, {"op": "add", "path": "emails", "value": [new]})
    assert result["emails"] == [{**WORK, "primary": False}, {**new, "primary": True}]


def test_replace_multi_valued_replaces_the_list() -> None:
    result = patched(
        state_with(emails=[WORK, HOME]), {"op": "replace", "path": "emails", "value": [HOME]}
    )
    assert result["emails"] == [HOME]


def test_primary_as_string_in_path_and_value() -> None:
    state = state_with(emails=[{"type": "work", "value": "w@x"}, HOME])
    result = patched(
        state, {"op": "Replace", "path": 'emails[type eq "work"].primary', "value": "True"}
    )
    assert result["emails"][0] == {"primary": True, "type": "work", "value": "w@x"}


def test_remove_filtered_items() -> None:
    state = state_with(emails=[WORK, HOME])
    assert patched(state, {"op": "remove", "path": 'emails[type eq "home"]'})["emails"] == [WORK]
    assert "emails" not in patched(state, {"op": "remove", "path": "emails"})


def test_remove_filter_matching_nothing_is_a_no_op() -> None:
    # RFC 7644 allows 400 noTarget here; a no-op is the robust choice (Entra relies on neither).
    assert patched(STATE, {"op": "remove", "path": 'emails[type eq "home"]'}) == STATE
    assert patched(STATE, {"op": "remove", "path": 'phoneNumbers[type eq "mobile"]'}) == STATE


def test_remove_filtered_sub_attribute_drops_a_hollow_item() -> None:
    state = state_with(emails=[WORK, HOME])
    result = patched(state, {"op": "remove", "path": 'emails[type eq "work"].value'})
    assert result["emails"] == [HOME]
    result = patched(state, {"op": "remove", "path": 'emails[type eq "work"].primary'})
    assert result["emails"] == [{"type": "work", "value": WORK["value"]}, HOME]


def test_remove_with_listed_values_removes_only_those() -> None:
    state = state_with(emails=[WORK, HOME])
    result = patched(
        state, {"op": "Remove", "path": "emails", "value": [{"$ref": None, "value": HOME["value"]}]}
    )
    assert result["emails"] == [WORK]


def test_multi_valued_value_must_hold_objects() -> None:
    assert error_of(STATE, {"op": "add", "path": "emails", "value": "x@y"}) == (400, "invalidValue")
    assert error_of(STATE, {"op": "add", "path": "emails", "value": ["x@y"]}) == (
        400,
        "invalidValue",
    )
    assert error_of(STATE, {"op": "add", "path": "emails", "value": [{"value": 1}]}) == (
        400,
        "invalidValue",
    )


# -- enterprise extension and manager -----------------------------------------------------


def test_enterprise_urn_path() -> None:
    result = patched(STATE, {"op": "Add", "path": f"{EXT}:employeeNumber", "value": "A1"})
    assert result["enterprise"] == {"employeeNumber": "A1"}
    result = patched(
        result, {"op": "replace", "path": f"{EXT.upper()}:EMPLOYEENUMBER", "value": "A2"}
    )
    assert result["enterprise"] == {"employeeNumber": "A2"}
    assert "enterprise" not in patched(result, {"op": "remove", "path": f"{EXT}:employeeNumber"})


def test_whole_extension_path_merges() -> None:
    state = state_with(enterprise={"department": "X", "division": "D"})
    result = patched(
        state, {"op": "replace", "path": EXT, "value": {"department": "Y", "manager": MANAGER_ID}}
    )
    assert result["enterprise"] == {"department": "Y", "division": "D"}
    assert result["manager"] == MANAGER_ID
    cleared = patched(result, {"op": "remove", "path": EXT})
    assert "enterprise" not in cleared and "manager" not in cleared


def test_manager_add_as_list_of_one_with_bare_manager_path() -> None:
    operation = {
        "op": "Add",
        "path": "manager",
        "value": [{"$ref": f"https://x/scim/v2/Users/{MANAGER_ID}", "value": MANAGER_ID}],
    }
    result = patched(STATE, operation)
    assert result == state_with(manager=MANAGER_ID)
    assert user_document(result)[EXT] == {"manager": {"value": MANAGER_ID}}


def test_manager_add_as_bare_string_with_urn_path() -> None:
    result = patched(STATE, {"op": "add", "path": f"{EXT}:manager", "value": MANAGER_ID})
    assert result["manager"] == MANAGER_ID


def test_manager_value_sub_attribute_path() -> None:
    result = patched(STATE, {"op": "replace", "path": f"{EXT}:manager.value", "value": MANAGER_ID})
    assert result["manager"] == MANAGER_ID
    assert "manager" not in patched(result, {"op": "remove", "path": f"{EXT}:manager.value"})


def test_manager_remove() -> None:
    state = state_with(manager=MANAGER_ID, enterprise={"department": "X"})
    result = patched(state, {"op": "Remove", "path": f"{EXT}:manager"})
    assert "manager" not in result
    assert result["enterprise"] == {"department": "X"}


def test_manager_remove_by_filter_only_when_it_matches() -> None:
    state = state_with(manager=MANAGER_ID)
    kept = patched(state, {"op": "remove", "path": f'manager[value eq "{OTHER_ID}"]'})
    assert kept["manager"] == MANAGER_ID
    removed = patched(state, {"op": "remove", "path": f'manager[value eq "{MANAGER_ID}"]'})
    assert "manager" not in removed
    qualified = patched(state, {"op": "remove", "path": f'{EXT}:manager[value eq "{MANAGER_ID}"]'})
    assert "manager" not in qualified


def test_manager_remove_with_a_listed_value_only_when_it_matches() -> None:
    state = state_with(manager=MANAGER_ID)
    kept = patched(state, {"op": "Remove", "path": "manager", "value": [{"value": OTHER_ID}]})
    assert kept["manager"] == MANAGER_ID
    removed = patched(state, {"op": "Remove", "path": "manager", "value": [{"value": MANAGER_ID}]})
    assert "manager" not in removed


@pytest.mark.parametrize("empty", [None, "", []])
def test_manager_replace_with_empty_clears(empty: object) -> None:
    result = patched(
        state_with(manager=MANAGER_ID), {"op": "replace", "path": "manager", "value": empty}
    )
    assert "manager" not in result


def test_manager_that_is_not_an_id_is_refused_by_the_domain() -> None:
    with pytest.raises(InvalidValue):
        patched(STATE, {"op": "add", "path": "manager", "value": "not-a-uuid"})


# -- no path: aadOptscim062020 ------------------------------------------------------------


def test_no_path_with_dotted_and_urn_keys() -> None:
    # ENTRA.md, verbatim.
    operation = {
        "op": "replace",
        "value": {
            "displayName": "B",
            "name.givenName": "K",
            "name.familyName": "U",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber": "A1",
        },
    }
    assert patched(STATE, operation) == state_with(
        displayName="B",
        name={"formatted": "givenName familyName", "givenName": "K", "familyName": "U"},
        enterprise={"employeeNumber": "A1"},
    )


def test_no_path_with_nested_extension_object() -> None:
    result = patched(
        state_with(enterprise={"division": "D"}),
        {"op": "add", "value": {EXT: {"department": "X", "Manager": {"value": MANAGER_ID}}}},
    )
    assert result["enterprise"] == {"department": "X", "division": "D"}
    assert result["manager"] == MANAGER_ID


def test_no_path_add_merges_and_appends() -> None:
    result = patched(
        STATE,
        {
            "op": "add",
            "value": {"Active": "False", "emails": [HOME], "name": {"middleName": "M"}},
        },
    )
    assert result["active"] is False
    assert result["emails"] == [WORK, HOME]
    assert result["name"]["middleName"] == "M"
    assert result["name"]["givenName"] == "givenName"


def test_no_path_ignores_read_only_and_unknown_keys() -> None:
    operation = {
        "op": "replace",
        "value": {
            "id": "x",
            "meta": {},
            "schemas": [USER_SCHEMA],
            "favouriteColour": "blue",
            "active": False,
        },
    }
    assert patched(STATE, operation) == state_with(active=False)


def test_no_path_value_must_be_an_object() -> None:
    assert error_of(STATE, {"op": "replace", "value": "x"}) == (400, "invalidValue")
    assert error_of(STATE, {"op": "add"}) == (400, "invalidValue")


# -- invalid targets ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["id", "meta", "meta.created", "groups", "schemas", "Groups"])
def test_read_only_targets_are_mutability_errors(path: str) -> None:
    assert error_of(STATE, {"op": "replace", "path": path, "value": "x"}) == (400, "mutability")


@pytest.mark.parametrize(
    "path",
    [
        "favouriteColour",
        "name.nickName",
        "displayName.value",
        'displayName[value eq "x"]',
        'name[givenName eq "x"]',
        'emails[foo eq "x"].value',
        "emails.foo",
        f"{EXT}:userName",
        f"{EXT}:manager.foo",
        "urn:ietf:params:scim:schemas:core:2.0:Group:displayName",
        'urn:example:params:scim:schemas:extension:Other:2.0:User:badges[value eq "x"]',
    ],
)
def test_unknown_targets_are_invalid_path(path: str) -> None:
    assert error_of(STATE, {"op": "add", "path": path, "value": "x"}) == (400, "invalidPath")


def test_undeclared_extension_attributes_are_kept_or_refused() -> None:
    other = "urn:example:params:scim:schemas:extension:Other:2.0:User"
    operation = {"op": "add", "path": f"{other}:department", "value": "x"}
    assert patched(STATE, operation)[other] == {"department": "x"}
    document = user_document(STATE)
    for refused in (operation, {"op": "add", "value": {f"{other}:department": "x"}}):
        with pytest.raises(ScimError) as excinfo:
            apply_patch(document, parse_patch_request(request(refused)), reject=True)
        assert excinfo.value.scim_type == "invalidValue" and other in excinfo.value.detail


@pytest.mark.parametrize(
    "path",
    ["emails[type eq work].value", "emails[type eq", 'emails[type eq "work"]].value', "a..b"],
)
def test_bad_filter_syntax_is_invalid_path(path: str) -> None:
    assert error_of(STATE, {"op": "replace", "path": path, "value": "x"}) == (400, "invalidPath")


def test_core_urn_qualified_path() -> None:
    result = patched(STATE, {"op": "replace", "path": f"{USER_SCHEMA}:displayName", "value": "Q"})
    assert result["displayName"] == "Q"


def test_unqualified_enterprise_attribute_resolves_to_the_extension() -> None:
    result = patched(STATE, {"op": "add", "path": "department", "value": "X"})
    assert result["enterprise"] == {"department": "X"}


# -- all or nothing -----------------------------------------------------------------------


def test_all_or_nothing_and_input_untouched() -> None:
    document = user_document(state_with(emails=[WORK, HOME]))
    before = copy.deepcopy(document)
    operations = parse_patch_request(
        request(
            {"op": "replace", "path": "displayName", "value": "Changed"},
            {"op": "remove", "path": 'emails[type eq "home"]'},
            {"op": "replace", "path": "meta.created", "value": "x"},
        )
    )
    with pytest.raises(ScimError):
        apply_patch(document, operations)
    assert document == before
    result = apply_patch(document, operations[:2])
    assert document == before
    assert result["displayName"] == "Changed"


def test_result_lists_the_extension_schema_only_when_present() -> None:
    document = user_document(STATE)
    added = apply_patch(document, [{"op": "add", "path": "manager", "value": MANAGER_ID}])
    assert added["schemas"] == [USER_SCHEMA, EXT]
    removed = apply_patch(added, [{"op": "remove", "path": "manager"}])
    assert removed["schemas"] == [USER_SCHEMA]
    assert EXT not in removed


# -- a typical Entra update cycle, all the way through the domain --------------------------


def test_entra_update_cycle_records_only_real_changes() -> None:
    user = User.provision(uuid4(), UUID("00000000-0000-4000-8000-000000000001"), STATE)
    operations = parse_patch_request(
        request(
            {"op": "Replace", "path": 'emails[type eq "work"].value', "value": "new@contoso.com"},
            {"op": "Add", "path": "nickName", "value": "Babs"},
            {"op": "Replace", "path": "active", "value": "False"},
            {"op": "Add", "path": "manager", "value": [{"$ref": None, "value": MANAGER_ID}]},
        )
    )
    user.update(user_from_scim(apply_patch(user_document(user.state), operations)))
    pending = [type(event).__name__ for event in user.collect_events()]
    assert pending == [
        "UserProvisioned",
        "EmailChanged",
        "UserAttributesChanged",
        "ManagerChanged",
        "UserDeactivated",
    ]
    assert user.state["emails"] == [{**WORK, "value": "new@contoso.com"}]
    # The same PATCH again (Entra retries) changes nothing.
    user.update(user_from_scim(apply_patch(user_document(user.state), operations)))
    assert user.collect_events() == []
