"""What a PATCH does to a SCIM document, as the service layer's handlers ask for it
(service/handlers.py, `Documents`): the app wires one `ScimDocuments` into its handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from service.commands import GroupEdit, PatchUser, Unique
from service.errors import invalid_value
from service.scim.declared import check_immutable, coerce_declared, unique_attributes
from service.scim.patch import apply_extension_patch, apply_patch
from service.scim.representation import user_document, user_from_scim


class ScimDocuments:
    def patched_user(self, state: Mapping[str, Any], command: PatchUser) -> dict[str, Any]:
        declared = dict(command.declared)
        document = apply_patch(
            user_document(state),
            list(command.operations),
            command.max_values,
            reject=command.reject,
            declared=frozenset(declared),
        )
        # PATCH is the one way a user grows past what one request carries; a user no PUT could
        # carry would make every later write pay for it again.
        if command.max_bytes is not None:
            size = len(orjson.dumps(document))
            if size > command.max_bytes:
                raise invalid_value(
                    f"This PATCH would make the user {size} bytes of JSON, more than a request"
                    f" body may carry ({command.max_bytes}, SCIMLEDGER_MAX_BODY_BYTES)"
                )
        desired = coerce_declared(user_from_scim(document), declared)
        check_immutable(state, desired, declared)
        return desired

    def patched_extensions(self, extensions: Mapping[str, Any], edit: GroupEdit) -> dict[str, Any]:
        return coerce_declared(
            apply_extension_patch(extensions, edit.extension_ops, edit.max_values), edit.declared
        )

    def check_immutable(
        self, before: Mapping[str, Any], after: Mapping[str, Any], declared: Mapping[str, Any]
    ) -> None:
        check_immutable(before, after, dict(declared))

    def unique(self, declared: Mapping[str, Any]) -> tuple[Unique, ...]:
        return tuple(Unique(*attribute) for attribute in unique_attributes(dict(declared)))
