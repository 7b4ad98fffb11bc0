package store

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrNameTaken: another live member of the mesh has that display name
// (compared case-insensitively). Names address members, so two alices would
// let one receive what was meant for the other. It wraps ErrConflict.
var ErrNameTaken = fmt.Errorf("display name taken: %w", ErrConflict)

// nameIndex is the partial unique index on live members' lowered names.
const nameIndex = "member_live_display_name"

// checkNameFree answers ErrNameTaken, when another key holds the name,
// before anything is spent (an invite use); the unique index still decides
// races. The same key enrolled again is the pubkey conflict, not this.
func checkNameFree(ctx context.Context, tx pgx.Tx, meshID, pubkey, name string) error {
	var taken bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM member
		WHERE mesh_id = $1 AND revoked_at IS NULL AND lower(display_name) = lower($2) AND pubkey <> $3)`,
		meshID, name, pubkey).Scan(&taken); err != nil {
		return err
	}
	if taken {
		return fmt.Errorf("%q in mesh %s: %w", name, meshID, ErrNameTaken)
	}
	return nil
}

func isNameViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.ConstraintName == nameIndex
}
