-- A member's `display`, when the client gave one as it added the member (RFC 7643 §2.4:
-- immutable, set at inclusion).
ALTER TABLE scim_group_members ADD COLUMN display text;
