-- +goose Up
-- Audit events are purged oldest-first by id (ids grow with time), so this
-- index only cost every audit insert.
DROP INDEX IF EXISTS audit_log_created;

-- +goose Down
CREATE INDEX audit_log_created ON audit_log (created_at);
