"""Event state serialisation: orjson, with the eventsourcing library's type tags.

orjson writes UUIDs and datetimes as bare strings, which would come back as strings. We tag them
the way the library's JSONTranscoder does ({"_type_": "uuid_hex", "_data_": ...}) so stored
states stay readable by the library's own tools and round-trip to the same Python types.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import Mapper, Transcoder

# What orjson writes as it is: no call of `_tag` for them (most of an event's values).
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _tag(obj: Any) -> Any:
    """`obj` as orjson must write it to keep its types: itself when nothing in it needs a tag
    (the callers only serialise what this returns), else a copy with the tags in."""
    if type(obj) is dict:
        copied: dict[Any, Any] | None = None
        for k, v in obj.items():
            if type(v) not in _PLAIN and (tagged := _tag(v)) is not v:
                if copied is None:
                    copied = dict(obj)
                copied[k] = tagged
        return obj if copied is None else copied
    if type(obj) is list:
        items: list[Any] | None = None
        for i, v in enumerate(obj):
            if type(v) not in _PLAIN and (tagged := _tag(v)) is not v:
                if items is None:
                    items = list(obj)
                items[i] = tagged
        return obj if items is None else items
    if isinstance(obj, dict):
        return {k: _tag(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tag(v) for v in obj]
    if isinstance(obj, UUID):
        return {"_type_": "uuid_hex", "_data_": obj.hex}
    if isinstance(obj, datetime):
        return {"_type_": "datetime_iso", "_data_": obj.isoformat()}
    return obj


_CONTAINERS = (dict, list)  # all orjson makes besides scalars
_TAG_KEY = b'"_type_"'


def _untag(obj: Any) -> Any:
    """Tagged values back to UUIDs and datetimes.

    `obj` is orjson's fresh output, which nothing else holds: containers are updated in place
    and scalars are never visited (a replay decodes every event of the store, so this is hot).
    """
    if isinstance(obj, dict):
        if len(obj) == 2 and "_type_" in obj and "_data_" in obj:
            kind, data = obj["_type_"], obj["_data_"]
            if kind == "uuid_hex":
                return UUID(data)
            if kind == "datetime_iso":
                return datetime.fromisoformat(data)
            raise TypeError(f"unknown type tag in stored event: {kind!r}")
        for key, value in obj.items():
            if type(value) in _CONTAINERS:
                obj[key] = _untag(value)
        return obj
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            if type(value) in _CONTAINERS:
                obj[i] = _untag(value)
        return obj
    return obj


class OrjsonTranscoder(Transcoder):
    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(_tag(obj))

    def decode(self, data: bytes) -> Any:
        obj = orjson.loads(data)
        tags = data.count(_TAG_KEY)
        if not tags or type(obj) is not dict:
            return obj if not tags else _untag(obj)
        # Most events' only tagged values are top-level (timestamp, tenant): untag those and
        # walk the nested containers only if the bytes hold more tags than that. Counting
        # the key in the bytes never undercounts (a string containing it escapes its quotes,
        # which can only overcount, and then the full walk runs).
        for key, value in obj.items():
            if type(value) is dict and len(value) == 2 and "_type_" in value:
                obj[key] = _untag(value)
                tags -= 1
        return _untag(obj) if tags > 0 else obj


def make_mapper() -> Mapper[UUID]:
    return Mapper(transcoder=OrjsonTranscoder())
