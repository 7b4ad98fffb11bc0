package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// A hello whose member the node has not cached costs two round trips the
// plain way: the member is looked up (MeshMembers, MemberByPubkey), then
// the hello recorded (AcceptHellos). MemberHello does both in one
// statement, and records nothing unless the hello's key is a live member
// of its mesh under the member id the hello names: a stranger's hello
// writes no row.

// memberHelloSQL loads members of a mesh and records one hello for the
// member among them with the hello's key and member id, taking its pending
// hook status as AcceptHellos does. $9 selects the members returned: all
// the mesh's live members when true, else only the one with the hello's
// key. Every statement of the WITH runs on one snapshot, so a member
// revoked before it is neither returned nor recorded.
var memberHelloSQL = hotSync("member hello", `
		WITH m AS (
			SELECT `+memberCols+` FROM member
			WHERE mesh_id = $1 AND revoked_at IS NULL AND ($9::bool OR pubkey = $2)
		), seen AS (
			INSERT INTO hello_seen (signature_hash, expires_at)
			SELECT $4::bytea, now() + $5::interval FROM m WHERE m.pubkey = $2 AND m.id = $3
			ON CONFLICT DO NOTHING RETURNING signature_hash
		), pend AS (
			DELETE FROM pending_status p
			WHERE EXISTS (SELECT 1 FROM seen)
			  AND p.cwd = $6::text AND (p.pid = $7::int8 OR p.pid = 0)
			  AND (p.mesh_id IS NULL OR (p.mesh_id = $1 AND p.pubkey = $2))
			RETURNING p.status, p.created_at
		)
		SELECT m.*, EXISTS (SELECT 1 FROM seen),
		       (SELECT status FROM pend WHERE pend.created_at > now() - $8::interval
		        ORDER BY pend.created_at DESC LIMIT 1)
		FROM m ORDER BY joined_at, id`)

// MemberHello looks up members of c's mesh and, in the same statement,
// records hello c of member memberID when the mesh has a live member with
// c's key and that id (as AcceptHellos records it: kept for keep, taking
// the pending hook status younger than pendingTTL). It returns the mesh's
// live members when all is set, else only the one with c's key (none when
// there is no such member); recorded reports whether the hello was
// recorded (res then says whether it was fresh). When Postgres refuses
// c's values (edge validation should have caught them), the members are
// read without recording anything: whoever shares the lookup still gets
// them, and the hello recorded the plain way (AcceptHellos) reports the
// refusal for itself alone.
func (s *Store) MemberHello(ctx context.Context, keep, pendingTTL time.Duration, all bool, memberID string, c HelloCheck) (members []Member, recorded bool, res HelloResult, err error) {
	members, recorded, res, err = s.memberHello(ctx, keep, pendingTTL, all, memberID, c)
	if err == nil || !IsDataError(err) {
		return members, recorded, res, err
	}
	if all {
		members, err = s.MeshMembers(ctx, c.MeshID)
		return members, false, HelloResult{}, err
	}
	m, err := s.MemberByPubkey(ctx, c.MeshID, c.Pubkey)
	if errors.Is(err, ErrNotFound) {
		return nil, false, HelloResult{}, nil
	}
	if err != nil {
		return nil, false, HelloResult{}, err
	}
	return []Member{m}, false, HelloResult{}, nil
}

func (s *Store) memberHello(ctx context.Context, keep, pendingTTL time.Duration, all bool, memberID string, c HelloCheck) (members []Member, recorded bool, res HelloResult, err error) {
	rows, err := s.pool.Query(ctx, memberHelloSQL, c.MeshID, c.Pubkey, memberID, c.SigHash, keep, c.Cwd, c.PID, pendingTTL, all)
	if err != nil {
		return nil, false, HelloResult{}, fmt.Errorf("member hello: %w", err)
	}
	members, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (Member, error) {
		var m Member
		var fresh bool
		var pend *string
		err := r.Scan(&m.ID, &m.MeshID, &m.Pubkey, &m.DisplayName, &m.Role, &m.Groups, &m.JoinedAt, &m.RevokedAt, &fresh, &pend)
		if err == nil && m.Pubkey == c.Pubkey && m.ID == memberID {
			recorded, res.Fresh = true, fresh
			if pend != nil {
				res.Pending = *pend
			}
		}
		return m, err
	})
	if err != nil {
		return nil, false, HelloResult{}, fmt.Errorf("member hello: %w", err)
	}
	return members, recorded, res, nil
}
