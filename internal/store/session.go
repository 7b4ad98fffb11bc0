package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// HelloCheck is one hello to record: its signature hash, and the session
// whose pending hook status it may take.
type HelloCheck struct {
	SigHash []byte
	PID     int64
	Cwd     string
	MeshID  string
	Pubkey  string
}

// HelloResult answers a HelloCheck. Fresh is false when the signature was
// accepted before (a replay); Pending is the newest hook status that
// arrived for (pid, cwd) before the session connected, if any.
type HelloResult struct {
	Fresh   bool
	Pending string
	// Err is why this hello alone was not recorded: Postgres refused its
	// values (IsDataError), or became unavailable while the batch was
	// being split to find the refused rows. The others were recorded.
	Err error
}

// AcceptHellos records accepted hello signatures for replay protection and,
// in the same statement, takes the pending hook statuses of the fresh ones
// (younger than pendingTTL; a signed hook's status only for that member).
// Many hellos cost one round trip and one commit. A signature must not
// appear twice in one call. A batch Postgres refuses because of some of
// its hellos is split until only those fail (HelloResult.Err); an error is
// returned only when nothing was recorded for another reason.
func (s *Store) AcceptHellos(ctx context.Context, keep, pendingTTL time.Duration, checks []HelloCheck) ([]HelloResult, error) {
	out := make([]HelloResult, len(checks))
	err := s.acceptHellos(ctx, keep, pendingTTL, checks, out)
	if err != nil && !IsDataError(err) {
		return nil, err
	}
	if err != nil {
		isolate(0, len(checks), err, func(lo, hi int) error {
			return s.acceptHellos(ctx, keep, pendingTTL, checks[lo:hi], out[lo:hi])
		}, func(i int, err error) { out[i] = HelloResult{Err: err} })
	}
	return out, nil
}

// acceptHellosSQL records a batch of hellos (AcceptHellos).
var acceptHellosSQL = hotSync("accept hellos", `
		WITH input AS (
			SELECT * FROM unnest($1::bytea[], $2::int8[], $3::text[], $4::text[], $5::text[])
			     WITH ORDINALITY AS t(sig, pid, cwd, mesh, pubkey, ord)
		), seen AS (
			INSERT INTO hello_seen (signature_hash, expires_at)
			SELECT sig, now() + $6::interval FROM input
			ON CONFLICT DO NOTHING RETURNING signature_hash
		), pend AS (
			DELETE FROM pending_status p USING input i
			WHERE i.sig IN (SELECT signature_hash FROM seen)
			  AND p.cwd = i.cwd AND (p.pid = i.pid OR p.pid = 0)
			  AND (p.mesh_id IS NULL OR (p.mesh_id = i.mesh AND p.pubkey = i.pubkey))
			RETURNING i.ord, p.status, p.created_at
		)
		SELECT i.ord, EXISTS (SELECT 1 FROM seen s WHERE s.signature_hash = i.sig),
		       (SELECT status FROM pend WHERE pend.ord = i.ord AND pend.created_at > now() - $7::interval
		        ORDER BY pend.created_at DESC LIMIT 1)
		FROM input i ORDER BY i.ord`)

func (s *Store) acceptHellos(ctx context.Context, keep, pendingTTL time.Duration, checks []HelloCheck, out []HelloResult) error {
	n := len(checks)
	sigs := make([][]byte, n)
	pids := make([]int64, n)
	cwds := make([]string, n)
	meshes := make([]string, n)
	pubkeys := make([]string, n)
	for i, c := range checks {
		sigs[i], pids[i], cwds[i], meshes[i], pubkeys[i] = c.SigHash, c.PID, c.Cwd, c.MeshID, c.Pubkey
	}
	rows, err := s.pool.Query(ctx, acceptHellosSQL, sigs, pids, cwds, meshes, pubkeys, keep, pendingTTL)
	if err != nil {
		return fmt.Errorf("accept hellos: %w", err)
	}
	for rows.Next() {
		var ord int64
		var fresh bool
		var pend *string
		if err := rows.Scan(&ord, &fresh, &pend); err != nil {
			rows.Close()
			return fmt.Errorf("accept hellos: %w", err)
		}
		out[ord-1] = HelloResult{Fresh: fresh}
		if pend != nil {
			out[ord-1].Pending = *pend
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("accept hellos: %w", err)
	}
	return nil
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
