"""wrk (C and LuaJIT, far cheaper per request than the service) as the load client: its Lua
scripts, which count wrong replies and print one machine-readable line, and one run of it."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import orjson

from bench.common import SCIM, finished
from bench.table import ms

RESULT = "WRK-RESULT "
SAMPLE = "WRK-SAMPLE "
NAME = "@@NAME@@"
EXTERNAL_ID = "@@EXT@@"


class WrkMissing(Exception):
    """wrk is not installed."""


def executable() -> str:
    if (found := shutil.which("wrk")) is None:
        raise WrkMissing("wrk is not installed; the benchmark's load client: `apt-get install wrk`")
    return found


def _lua_string(text: str) -> str:
    """A Lua long-bracket literal: no escapes inside, whatever the text holds."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def _headers(token: str, *, body: bool) -> str:
    pairs = {"Authorization": f"Bearer {token}", "Accept": SCIM}
    pairs |= {"Content-Type": SCIM} if body else {}
    items = ", ".join(f"[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in pairs.items())
    return f"local headers = {{{items}}}"


_COMMON = """
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  bad = 0
  sample = ""
  counter = 0
  math.randomseed(os.time() * 1000 + tid)
end

function response(status, headers, body)
  if not ok(status, body or "") then
    bad = bad + 1
    if sample == "" then
      sample = (status .. " " .. string.sub(body or "", 1, 300)):gsub("[\\r\\n]", " ")
    end
  end
end

function done(summary, latency, requests)
  local total_bad, first = 0, ""
  for _, t in ipairs(threads) do
    total_bad = total_bad + t:get("bad")
    if first == "" then first = t:get("sample") end
  end
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,"bad":%d,"socket_errors":%d}\\n',
    "WRK-RESULT ", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), total_bad, e.connect + e.read + e.write + e.timeout))
  io.write("WRK-SAMPLE " .. first .. "\\n")
end
"""


def post_users_script(path: str, token: str, body_template: bytes, prefix: str) -> str:
    """POST `path` with `body_template`, NAME and EXTERNAL_ID replaced by values unique to the
    request (thread, counter): `{prefix}_{thread}_{counter}@Contoso.com` and a GUID-shaped id."""
    text = body_template.decode()
    pieces = re.split(f"({re.escape(NAME)}|{re.escape(EXTERNAL_ID)})", text)
    lua = {NAME: "name", EXTERNAL_ID: "ext"}
    concat = " .. ".join(lua.get(piece) or _lua_string(piece) for piece in pieces if piece)
    run = int.from_bytes(os.urandom(4), "big")
    return f"""
{_headers(token, body=True)}
local path = {_lua_string(path)}
local prefix = {_lua_string(prefix)}

function ok(status, body)
  return status == 201
end

request = function()
  counter = counter + 1
  local name = string.format("%s_%d_%07d@Contoso.com", prefix, tid, counter)
  local ext = string.format("%08x-%04x-4000-8000-%012x", {run}, tid, counter)
  return wrk.format("POST", path, headers, {concat})
end
{_COMMON}"""


def find_users_script(path: str, token: str, users: int, name_format: str) -> str:
    """GET `path`?filter=userName eq "…" for random stored users (`name_format % i`, i below
    `users`) in random case (userName is caseExact=false); a reply must find exactly one."""
    return f"""
{_headers(token, body=False)}
local prefix = {_lua_string(path + "?filter=userName+eq+%22")}
local users = {users}
local fmt = {_lua_string(name_format)}

function ok(status, body)
  return status == 200 and string.find(body, '"totalResults"%s*:%s*1[,}}%s]') ~= nil
end

request = function()
  local name = string.format(fmt, math.random(0, users - 1))
  local r = math.random(3)
  if r == 1 then name = string.lower(name) elseif r == 2 then name = string.upper(name) end
  local quoted = name:gsub("@", "%%40")
  return wrk.format("GET", prefix .. quoted .. "%22", headers)
end
{_COMMON}"""


@dataclass
class WrkRun:
    requests: int
    seconds: float
    p50: float  # seconds
    p99: float
    bad: int  # replies that are not what a correct server sends
    socket_errors: int
    sample: str
    cpu: float  # wrk's own CPU seconds

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def text(self, *, p50: bool = True) -> str:
        """Its rate and latencies, as the table shows them."""
        return f"{self.rate:,.0f} req/s; " + f"p50 {ms(self.p50)}, " * p50 + f"p99 {ms(self.p99)}"


def run(origin: str, script: str, seconds: float, connections: int, threads: int = 1) -> WrkRun:
    """wrk with `script` against `origin` for `seconds`; blocks (run it in a thread)."""
    with tempfile.NamedTemporaryFile("w", prefix="scimledger-wrk-", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        argv = [executable(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
        done = finished([*argv, "--timeout", "60s", "-s", lua.name, origin])
    lines = (done.out + done.errors).splitlines()
    found = next((orjson.loads(x[len(RESULT) :]) for x in lines if x.startswith(RESULT)), None)
    if found is None:
        raise ValueError(f"wrk printed no result line:\n{(done.out + done.errors)[-2000:]}")
    sample = next((x[len(SAMPLE) :].strip() for x in lines if x.startswith(SAMPLE)), "")
    seconds, p50, p99 = (float(found[k]) / 1e6 for k in ("duration_us", "p50_us", "p99_us"))
    requests, bad, errors = (int(found[k]) for k in ("requests", "bad", "socket_errors"))
    return WrkRun(requests, seconds, p50, p99, bad, errors, sample, done.cpu)
