-- Crypto-shredding (issue 17). Personal values in events are encrypted with a data key per
-- subject (a user or a group), wrapped by a per-tenant key-encryption key, itself wrapped by the
-- master key (configuration, never in the database). Erasing a subject destroys its data key:
-- `wrapped` becomes NULL and the row stays as a tombstone, so a write for the subject is refused
-- in the appending statement itself (scimledger_subject_erased) on every instance.
CREATE TABLE tenant_keks (
    tenant_id  uuid NOT NULL,
    version    integer NOT NULL,
    -- The KEK wrapped (AES-GCM, nonce || ciphertext) by the master key named by master_id.
    wrapped    bytea NOT NULL,
    master_id  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

CREATE TABLE subject_keys (
    subject_id  uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    kek_version integer NOT NULL,
    -- The data key wrapped by the tenant's KEK of kek_version; NULL once erased.
    wrapped     bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    erased_at   timestamptz
);
CREATE INDEX subject_keys_tenant_idx ON subject_keys (tenant_id, kek_version);

-- One row per erasure: the receipt. No personal data.
CREATE TABLE erasures (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL,
    subject_id    uuid NOT NULL,
    subject_type  text NOT NULL CHECK (subject_type IN ('User', 'Group')),
    requested_by  text NOT NULL,
    reason        text,
    erased_at     timestamptz NOT NULL DEFAULT now(),
    events        bigint NOT NULL,
    rows_deleted  bigint NOT NULL,
    audit_entries bigint NOT NULL
);
CREATE INDEX erasures_tenant_idx ON erasures (tenant_id, erased_at DESC);

CREATE OR REPLACE FUNCTION scimledger_subject_erased(subject uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'subject % has been erased', subject USING ERRCODE = 'SL002';
END
$$;
