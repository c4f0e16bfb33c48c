-- The users view: one row per provisioned (not hard-deleted) user, kept by the inline users
-- projection in the same transaction as the events it reflects.
--
-- `resource` is the canonical user state of domain/schema.py (SCIM attribute names, enterprise
-- attributes under "enterprise", manager as a bare id). The columns beside it are copies of the
-- attributes that identity providers match on, so those lookups use plain b-tree indexes.

-- Lower-cased "type:value" and "*:value" keys of a user's e-mail addresses, so that
-- emails[type eq "work"].value eq "x" and emails.value eq "x" are GIN index lookups.
CREATE FUNCTION scim_email_keys(resource jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(k), '{}')
    FROM (
        SELECT lower(coalesce(e->>'type', '')) || ':' || lower(e->>'value') AS k
        FROM jsonb_array_elements(coalesce(resource->'emails', '[]')) e
        WHERE e->>'value' IS NOT NULL
        UNION
        SELECT '*:' || lower(e->>'value')
        FROM jsonb_array_elements(coalesce(resource->'emails', '[]')) e
        WHERE e->>'value' IS NOT NULL
    ) keys
$$;

CREATE TABLE scim_users (
    tenant_id     uuid NOT NULL,
    id            uuid NOT NULL,
    user_name     text NOT NULL,
    external_id   text,
    active        boolean NOT NULL,
    display_name  text,
    manager_id    uuid,
    resource      jsonb NOT NULL,
    version       bigint NOT NULL,
    created       timestamptz NOT NULL,
    last_modified timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
-- userName is caseExact=false (RFC 7643 §4.1.1): unique and matched case-insensitively.
CREATE UNIQUE INDEX scim_users_user_name_uq ON scim_users (tenant_id, lower(user_name));
CREATE INDEX scim_users_external_id_idx ON scim_users (tenant_id, external_id);
CREATE INDEX scim_users_email_keys_idx ON scim_users USING gin (scim_email_keys(resource));
CREATE INDEX scim_users_manager_idx ON scim_users (tenant_id, manager_id) WHERE manager_id IS NOT NULL;
CREATE INDEX scim_users_last_modified_idx ON scim_users (tenant_id, last_modified, id);
CREATE INDEX scim_users_created_idx ON scim_users (tenant_id, created, id);
