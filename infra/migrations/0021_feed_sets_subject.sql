-- Issue 17 x 18: a pending SET that carries a subject's personal values (a `full` form's data,
-- an externalId in sub_id) names that subject, so an erasure finds it and replaces it with its
-- notice form before it is delivered (service/feeds/erasure.py). NULL: nothing personal in it.
ALTER TABLE feed_sets ADD COLUMN subject uuid;
CREATE INDEX feed_sets_subject_idx ON feed_sets (subject) WHERE subject IS NOT NULL;
