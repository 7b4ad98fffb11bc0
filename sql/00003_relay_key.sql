-- +goose Up
-- The key that seals envelope notifications (the remote fast path) when
-- CLUSTER_SECRET is not set. Any role that can connect may NOTIFY on any
-- channel; only the broker's role may read this table, so only the
-- broker's nodes can seal an envelope the others will push.
CREATE TABLE relay_key (
    id         smallint PRIMARY KEY CHECK (id = 1),
    key        bytea NOT NULL CHECK (length(key) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON relay_key FROM PUBLIC;

-- +goose Down
DROP TABLE relay_key;
