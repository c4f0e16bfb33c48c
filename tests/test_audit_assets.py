"""The audit pages' templates and static files ship with the package and are served as files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

import service
from service import audit_web

Client = TestClient[Any, Any]
PACKAGE = Path(service.__file__).parent


async def test_the_stylesheet_and_the_script_are_the_package_files(client: Client) -> None:
    for name, content_type in (("audit.css", "text/css"), ("audit.js", "text/javascript")):
        r = await client.get(f"/audit/assets/{name}")
        assert r.status == 200, name
        assert r.content_type == content_type
        assert r.headers["Cache-Control"] == "max-age=3600"
        assert await r.read() == (PACKAGE / "static" / "audit" / name).read_bytes()
    # Only those two: no directory listing, no other file of the package.
    for path in ("/audit/assets/", "/audit/assets/../audit_web.py", "/audit/assets/base.html"):
        assert (await client.get(path)).status in (401, 404), path


async def test_the_sign_in_page_is_a_template_that_links_them(client: Client) -> None:
    r = await client.get("/audit/")
    html = await r.text()
    assert r.status == 200 and r.content_type == "text/html"
    assert '<link rel="stylesheet" href="/audit/assets/audit.css">' in html
    assert '<script src="/audit/assets/audit.js" defer></script>' in html
    assert "{{" not in html and "{%" not in html
    assert r.headers["X-Frame-Options"] == "DENY"


def test_every_template_compiles_with_autoescaping() -> None:
    names = audit_web.TEMPLATES.list_templates()
    assert {"audit/base.html", "audit/log.html", "audit/entry.html"} <= set(names)
    for name in names:
        audit_web.TEMPLATES.get_template(name)
    page = audit_web.TEMPLATES.get_template("audit/message.html").render(
        title="<t>", principal=None, heading='"><b>', message="<i>", back=None, alert=True
    )
    assert "<b>" not in page and "<i>" not in page and "&quot;&gt;&lt;b&gt;" in page
