"""Send fuzzed requests to a running app over HTTP and check every reply against the store.

For every request: status < 500; a 4xx carries a SCIM Error body whose `status` is the HTTP
status and whose scimType, if any, is one RFC 7644 / RFC 9865 define; and a rejected request
appends no event but its own audit record (RequestRecorded, outcome failure) and changes no
row of the users and groups views. Failures are collected, not raised, so one run reports all
of them. The CPU each request took (the app's loop thread and the request's worker threads:
tests/fuzz/cpu.py) is kept: the report names the slowest, and `max_cpu`
(SCIMLEDGER_FUZZ_MAX_CPU in `make fuzz`) makes one past it a failure.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from infra.database import Database
from service.scim.paths import canonical_path
from tests.fuzz.cpu import SEQUENCE_HEADER, RequestCpu
from tests.fuzz.strategies import Request

ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"
SCIM_TYPES = frozenset(
    {
        "invalidFilter",
        "tooMany",
        "uniqueness",
        "mutability",
        "invalidSyntax",
        "invalidPath",
        "noTarget",
        "invalidValue",
        "invalidVers",
        "sensitive",
        "invalidCursor",  # RFC 9865
        "expiredCursor",
    }
)
# aiohttp's limit on the request line (its max_line_size default).
MAX_REQUEST_LINE = 8190
_PLACEHOLDER = re.compile(r"@@([UG])(\d+)@@|@@[NQA]@@")
_PLACEHOLDER_BYTES = re.compile(rb"@@([UG])(\d+)@@|@@[NQ]@@")

# Rows a rejected request must leave alone: domain events and the inline views.
FINGERPRINT_SQL = """
SELECT (SELECT count(*) FROM stored_events WHERE topic NOT LIKE 'domain.request:%'),
       (SELECT count(*) FROM scim_users), (SELECT coalesce(sum(version), 0) FROM scim_users),
       (SELECT count(*) FROM scim_groups), (SELECT coalesce(sum(version), 0) FROM scim_groups),
       (SELECT count(*) FROM scim_group_members)
"""


@dataclass
class Failure:
    what: str
    request: str
    status: int
    reply: str

    def __str__(self) -> str:
        return f"{self.what}: {self.request} -> {self.status} {self.reply}"


@dataclass
class Harness:
    base_url: str
    token: str
    db: Database
    audit_token: str | None = None  # what @@A@@ stands for (the audit API's requests)
    users: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    tried: int = 0
    protocol_rejects: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    max_cpu: float | None = None
    slowest_cpu: float = 0.0
    slowest: str = ""
    slowest_of: dict[str, tuple[float, str]] = field(default_factory=dict)  # by _kind
    _sequence: int = 0
    _http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Harness:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._http is not None
        await self._http.close()

    # -- placeholders

    def _id(self, kind: str | None, index: str | None) -> str:
        pool = self.users if kind == "U" else self.groups
        if kind is None or not pool:
            return str(uuid.uuid4())
        return pool[int(index or 0) % len(pool)]

    def fill(self, text: str) -> str:
        def one(m: re.Match[str]) -> str:
            if m.group(0) == "@@Q@@":
                return uuid.uuid4().hex[:12]  # unique on every send
            if m.group(0) == "@@A@@":
                return self.audit_token or self.token
            return self._id(m.group(1), m.group(2))

        return _PLACEHOLDER.sub(one, text)

    def fill_bytes(self, raw: bytes) -> bytes:
        def one(m: re.Match[bytes]) -> bytes:
            if m.group(0) == b"@@Q@@":
                return uuid.uuid4().hex[:12].encode()
            kind = m.group(1).decode() if m.group(1) else None
            index = m.group(2).decode() if m.group(2) else None
            return self._id(kind, index).encode()

        return _PLACEHOLDER_BYTES.sub(one, raw)

    # -- sending and checking

    def url(self, request: Request) -> URL:
        def enc(text: str, safe: str) -> str:
            return quote(self.fill(text).encode("utf-8", "surrogatepass"), safe=safe)

        url = self.base_url.rstrip("/") + enc(request.path, "/:@-._~")
        if request.query:
            url += "?" + "&".join(f"{enc(k, '')}={enc(v, '')}" for k, v in request.query)
        return URL(url, encoded=True)

    async def fingerprint(self) -> tuple[int, ...]:
        row = await self.db.pool.fetchrow(FINGERPRINT_SQL)
        assert row is not None
        return tuple(row.values())

    async def send(self, request: Request) -> int:
        """Send one request, check its reply and what it wrote; returns the status."""
        assert self._http is not None
        headers = {"Authorization": f"Bearer {self.token}", **request.headers}
        headers = {k: self.fill(v) for k, v in headers.items()}
        if "X-Request-Id" not in request.headers:
            headers["X-Request-Id"] = f"fuzz-{uuid.uuid4().hex}"
        body = None if request.body is None else self.fill_bytes(request.body)
        self._sequence += 1
        sequence = headers[SEQUENCE_HEADER] = str(self._sequence)
        before = await self.fingerprint()
        url = self.url(request)
        measured = RequestCpu(sequence)  # this thread is the app's loop thread
        try:
            with measured:
                async with self._http.request(
                    request.method, url, data=body, headers=headers,
                    skip_auto_headers=["Content-Type"],
                ) as response:  # fmt: skip
                    raw = await response.read()
                    status = response.status
                    reply_headers = response.headers
        except (TimeoutError, aiohttp.ClientError) as e:
            # e.g. an export that failed after its headers went out: the reply never ends.
            self.tried += 1
            summary = f"{request.method} {str(url)[:300]}"
            self.failures.append(Failure("no complete reply", summary, 0, repr(e)))
            return 0
        cpu = measured.seconds
        self.tried += 1
        self.statuses[status] += 1
        self.kinds[_kind(request)] += 1
        path = canonical_path(url.raw_path) or url.raw_path  # /scim/v2//users/ is /Users
        shown = {k: v for k, v in headers.items() if k not in ("Authorization", SEQUENCE_HEADER)}
        summary = f"{request.method} {str(url)[:300]} {shown} body={(body or b'')[:300]!r}"

        def fail(what: str) -> None:
            self.failures.append(Failure(what, summary, status, raw[:500].decode(errors="replace")))

        if cpu > self.slowest_cpu or cpu > self.slowest_of.get(_kind(request), (0.0, ""))[0]:
            sent = summary.split(" body=", 1)[-1][:160] if body else f"?{url.raw_query_string}"
            shape = f"{_kind(request)} -> {status}, {len(body or b''):,} bytes: {sent[:200]}"
            shape += f", reply {len(raw):,} bytes"
            if measured.collector >= 0.001:
                shape += f" ({measured.collector:.3f} s of it the cyclic collector's)"
            self.slowest_of[_kind(request)] = (cpu, shape)
            if cpu > self.slowest_cpu:
                self.slowest_cpu, self.slowest = cpu, shape
        if self.max_cpu is not None and cpu > self.max_cpu:
            fail(f"over {self.max_cpu:g} s of CPU ({cpu:.2f} s)")

        if status >= 500:
            fail("5xx")
            return status
        if len(request.method) + len(url.raw_path_qs) + 10 > MAX_REQUEST_LINE:
            # aiohttp's HTTP parser refuses the request line itself (400, before any handler
            # or middleware): nothing can be written, and no SCIM body is possible.
            self.protocol_rejects += 1
            if status != 400:
                fail("an over-long request line was not refused")
            elif await self.fingerprint() != before:
                fail("an over-long request line changed something")
            return status
        parsed: Any = None
        if status < 400 and path.startswith("/audit/"):
            return status  # the log's own JSON, CSV or JSON lines: only errors are checked
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                fail("reply is not JSON")
                return status
        if status >= 400 and request.method != "HEAD":
            self._check_error(status, reply_headers, parsed, fail)
            await self._check_nothing_written(
                request, path, status, reply_headers.get("X-Request-Id"), before, fail
            )
        elif status in (200, 201) and request.method == "POST" and isinstance(parsed, dict):
            if status == 201 and isinstance(parsed.get("id"), str):
                pool = self.users if path.startswith("/scim/v2/Users") else self.groups
                pool.append(parsed["id"])
        elif status == 204 and request.method == "DELETE":
            gone = path.rsplit("/", 1)[-1]
            for pool in (self.users, self.groups):
                if gone in pool:
                    pool.remove(gone)
        return status

    @staticmethod
    def _check_error(status: int, headers: Any, parsed: Any, fail: Any) -> None:
        if not headers.get("Content-Type", "").startswith("application/scim+json"):
            fail(f"error content type {headers.get('Content-Type')!r}")
        if not isinstance(parsed, dict):
            fail("error body is not an object")
            return
        if ERROR_SCHEMA not in (parsed.get("schemas") or []):
            fail("error body lacks the Error schema")
        if parsed.get("status") != str(status):
            fail(f"error status {parsed.get('status')!r} != {status}")
        scim_type = parsed.get("scimType")
        if scim_type is not None and scim_type not in SCIM_TYPES:
            fail(f"unknown scimType {scim_type!r}")
        if not isinstance(parsed.get("detail", ""), str):
            fail("error detail is not a string")

    async def _check_nothing_written(
        self,
        request: Request,
        path: str,
        status: int,
        request_id: str | None,
        before: tuple[int, ...],
        fail: Any,
    ) -> None:
        if request_id is None:
            fail("reply has no X-Request-Id")
            return
        rows = await self.db.pool.fetch(
            "SELECT topic, state FROM stored_events WHERE request_id = $1", request_id
        )
        domain = [r["topic"] for r in rows if not r["topic"].startswith("domain.request:")]
        if domain:
            fail(f"rejected request appended domain events {domain}")
        records = [json.loads(r["state"]) for r in rows if r["topic"].startswith("domain.request:")]
        if any(r.get("outcome") != "failure" for r in records):
            fail(f"rejected request recorded {[r.get('outcome') for r in records]}")
        # Every authenticated SCIM write is answered for in the audit log, exactly once.
        audited = (
            request.method in ("POST", "PUT", "PATCH", "DELETE")
            and path.startswith("/scim/v2/")
            and not path.endswith("/.search")
            and status not in (401, 403)
        )
        if len(records) != (1 if audited else 0):
            fail(f"rejected request has {len(records)} audit records")
        if await self.fingerprint() != before:
            fail("rejected request changed the users/groups views or the domain events")

    def run(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        """From a worker thread (where hypothesis runs): send on the app's loop and wait."""
        asyncio.run_coroutine_threadsafe(self.send(request), loop).result(timeout=120)

    def report(self) -> str:
        kinds = Counter(f.what for f in self.failures)
        lines = [
            f"fuzz: {self.tried} requests tried, {len(self.failures)} failures"
            f" ({self.protocol_rejects} refused by the HTTP parser: request line over 8 KiB)",
            "  statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())),
        ]
        lines.append("  requests: " + ", ".join(f"{k}: {n}" for k, n in sorted(self.kinds.items())))
        lines.append(f"  slowest: {self.slowest_cpu:.3f} s of CPU, {self.slowest}")
        audit = sorted((k, v) for k, v in self.slowest_of.items() if k.startswith("GET /audit/"))
        for _, (seconds, shape) in audit:  # the log's reads, whose cost grows with the log
            lines.append(f"  slowest of its kind: {seconds:.3f} s of CPU, {shape}")
        lines += [f"  {n} x {what}" for what, n in kinds.most_common()]
        seen: set[str] = set()
        for failure in self.failures:
            if failure.what not in seen:
                seen.add(failure.what)
                lines.append(f"  e.g. {failure}")
        return "\n".join(lines)


def _kind(request: Request) -> str:
    """`PATCH /Users/{id}`, `GET /Groups`, `POST /Users/.search`: what the request aimed at."""
    if request.path.startswith("/audit/"):
        return f"{request.method} {request.path.split('/@@')[0]}"
    path = canonical_path(request.path) or request.path
    parts = path.removeprefix("/scim/v2/").split("/")
    if len(parts) > 1 and parts[1] == ".search":
        target = f"/{parts[0]}/.search"
    elif parts[0] in ("Users", "Groups"):
        target = f"/{parts[0]}" + ("/{id}" if len(parts) > 1 else "")
    else:
        target = " other"
    return f"{request.method} {target}".replace("  ", " ")
