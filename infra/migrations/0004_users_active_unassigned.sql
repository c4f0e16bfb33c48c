-- `active` can be unassigned (a client removed it, RFC 7644 §3.5.2.2); NULL in the view.
ALTER TABLE scim_users ALTER COLUMN active DROP NOT NULL;
