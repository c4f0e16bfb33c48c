-- The groups view and its membership rows, kept by the inline groups projection.
--
-- Membership is one row per (group, member), never a JSON array to rewrite: adding one member
-- to a group of 100,000 is one index insert, and checking whether someone is already a member
-- is one index probe.
CREATE TABLE scim_groups (
    tenant_id     uuid NOT NULL,
    id            uuid NOT NULL,
    display_name  text NOT NULL,
    external_id   text,
    version       bigint NOT NULL,
    created       timestamptz NOT NULL,
    last_modified timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
-- displayName is unique per tenant, case-insensitively (Entra matches groups on it).
CREATE UNIQUE INDEX scim_groups_display_name_uq ON scim_groups (tenant_id, lower(display_name));
CREATE INDEX scim_groups_external_id_idx ON scim_groups (tenant_id, external_id);
CREATE INDEX scim_groups_last_modified_idx ON scim_groups (tenant_id, last_modified, id);
CREATE INDEX scim_groups_created_idx ON scim_groups (tenant_id, created, id);

CREATE TABLE scim_group_members (
    tenant_id   uuid NOT NULL,
    group_id    uuid NOT NULL,
    member_id   uuid NOT NULL,
    member_type text NOT NULL CHECK (member_type IN ('User', 'Group')),
    PRIMARY KEY (tenant_id, group_id, member_id)
);
-- "Which groups is this user in?" (the User's groups attribute, user deletion).
CREATE INDEX scim_group_members_member_idx ON scim_group_members (tenant_id, member_id);
