package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// MemberChannel carries "meshId" or "meshId|memberId|revoked" whenever a
// mesh's membership changes, so nodes refresh their caches and close
// revoked sessions without polling.
const MemberChannel = "cm_member"

// Mesh is a group of members.
type Mesh struct {
	ID             string     `json:"meshId"`
	Name           string     `json:"name"`
	Slug           string     `json:"slug"`
	OwnerPubkey    string     `json:"ownerPubkey"`
	OwnerSecretKey string     `json:"-"`
	RootKey        string     `json:"-"`
	CreatedAt      time.Time  `json:"createdAt"`
	ArchivedAt     *time.Time `json:"archivedAt,omitempty"`
	MemberCount    int        `json:"memberCount"`
}

// Member is an enrolled identity of a mesh.
type Member struct {
	ID          string     `json:"memberId"`
	MeshID      string     `json:"meshId"`
	Pubkey      string     `json:"pubkey"`
	DisplayName string     `json:"displayName"`
	Role        string     `json:"role"`
	Groups      []string   `json:"groups"`
	JoinedAt    time.Time  `json:"joinedAt"`
	RevokedAt   *time.Time `json:"revokedAt,omitempty"`
}

// CreateMesh inserts a mesh. A taken slug is ErrConflict.
func (s *Store) CreateMesh(ctx context.Context, m Mesh) (Mesh, error) {
	if m.ID == "" {
		m.ID = NewID()
	}
	err := s.pool.QueryRow(ctx, `
		INSERT INTO mesh (id, name, slug, owner_pubkey, owner_secret_key, root_key)
		VALUES ($1, $2, $3, $4, NULLIF($5, ''), NULLIF($6, ''))
		RETURNING created_at`,
		m.ID, m.Name, m.Slug, m.OwnerPubkey, m.OwnerSecretKey, m.RootKey).Scan(&m.CreatedAt)
	if isUniqueViolation(err) {
		return Mesh{}, fmt.Errorf("mesh slug %q: %w", m.Slug, ErrConflict)
	}
	if err != nil {
		return Mesh{}, fmt.Errorf("create mesh: %w", err)
	}
	return m, nil
}

// GetMesh loads a mesh by id.
func (s *Store) GetMesh(ctx context.Context, id string) (Mesh, error) {
	var m Mesh
	var secret, root *string
	err := s.pool.QueryRow(ctx, `
		SELECT id, name, slug, owner_pubkey, owner_secret_key, root_key, created_at, archived_at
		FROM mesh WHERE id = $1`, id).
		Scan(&m.ID, &m.Name, &m.Slug, &m.OwnerPubkey, &secret, &root, &m.CreatedAt, &m.ArchivedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return Mesh{}, fmt.Errorf("mesh %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return Mesh{}, fmt.Errorf("get mesh: %w", err)
	}
	if secret != nil {
		m.OwnerSecretKey = *secret
	}
	if root != nil {
		m.RootKey = *root
	}
	return m, nil
}

// ListMeshes returns every mesh with its live member count.
func (s *Store) ListMeshes(ctx context.Context) ([]Mesh, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT m.id, m.name, m.slug, m.owner_pubkey, m.created_at, m.archived_at,
		       (SELECT count(*) FROM member x WHERE x.mesh_id = m.id AND x.revoked_at IS NULL)
		FROM mesh m ORDER BY m.created_at`)
	if err != nil {
		return nil, fmt.Errorf("list meshes: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Mesh, error) {
		var m Mesh
		err := r.Scan(&m.ID, &m.Name, &m.Slug, &m.OwnerPubkey, &m.CreatedAt, &m.ArchivedAt, &m.MemberCount)
		return m, err
	})
}

// AddMember enrols pubkey in a mesh. A live member with that pubkey is
// ErrConflict, one with that display name ErrNameTaken. The change is
// announced on MemberChannel.
func (s *Store) AddMember(ctx context.Context, m Member) (Member, error) {
	if m.ID == "" {
		m.ID = NewID()
	}
	if m.Role == "" {
		m.Role = "member"
	}
	if m.Groups == nil {
		m.Groups = []string{}
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var archived *time.Time
		if err := tx.QueryRow(ctx, `SELECT archived_at FROM mesh WHERE id = $1`, m.MeshID).Scan(&archived); err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				return fmt.Errorf("mesh %s: %w", m.MeshID, ErrNotFound)
			}
			return err
		}
		if archived != nil {
			return fmt.Errorf("mesh %s is archived: %w", m.MeshID, ErrNotFound)
		}
		if err := checkNameFree(ctx, tx, m.MeshID, m.Pubkey, m.DisplayName); err != nil {
			return err
		}
		err := tx.QueryRow(ctx, `
			INSERT INTO member (id, mesh_id, pubkey, display_name, role, groups)
			VALUES ($1, $2, $3, $4, $5, $6) RETURNING joined_at`,
			m.ID, m.MeshID, m.Pubkey, m.DisplayName, m.Role, m.Groups).Scan(&m.JoinedAt)
		if isNameViolation(err) {
			return fmt.Errorf("%q in mesh %s: %w", m.DisplayName, m.MeshID, ErrNameTaken)
		}
		if isUniqueViolation(err) {
			return fmt.Errorf("pubkey already a member of mesh %s: %w", m.MeshID, ErrConflict)
		}
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `SELECT pg_notify($1, $2)`, MemberChannel, m.MeshID)
		return err
	})
	if err != nil {
		return Member{}, fmt.Errorf("add member: %w", err)
	}
	return m, nil
}

// RevokeMember revokes the live member with pubkey and announces it on
// MemberChannel so every node closes its sessions.
func (s *Store) RevokeMember(ctx context.Context, meshID, pubkey string) (Member, error) {
	var m Member
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `
			UPDATE member SET revoked_at = now()
			WHERE mesh_id = $1 AND pubkey = $2 AND revoked_at IS NULL
			RETURNING id, mesh_id, pubkey, display_name, role, groups, joined_at, revoked_at`,
			meshID, pubkey).Scan(&m.ID, &m.MeshID, &m.Pubkey, &m.DisplayName, &m.Role, &m.Groups, &m.JoinedAt, &m.RevokedAt)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("no live member with that pubkey in mesh %s: %w", meshID, ErrNotFound)
		}
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `SELECT pg_notify($1, $2)`, MemberChannel, meshID+"|"+m.ID+"|revoked")
		return err
	})
	if err != nil {
		return Member{}, fmt.Errorf("revoke member: %w", err)
	}
	return m, nil
}

const memberCols = `id, mesh_id, pubkey, display_name, role, groups, joined_at, revoked_at`

func scanMember(r pgx.CollectableRow) (Member, error) {
	var m Member
	err := r.Scan(&m.ID, &m.MeshID, &m.Pubkey, &m.DisplayName, &m.Role, &m.Groups, &m.JoinedAt, &m.RevokedAt)
	return m, err
}

// meshMembersSQL is run by a hello whose mesh is not cached.
var meshMembersSQL = hotSync("mesh members", `SELECT `+memberCols+` FROM member
		WHERE mesh_id = $1 AND revoked_at IS NULL ORDER BY joined_at, id`)

// MeshMembers returns the live (non-revoked) members of a mesh.
func (s *Store) MeshMembers(ctx context.Context, meshID string) ([]Member, error) {
	rows, err := s.pool.Query(ctx, meshMembersSQL, meshID)
	if err != nil {
		return nil, fmt.Errorf("mesh members: %w", err)
	}
	return pgx.CollectRows(rows, scanMember)
}

// MembersByID returns members (revoked or not) by id.
func (s *Store) MembersByID(ctx context.Context, ids []string) ([]Member, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+memberCols+` FROM member WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("members by id: %w", err)
	}
	return pgx.CollectRows(rows, scanMember)
}

// memberByPubkeySQL is run by a hello of a member the mesh's cached list
// does not have yet.
var memberByPubkeySQL = hotSync("member by pubkey", `SELECT `+memberCols+` FROM member
		WHERE mesh_id = $1 AND pubkey = $2 AND revoked_at IS NULL`)

// MemberByPubkey returns the live member of meshID with pubkey.
func (s *Store) MemberByPubkey(ctx context.Context, meshID, pubkey string) (Member, error) {
	rows, err := s.pool.Query(ctx, memberByPubkeySQL, meshID, pubkey)
	if err != nil {
		return Member{}, fmt.Errorf("member by pubkey: %w", err)
	}
	m, err := pgx.CollectExactlyOneRow(rows, scanMember)
	if errors.Is(err, pgx.ErrNoRows) {
		return Member{}, ErrNotFound
	}
	return m, err
}

// RevokedAmong returns the ids among ids that are revoked or gone.
func (s *Store) RevokedAmong(ctx context.Context, ids []string) ([]string, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT x FROM unnest($1::text[]) AS x
		WHERE NOT EXISTS (SELECT 1 FROM member m WHERE m.id = x AND m.revoked_at IS NULL)`, ids)
	if err != nil {
		return nil, fmt.Errorf("revoked members: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// TouchMembers records that members were seen online.
func (s *Store) TouchMembers(ctx context.Context, ids []string) error {
	_, err := s.pool.Exec(ctx, `UPDATE member SET last_seen_at = now() WHERE id = ANY($1)`, ids)
	return err
}

// MeshBySlug loads a mesh by slug.
func (s *Store) MeshBySlug(ctx context.Context, slug string) (Mesh, error) {
	var id string
	err := s.pool.QueryRow(ctx, `SELECT id FROM mesh WHERE slug = $1`, slug).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return Mesh{}, fmt.Errorf("mesh %q: %w", slug, ErrNotFound)
	}
	if err != nil {
		return Mesh{}, fmt.Errorf("mesh by slug: %w", err)
	}
	return s.GetMesh(ctx, id)
}

// DeleteMesh removes a mesh and everything in it: members, invites,
// messages, delivery rows and audit events. Live sessions of its members
// are closed by the nodes (the change is announced as a revocation of each
// member).
func (s *Store) DeleteMesh(ctx context.Context, id string) error {
	// Nodes mark deliveries of the mesh while it is deleted; the row locks
	// can then meet in a deadlock, which Postgres resolves by aborting one
	// side. Retry ours a few times.
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		if err = s.deleteMesh(ctx, id); !isDeadlock(err) {
			return err
		}
	}
	return err
}

func isDeadlock(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == "40P01" || pgErr.Code == "40001")
}

func (s *Store) deleteMesh(ctx context.Context, id string) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var exists bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM mesh WHERE id = $1)`, id).Scan(&exists); err != nil {
			return err
		}
		if !exists {
			return fmt.Errorf("mesh %s: %w", id, ErrNotFound)
		}
		rows, err := tx.Query(ctx, `SELECT id FROM member WHERE mesh_id = $1 AND revoked_at IS NULL`, id)
		if err != nil {
			return err
		}
		members, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		for _, q := range []string{
			`DELETE FROM delivery WHERE message_id IN (SELECT id FROM message WHERE mesh_id = $1)`,
			`DELETE FROM message WHERE mesh_id = $1`,
			`DELETE FROM invite WHERE mesh_id = $1`,
			`DELETE FROM member WHERE mesh_id = $1`,
			`DELETE FROM audit_log WHERE mesh_id = $1`,
			`DELETE FROM mesh WHERE id = $1`,
		} {
			if _, err := tx.Exec(ctx, q, id); err != nil {
				return fmt.Errorf("delete mesh: %w", err)
			}
		}
		for _, m := range members {
			if _, err := tx.Exec(ctx, `SELECT pg_notify($1, $2)`, MemberChannel, id+"|"+m+"|revoked"); err != nil {
				return err
			}
		}
		return nil
	})
}
