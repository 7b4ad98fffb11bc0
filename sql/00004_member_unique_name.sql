-- +goose Up
-- A display name names one live member of a mesh, whatever its case: the CLI
-- addresses members by name, and a second "alice" would receive what was
-- meant for the first. Live members that already share a name keep the
-- oldest one as it is; the others get their key's fingerprint appended, as
-- the CLI shows it, so the index can be built.
UPDATE member m SET display_name = m.display_name || ' (' || left(m.pubkey, 8) || ')'
WHERE m.revoked_at IS NULL AND EXISTS (
    SELECT 1 FROM member o
    WHERE o.mesh_id = m.mesh_id AND o.revoked_at IS NULL
      AND lower(o.display_name) = lower(m.display_name)
      AND (o.joined_at, o.id) < (m.joined_at, m.id));
CREATE UNIQUE INDEX member_live_display_name ON member (mesh_id, lower(display_name)) WHERE revoked_at IS NULL;

-- +goose Down
DROP INDEX IF EXISTS member_live_display_name;
