-- A declared dateTime extension attribute compares, sorts and is unique as an instant
-- (issue 15), not as its text: "2026-01-02T00:00:00+05:00" is before "2026-01-01T20:00:00Z".
-- The value is read with its own offset (UTC when it has none) under fixed settings, so the
-- result depends on the text alone: IMMUTABLE holds, and a unique index may use it. Text that
-- is no timestamp (kept before the attribute was declared) reads as NULL, never an error.
CREATE OR REPLACE FUNCTION scim_timestamptz(value text) RETURNS timestamptz
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET timezone TO 'UTC'
    SET datestyle TO 'ISO, YMD'
AS $$
BEGIN
    RETURN value::timestamptz;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;
