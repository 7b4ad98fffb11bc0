package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// AcceptHello records an accepted hello signature and, in the same round
// trip, takes the newest pending hook status for (pid, cwd) that is younger
// than pendingTTL. fresh is false when the signature was accepted before
// (a replay). A pending row stored by a signed hook applies only to that
// member's session (mesh and pubkey must match).
func (s *Store) AcceptHello(ctx context.Context, sigHash []byte, keep time.Duration, pid int64, cwd, meshID, pubkey string, pendingTTL time.Duration) (fresh bool, pending string, err error) {
	var pend *string
	err = s.pool.QueryRow(ctx, `
		WITH seen AS (
			INSERT INTO hello_seen (signature_hash, expires_at) VALUES ($1, now() + $2::interval)
			ON CONFLICT DO NOTHING RETURNING 1
		), pend AS (
			DELETE FROM pending_status p
			WHERE EXISTS (SELECT 1 FROM seen) AND p.cwd = $4 AND (p.pid = $3 OR p.pid = 0)
			  AND (p.mesh_id IS NULL OR (p.mesh_id = $5 AND p.pubkey = $6))
			RETURNING p.status, p.created_at
		)
		SELECT EXISTS (SELECT 1 FROM seen),
		       (SELECT status FROM pend WHERE created_at > now() - $7::interval ORDER BY created_at DESC LIMIT 1)`,
		sigHash, keep, pid, cwd, meshID, pubkey, pendingTTL).Scan(&fresh, &pend)
	if err != nil {
		return false, "", fmt.Errorf("accept hello: %w", err)
	}
	if pend != nil {
		pending = *pend
	}
	return fresh, pending, nil
}

// AddPendingStatus keeps a hook status for a session that has not connected
// yet. meshID and pubkey are empty for an unsigned hook.
func (s *Store) AddPendingStatus(ctx context.Context, pid int64, cwd, status, meshID, pubkey string) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO pending_status (pid, cwd, status, mesh_id, pubkey)
		VALUES ($1, $2, $3, NULLIF($4, ''), NULLIF($5, ''))`, pid, cwd, status, meshID, pubkey)
	if err != nil {
		return fmt.Errorf("add pending status: %w", err)
	}
	return nil
}

// Node is a row of the node registry.
type Node struct {
	Name       string
	GossipAddr string
	HTTPAddr   string
	StartedAt  time.Time
	LastSeenAt time.Time
}

// UpsertNode registers (or refreshes) this node.
func (s *Store) UpsertNode(ctx context.Context, n Node) error {
	_, err := s.pool.Exec(ctx, `
		INSERT INTO node (name, gossip_addr, http_addr) VALUES ($1, $2, $3)
		ON CONFLICT (name) DO UPDATE SET gossip_addr = EXCLUDED.gossip_addr,
			http_addr = EXCLUDED.http_addr, last_seen_at = now()`, n.Name, n.GossipAddr, n.HTTPAddr)
	if err != nil {
		return fmt.Errorf("upsert node: %w", err)
	}
	return nil
}

// RecentNodes lists nodes seen within maxAge, newest first.
func (s *Store) RecentNodes(ctx context.Context, maxAge time.Duration) ([]Node, error) {
	rows, err := s.pool.Query(ctx, `SELECT name, gossip_addr, http_addr, started_at, last_seen_at FROM node
		WHERE last_seen_at > now() - $1::interval ORDER BY last_seen_at DESC`, maxAge)
	if err != nil {
		return nil, fmt.Errorf("recent nodes: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Node, error) {
		var n Node
		err := r.Scan(&n.Name, &n.GossipAddr, &n.HTTPAddr, &n.StartedAt, &n.LastSeenAt)
		return n, err
	})
}

// DeleteNode removes a node from the registry (on graceful shutdown).
func (s *Store) DeleteNode(ctx context.Context, name string) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM node WHERE name = $1`, name)
	return err
}
