-- Issue 18: the foreign key of feed_sets.stream_id ran a trigger for every stored SET (a lookup
-- of its stream, locked FOR KEY SHARE): ~3 µs of PostgreSQL's ~10 µs per SET stored, in a
-- catch-up storing thousands a second (bench.feeds). It guarded nothing the code does not: a
-- producer's step stores a stream's SETs holding the stream's row FOR UPDATE (and stores
-- nothing when the row is gone), and deleting a stream deletes its SETs in the same
-- transaction (service/feeds/streams.py delete).
ALTER TABLE feed_sets DROP CONSTRAINT IF EXISTS feed_sets_stream_id_fkey;
