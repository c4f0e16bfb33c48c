"""The core User, enterprise User and Group schemas this server accepts, in RFC 7643 §7 form.

The one definition of the core attributes: the domain's canonical state (domain/schema.py),
the SCIM representation (service/scim/representation.py), the filter and sortBy tables
(service/scim/sql_attributes.py), `/Schemas` and `/ResourceTypes` (service/discovery.py) and,
through the state's keys, the provisioning log's property names all read it. A tenant's
declared extensions (infra/schemas.py) are the same form, declared at run time.

What is listed is what a client may send and gets back (RFC 7644 §4: the schemas the service
provider supports), nothing more: no `password` (an append-only event store would never
forget it); `groups` is readOnly (it comes from the groups' membership rows); the manager keeps
its `value`, and `$ref` and `displayName` are derived from it. The common attributes (RFC 7643
§3.1: id, externalId, meta) belong to every resource and are not listed in a schema's
`attributes` (as in RFC 7643 §8.7.1); COMMON_ATTRIBUTES describes them.

Pure data: the dictionaries are shared, callers copy before changing them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

USER_SCHEMA_URN = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE_SCHEMA_URN = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
GROUP_SCHEMA_URN = "urn:ietf:params:scim:schemas:core:2.0:Group"
SCHEMA_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Schema"

Schema = dict[str, Any]
Attribute = dict[str, Any]


def attribute(
    name: str,
    kind: str = "string",
    description: str = "",
    *,
    multi: bool = False,
    required: bool = False,
    case_exact: bool = False,
    mutability: str = "readWrite",
    returned: str = "default",
    uniqueness: str = "none",
    canonical: Iterable[str] = (),
    references: Iterable[str] = (),
    subs: Iterable[Attribute] = (),
) -> Attribute:
    """One attribute's characteristics (RFC 7643 §2.2 defaults unless given)."""
    out: Attribute = {
        "name": name,
        "type": kind,
        "multiValued": multi,
        "description": description,
        "required": required,
        "caseExact": case_exact,
        "mutability": mutability,
        "returned": returned,
        "uniqueness": uniqueness,
    }
    if canonical:
        out["canonicalValues"] = list(canonical)
    if references:
        out["referenceTypes"] = list(references)
    if subs:
        out["subAttributes"] = list(subs)
    return out


def _plural(
    name: str,
    description: str,
    *,
    value: str = "string",
    canonical: Iterable[str] = (),
    references: Iterable[str] = (),
) -> Attribute:
    """A multi-valued complex attribute of value, display, type and primary (RFC 7643 §2.4)."""
    return attribute(
        name,
        "complex",
        description,
        multi=True,
        subs=(
            attribute(
                "value",
                value,
                f"The value of one of {name}.",
                case_exact=value != "string",
                references=references,
            ),
            attribute("display", description="A human-readable name, for display."),
            attribute("type", description="A label of the value's function.", canonical=canonical),
            attribute("primary", "boolean", "Whether this is the preferred value."),
        ),
    )


_ADDRESS_PARTS = (
    attribute("formatted", description="The full mailing address, formatted for display."),
    attribute("streetAddress", description="The full street address component."),
    attribute("locality", description="The city or locality component."),
    attribute("region", description="The state or region component."),
    attribute("postalCode", description="The zip code or postal code component."),
    attribute("country", description="The country name component."),
    attribute(
        "type",
        description="A label of the address's function.",
        canonical=("work", "home", "other"),
    ),
    attribute("primary", "boolean", "Whether this is the preferred address."),
)

USER: Schema = {
    "schemas": [SCHEMA_SCHEMA],
    "id": USER_SCHEMA_URN,
    "name": "User",
    "description": "User Account",
    "attributes": [
        attribute(
            "userName",
            description="Unique identifier for the User, used to authenticate.",
            required=True,
            uniqueness="server",
        ),
        attribute(
            "name",
            "complex",
            "The components of the user's real name.",
            subs=(
                attribute("formatted", description="The full name, formatted for display."),
                attribute("familyName", description="The family name (last name)."),
                attribute("givenName", description="The given name (first name)."),
                attribute("middleName", description="The middle name(s)."),
                attribute("honorificPrefix", description="The honorific prefix(es)."),
                attribute("honorificSuffix", description="The honorific suffix(es)."),
            ),
        ),
        attribute("displayName", description="The name of the User, suitable for display."),
        attribute("nickName", description="The casual way to address the user."),
        attribute(
            "profileUrl",
            "reference",
            "A URL of a page representing the User's online profile.",
            case_exact=True,
            references=("external",),
        ),
        attribute("title", description="The user's title, such as 'Vice President'."),
        attribute(
            "userType", description="The relationship between the organization and the user."
        ),
        attribute("preferredLanguage", description="The User's preferred language, e.g. 'en-US'."),
        attribute("locale", description="The User's default location for localizing items."),
        attribute("timezone", description="The User's time zone, e.g. 'America/Los_Angeles'."),
        attribute("active", "boolean", "The User's administrative status."),
        _plural("emails", "Email addresses for the User.", canonical=("work", "home", "other")),
        _plural(
            "phoneNumbers",
            "Phone numbers for the User.",
            canonical=("work", "home", "mobile", "fax", "pager", "other"),
        ),
        _plural(
            "ims",
            "Instant messaging addresses for the User.",
            canonical=("aim", "gtalk", "icq", "xmpp", "msn", "skype", "qq", "yahoo"),
        ),
        _plural(
            "photos",
            "URLs of photos of the User.",
            value="reference",
            canonical=("photo", "thumbnail"),
            references=("external",),
        ),
        attribute(
            "addresses",
            "complex",
            "Physical mailing addresses of the User.",
            multi=True,
            subs=_ADDRESS_PARTS,
        ),
        attribute(
            "groups",
            "complex",
            "The groups the User belongs to (from the groups' members; read-only).",
            multi=True,
            mutability="readOnly",
            subs=(
                attribute(
                    "value", description="The group's id.", case_exact=True, mutability="readOnly"
                ),
                attribute(
                    "$ref",
                    "reference",
                    "The group's URI.",
                    case_exact=True,
                    mutability="readOnly",
                    references=("Group",),
                ),
                attribute("display", description="The group's displayName.", mutability="readOnly"),
                attribute(
                    "type",
                    description="How the User is a member.",
                    mutability="readOnly",
                    canonical=("direct", "indirect"),
                ),
            ),
        ),
        _plural("entitlements", "Entitlements of the User."),
        _plural("roles", "Roles of the User."),
        _plural("x509Certificates", "X.509 certificates issued to the User.", value="binary"),
    ],
}

ENTERPRISE_USER: Schema = {
    "schemas": [SCHEMA_SCHEMA],
    "id": ENTERPRISE_SCHEMA_URN,
    "name": "EnterpriseUser",
    "description": "Enterprise User",
    "attributes": [
        attribute("employeeNumber", description="An identifier assigned to the person."),
        attribute("costCenter", description="The name of a cost center."),
        attribute("organization", description="The name of an organization."),
        attribute("division", description="The name of a division."),
        attribute("department", description="The name of a department."),
        attribute(
            "manager",
            "complex",
            "The User's manager: another User of this tenant, by id.",
            subs=(
                attribute("value", description="The manager's id.", required=True, case_exact=True),
                attribute(
                    "$ref",
                    "reference",
                    "The manager's URI (derived from value).",
                    required=False,
                    case_exact=True,
                    references=("User",),
                ),
                attribute(
                    "displayName",
                    description="The manager's displayName.",
                    mutability="readOnly",
                ),
            ),
        ),
    ],
}

GROUP: Schema = {
    "schemas": [SCHEMA_SCHEMA],
    "id": GROUP_SCHEMA_URN,
    "name": "Group",
    "description": "Group",
    "attributes": [
        attribute("displayName", description="A human-readable name for the Group.", required=True),
        attribute(
            "members",
            "complex",
            "The members of the Group: Users and Groups of this tenant, by id.",
            multi=True,
            subs=(
                attribute(
                    "value",
                    description="The member's id.",
                    case_exact=True,
                    mutability="immutable",
                ),
                attribute(
                    "$ref",
                    "reference",
                    "The member's URI.",
                    case_exact=True,
                    mutability="immutable",
                    references=("User", "Group"),
                ),
                attribute(
                    "type",
                    description="The member's resource type.",
                    mutability="immutable",
                    canonical=("User", "Group"),
                ),
                attribute("display", description="The member's displayName."),
            ),
        ),
    ],
}

# RFC 7643 §3.1, common to Users and Groups; not listed in a schema's attributes.
COMMON_ATTRIBUTES: tuple[Attribute, ...] = (
    attribute(
        "id",
        description="Issued by this server.",
        case_exact=True,
        mutability="readOnly",
        returned="always",
        uniqueness="server",
    ),
    attribute("externalId", description="The client's identifier.", case_exact=True),
    attribute("meta", "complex", "Resource metadata.", mutability="readOnly"),
)

# A resource type's core schema and the extensions every tenant has.
RESOURCE_SCHEMAS: Mapping[str, tuple[Schema, ...]] = {
    "User": (USER, ENTERPRISE_USER),
    "Group": (GROUP,),
}


def named(schema: Schema, name: str) -> Attribute:
    """The attribute of a schema (or of a complex attribute) by its exact name."""
    items: list[Attribute] = schema.get("attributes") or schema.get("subAttributes") or []
    for item in items:
        if item["name"] == name:
            return dict(item)
    raise KeyError(name)


def names(
    attributes: Iterable[Attribute],
    *,
    kinds: Iterable[str] | None = None,
    multi: bool | None = None,
    writable: bool | None = None,
) -> tuple[str, ...]:
    """The names of the attributes that match every condition given."""
    wanted = None if kinds is None else frozenset(kinds)
    return tuple(
        a["name"]
        for a in attributes
        if (wanted is None or a["type"] in wanted)
        and (multi is None or a["multiValued"] == multi)
        and (writable is None or (a["mutability"] != "readOnly") == writable)
    )


def sub_names(owner: Attribute, *, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The names of a complex attribute's sub-attributes (less `skip`)."""
    skipped = frozenset(skip)
    return tuple(s["name"] for s in owner.get("subAttributes", []) if s["name"] not in skipped)
