package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Invite redemption failures.
var (
	ErrInviteExpired   = errors.New("invite expired")
	ErrInviteRevoked   = errors.New("invite revoked")
	ErrInviteExhausted = errors.New("invite has no uses left")
)

// Invite is an owner-signed enrolment token.
type Invite struct {
	ID        string
	MeshID    string
	Token     string
	Payload   string // the canonical signed bytes
	Signature string
	Role      string
	MaxUses   int
	UsedCount int
	ExpiresAt time.Time
	CreatedAt time.Time
	RevokedAt *time.Time
}

// CreateInvite stores an invite.
func (s *Store) CreateInvite(ctx context.Context, inv Invite) (Invite, error) {
	if inv.ID == "" {
		inv.ID = NewID()
	}
	err := s.pool.QueryRow(ctx, `
		INSERT INTO invite (id, mesh_id, token, payload, signature, role, max_uses, expires_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at`,
		inv.ID, inv.MeshID, inv.Token, inv.Payload, inv.Signature, inv.Role, inv.MaxUses, inv.ExpiresAt).Scan(&inv.CreatedAt)
	if err != nil {
		return Invite{}, fmt.Errorf("create invite: %w", err)
	}
	return inv, nil
}

// InviteByToken loads an invite.
func (s *Store) InviteByToken(ctx context.Context, token string) (Invite, error) {
	var inv Invite
	err := s.pool.QueryRow(ctx, `
		SELECT id, mesh_id, token, payload, signature, role, max_uses, used_count, expires_at, created_at, revoked_at
		FROM invite WHERE token = $1`, token).Scan(&inv.ID, &inv.MeshID, &inv.Token, &inv.Payload, &inv.Signature,
		&inv.Role, &inv.MaxUses, &inv.UsedCount, &inv.ExpiresAt, &inv.CreatedAt, &inv.RevokedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return Invite{}, fmt.Errorf("invite: %w", ErrNotFound)
	}
	if err != nil {
		return Invite{}, fmt.Errorf("invite by token: %w", err)
	}
	return inv, nil
}

// RevokeInvite revokes an invite by id.
func (s *Store) RevokeInvite(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `UPDATE invite SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL`, id)
	if err != nil {
		return fmt.Errorf("revoke invite: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("invite %s: %w", id, ErrNotFound)
	}
	return nil
}

// RedeemInvite enrols pubkey with the invite's role. It is idempotent for a
// pubkey that is already a live member of the mesh (no use is spent), and
// spends a use by compare-and-set otherwise, so concurrent redemptions can
// never exceed max_uses. A display name another live member has is
// ErrNameTaken, and spends nothing. The signature must have been checked by
// the caller.
func (s *Store) RedeemInvite(ctx context.Context, inv Invite, pubkey, displayName string) (m Member, already bool, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT `+memberCols+` FROM member
			WHERE mesh_id = $1 AND pubkey = $2 AND revoked_at IS NULL`, inv.MeshID, pubkey)
		if err != nil {
			return err
		}
		existing, err := pgx.CollectRows(rows, scanMember)
		if err != nil {
			return err
		}
		if len(existing) > 0 {
			m, already = existing[0], true
			return nil
		}
		if err := checkNameFree(ctx, tx, inv.MeshID, pubkey, displayName); err != nil {
			return err // before a use is spent
		}
		var role string
		err = tx.QueryRow(ctx, `
			UPDATE invite SET used_count = used_count + 1
			WHERE id = $1 AND used_count < max_uses AND revoked_at IS NULL AND expires_at > now()
			RETURNING role`, inv.ID).Scan(&role)
		if errors.Is(err, pgx.ErrNoRows) {
			var used, max int
			var revoked *time.Time
			var expires time.Time
			var now time.Time
			if err := tx.QueryRow(ctx, `SELECT used_count, max_uses, revoked_at, expires_at, now() FROM invite WHERE id = $1`, inv.ID).
				Scan(&used, &max, &revoked, &expires, &now); err != nil {
				return fmt.Errorf("invite: %w", ErrNotFound)
			}
			switch {
			case revoked != nil:
				return ErrInviteRevoked
			case !expires.After(now):
				return ErrInviteExpired
			default:
				return ErrInviteExhausted
			}
		}
		if err != nil {
			return err
		}
		m = Member{ID: NewID(), MeshID: inv.MeshID, Pubkey: pubkey, DisplayName: displayName, Role: role, Groups: []string{}}
		if err := tx.QueryRow(ctx, `
			INSERT INTO member (id, mesh_id, pubkey, display_name, role) VALUES ($1, $2, $3, $4, $5)
			RETURNING joined_at`, m.ID, m.MeshID, m.Pubkey, m.DisplayName, m.Role).Scan(&m.JoinedAt); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `SELECT pg_notify($1, $2)`, MemberChannel, inv.MeshID)
		return err
	})
	if isNameViolation(err) {
		// A concurrent join took the name first.
		return Member{}, false, fmt.Errorf("%q in mesh %s: %w", displayName, inv.MeshID, ErrNameTaken)
	}
	if isUniqueViolation(err) {
		// A concurrent redemption by the same pubkey won; answer as a re-join.
		m, err = s.MemberByPubkey(ctx, inv.MeshID, pubkey)
		return m, err == nil, err
	}
	return m, already, err
}
