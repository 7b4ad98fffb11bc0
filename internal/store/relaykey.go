package store

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// RelayKey returns the cluster's envelope key from the relay_key table,
// creating it from fresh random bytes on first use: every node of the
// database reads the same key, and other database roles cannot (the
// table grants nothing to PUBLIC). Used when CLUSTER_SECRET is not set.
func (s *Store) RelayKey(ctx context.Context) ([]byte, error) {
	fresh := make([]byte, 32)
	if _, err := rand.Read(fresh); err != nil {
		return nil, err
	}
	// Two nodes creating it at once: the second's insert does nothing and
	// its snapshot may predate the first's commit, so it reads again.
	for range 3 {
		var key []byte
		err := s.pool.QueryRow(ctx, `
			WITH ins AS (INSERT INTO relay_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING RETURNING key)
			SELECT key FROM ins UNION ALL SELECT key FROM relay_key WHERE id = 1 LIMIT 1`, fresh).Scan(&key)
		if errors.Is(err, pgx.ErrNoRows) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("relay key: %w", err)
		}
		return key, nil
	}
	return nil, errors.New("relay key: not found after creating it")
}

// SetEnvelopeKey sets the HMAC-SHA256 pads (relay.EnvelopeKey.Pads) with
// which InsertMessages seals envelope notifications. Call before use;
// without it envelopes go out unsealed (and nodes refuse them).
func (s *Store) SetEnvelopeKey(inner, outer []byte) {
	s.envInner, s.envOuter = inner, outer
}
