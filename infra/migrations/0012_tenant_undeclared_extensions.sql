-- What a tenant does with extension attributes it has not declared (Entra's custom attributes,
-- `urn:…:CustomExtensionName:2.0:User:CustomAttribute`): 'keep' stores them as sent (nothing a
-- client sends is dropped), 'reject' answers 400 naming the URN and writes nothing.
ALTER TABLE tenants ADD COLUMN undeclared text NOT NULL DEFAULT 'keep'
    CHECK (undeclared IN ('keep', 'reject'));

-- A group's extension attributes (URN -> attributes), as a user's live in its resource.
ALTER TABLE scim_groups ADD COLUMN extensions jsonb;
