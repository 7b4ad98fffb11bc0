package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
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

// envelopeDigests are the hex SHA-256 digests of the envelopes' suffixes,
// which the seal covers (relay.DecodeEnvelope): Postgres hashes only the
// ASCII head and these digests, so the seal does not depend on the
// database's encoding.
func (s *Store) envelopeDigests(envs []EnvelopeNotify) []string {
	out := make([]string, len(envs))
	if s.envInner == nil {
		return out
	}
	for i, e := range envs {
		d := sha256.Sum256([]byte(e.Suffix))
		out[i] = hex.EncodeToString(d[:])
	}
	return out
}
