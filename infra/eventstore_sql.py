"""The event store's SQL (infra.eventstore): the append, with its checks, and the reads."""

from __future__ import annotations

COLUMNS = (
    "originator_id, originator_version, topic, state, notification_id, tenant_id,"
    " recorded_at, request_id, transaction_id"
)

# What an append returns: only what the writer does not know already (not the states it sent).
APPENDED = "originator_id, originator_version, notification_id, recorded_at, transaction_id"

# Followers read in transaction id order, so a stream's events must have ascending
# transaction ids. A writer takes its id when it first writes or locks a row, which may be
# before it waited for the writer of the stream's previous version; then its id is the lower
# of the two. Such an append fails whole (`late` raises SL001, migration 0010), and is retried
# in a new transaction, whose id is higher than that of every committed one.
#
# Crypto-shredding (infra.keys): the data keys of new subjects are stored by the same statement
# ($7..$9), and an append for a subject whose key was destroyed (erased) fails whole (`erased`
# raises SL002, migration 0017): on every instance, whatever its cache holds.
#
# Both checks look at the events after a stream's first only (an index probe each): a first
# event (a new stream: POST, a request's record) has no previous version to be late after, and
# a subject erased has a first event already, so its key row need not be read: a first event
# for it collides on the primary key (ConcurrencyError) and nothing is written.
_EVENTS_AND_KEYS = """
e AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bytea[])
        AS e (originator_id, originator_version, topic, state)
), new_keys AS (
    INSERT INTO subject_keys (subject_id, tenant_id, kek_version, wrapped)
    SELECT k.subject_id, $5::uuid, k.kek_version, k.wrapped
    FROM unnest($7::uuid[], $8::int[], $9::bytea[]) AS k (subject_id, kek_version, wrapped)
    ON CONFLICT DO NOTHING
)"""
_CHECKS = """, erased AS (
    SELECT scimledger_subject_erased(k.subject_id) FROM e JOIN subject_keys k
        ON k.subject_id = e.originator_id
    WHERE e.originator_version > 1 AND k.wrapped IS NULL
    LIMIT 1
), late AS (
    SELECT scimledger_stream_written_later(p.originator_id) FROM e JOIN stored_events p
        ON p.originator_id = e.originator_id AND p.originator_version = e.originator_version - 1
    WHERE e.originator_version > 1 AND p.transaction_id > pg_current_xact_id()::text::bigint
    LIMIT 1
)"""
_INSERT = """
INSERT INTO stored_events (originator_id, originator_version, topic, state, tenant_id, request_id)
SELECT e.originator_id, e.originator_version, e.topic, e.state, $5::uuid, $6::text
FROM e {where}
RETURNING {returning}
"""
APPEND_CTES = _EVENTS_AND_KEYS + _CHECKS
APPEND_INSERT = _INSERT.format(
    where="WHERE NOT EXISTS (SELECT 1 FROM late) AND NOT EXISTS (SELECT 1 FROM erased)",
    returning=APPENDED,
)
INSERT = f"WITH {APPEND_CTES}{APPEND_INSERT}"
# An append of first events only (a new stream each: POST /Users and a request's record) needs
# neither check (see above), and leaves out their plan nodes: the executor still opens, locks
# and starts those for every run, ~0.04 ms of PostgreSQL's CPU per POST /Users (of ~0.4).
FIRST_CTES = _EVENTS_AND_KEYS
FIRST_INSERT = _INSERT.format(where="", returning=APPENDED)
INSERT_FIRST = f"WITH {FIRST_CTES}{FIRST_INSERT}"
OUT_OF_ORDER = "SL001"
ERASED = "SL002"

# `append_with`: the append and one more data-modifying statement (its parameters numbered from
# APPEND_PARAMETERS + 1) in one SQL statement, so one round trip and one transaction.
APPEND_PARAMETERS = 9
APPEND_WITH = "WITH {ctes}, appended AS ({insert}), also AS ({statement}) SELECT * FROM appended"
PRIMARY_KEY = "stored_events_pkey"

READ_STREAM = f"""
SELECT {COLUMNS} FROM stored_events
WHERE originator_id = $1 AND originator_version > $2
ORDER BY originator_version
"""

READ_STREAM_UNTIL = f"""
SELECT {COLUMNS} FROM stored_events
WHERE originator_id = $1 AND tenant_id = $2 AND recorded_at <= $3
ORDER BY originator_version
LIMIT $4
"""

READ_ALL = f"""
SELECT {COLUMNS} FROM stored_events
WHERE (transaction_id, notification_id) > ($1::bigint, $2::bigint)
  AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
ORDER BY transaction_id, notification_id
LIMIT $3
"""


REST_OF_TRANSACTION = f"""
SELECT {COLUMNS} FROM stored_events
WHERE transaction_id = $1 AND notification_id > $2
ORDER BY notification_id
"""

# The same reads without the states (an empty one in their place): for followers that need
# only the events' heads (topic, stream, tenant, time) or hold the states in memory.
HEADS = COLUMNS.replace("state,", "''::bytea AS state,")
READ_ALL_HEADS = READ_ALL.replace(COLUMNS, HEADS)
REST_OF_TRANSACTION_HEADS = REST_OF_TRANSACTION.replace(COLUMNS, HEADS)
STATES = (
    "SELECT notification_id, state FROM stored_events WHERE notification_id = any($1::bigint[])"
)
