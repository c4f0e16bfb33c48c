-- A stream's events must have ascending transaction ids: followers read in transaction id
-- order. An append whose transaction id is below that of the stream's previous version (it
-- took its id before waiting for that writer) calls this, which aborts the whole statement
-- (events and any view change made with them) with SQLSTATE SL001; the writer retries in a new
-- transaction (infra.eventstore.OutOfOrder).
CREATE OR REPLACE FUNCTION scimledger_stream_written_later(stream uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'stream % was last written by a newer transaction', stream
        USING ERRCODE = 'SL001';
END
$$;
