-- Issue 18: a stored SET pays for every index of feed_sets, and a catch-up stores thousands a
-- second. The kid index served one question, whether a retired key still signs a pending SET
-- (the JWKS keeps it published while one does): rare, and answered as well from the pending
-- SETs of the key's tenant's streams, by their primary key (service/feeds/keys.py jwks).
DROP INDEX IF EXISTS feed_sets_kid_idx;

-- How many SETs each stream has delivered, out of the stream's row: the producer holds that row
-- (FOR UPDATE) for the whole of a step, so an acknowledgement that counted there waited for
-- the step to commit, and a poll consumer's round trips queued behind the producer's steps.
-- feeds list/show add this to feed_streams.delivered (what was counted there before).
CREATE TABLE feed_delivered (
    stream_id uuid PRIMARY KEY REFERENCES feed_streams (id) ON DELETE CASCADE,
    delivered bigint NOT NULL DEFAULT 0
);
