-- Issue 17 x 18: a pending SET that carries a subject's personal values (a `full` form's data,
-- an externalId in sub_id) names that subject, so an erasure finds it and replaces it with its
-- notice form before it is delivered (service/feeds/erasure.py). NULL: nothing personal in it.
ALTER TABLE feed_sets ADD COLUMN subject uuid;
CREATE INDEX feed_sets_subject_idx ON feed_sets (subject) WHERE subject IS NOT NULL;

-- A SET's jti is derived from the stream, the event it reports and this epoch
-- (service/feeds/build.py): a SET produced again after lost commits keeps its jti, while
-- `feeds reset` (an operator's replay) moves to the next epoch, so the replayed SETs are new
-- ones that a receiver's de-duplication does not drop.
ALTER TABLE feed_streams ADD COLUMN epoch integer NOT NULL DEFAULT 0;
