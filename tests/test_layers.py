"""The layers stay apart: what each may import, and where SQL may live.

Read from the source (ast), so a new import that crosses a layer fails here, not in review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The service layer: commands, their handlers, the unit of work and the service's refusals.
SERVICE_LAYER = [
    "service/commands.py",
    "service/exceptions.py",
    "service/handlers.py",
    "service/unit_of_work.py",
]
# The HTTP handlers of the SCIM writes: parse, call a handler, shape the reply.
HTTP_HANDLERS = ["service/scim/users.py", "service/scim/groups.py"]
_SQL = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b")


def _imports(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _strings(path: str) -> list[str]:
    tree = ast.parse((ROOT / path).read_text())
    return [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def test_the_service_layer_knows_neither_http_nor_the_scim_wire_format() -> None:
    for path in SERVICE_LAYER:
        crossing = sorted(
            name
            for name in _imports(path)
            if name.startswith(("service.scim", "aiohttp", "service.errors", "service.state"))
        )
        assert crossing == [], f"{path} imports {crossing}"


def test_the_domain_imports_no_other_layer() -> None:
    for path in sorted((ROOT / "domain").glob("*.py")):
        crossing = sorted(
            name
            for name in _imports(str(path.relative_to(ROOT)))
            if name.startswith(("service", "projections", "infra", "asyncpg", "aiohttp"))
        )
        assert crossing == [], f"{path.name} imports {crossing}"


def test_no_sql_in_the_handlers() -> None:
    """SQL lives in projections/ and infra/: the write path's handlers and the SCIM HTTP
    handlers ask repositories and views."""
    for path in [*HTTP_HANDLERS, "service/handlers.py"]:
        queries = [s for s in _strings(path) if _SQL.search(s)]
        assert queries == [], f"{path} runs SQL: {queries[:2]}"


def test_the_checks_above_can_fail() -> None:
    assert _SQL.search("SELECT 1 FROM scim_users")
    assert "service.scim.patch" in _imports("service/scim/documents.py")


def test_every_service_error_has_its_scim_error() -> None:
    """One middleware maps the service's refusals; a new refusal without a mapping would
    leave as a 500."""
    from service import exceptions
    from service.errors import scim_error_of

    refusals = {
        exceptions.NotFound("User", "x"): (404, None),
        exceptions.Invalid("bad"): (400, "invalidValue"),
        exceptions.Taken("userName 'a' is already taken"): (409, "uniqueness"),
        exceptions.PreconditionFailed(): (412, None),
        exceptions.Conflict(): (409, "mutability"),
    }
    assert {type(e) for e in refusals} == set(exceptions.ServiceError.__subclasses__())
    for error, (status, scim_type) in refusals.items():
        scim = scim_error_of(error)
        assert (scim.status, scim.scim_type, scim.detail) == (status, scim_type, error.detail)
