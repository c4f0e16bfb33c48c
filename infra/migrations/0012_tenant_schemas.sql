-- Extension schemas a tenant declares (RFC 7643 §7 form), for Users or Groups: their
-- attributes are accepted (also under `--undeclared reject`), checked by type, and described
-- in the tenant's /Schemas and /ResourceTypes. Values stay in the resources' state under the
-- URN; removing a declaration leaves them in the events.
CREATE TABLE tenant_schemas (
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    urn           text NOT NULL,
    resource_type text NOT NULL CHECK (resource_type IN ('User', 'Group')),
    schema        jsonb NOT NULL,
    declared_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tenant_schemas_urn_uq ON tenant_schemas (tenant_id, lower(urn));
