package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"

	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
	migrations "github.com/claudemesh/broker/sql"
)

// A display name names one live member of a mesh, case-insensitively: a
// second "alice" is refused, by AddMember and by RedeemInvite (which then
// spends no use, also when several join at once); other meshes and revoked
// members do not count, and the same key enrolled again is the pubkey
// conflict.
func TestUniqueDisplayName(t *testing.T) {
	s := open(t)
	ctx := context.Background()
	f := seed(t, s, 0)
	alice, err := s.AddMember(ctx, store.Member{MeshID: f.mesh.ID, Pubkey: fmt.Sprintf("%064x", 100), DisplayName: "Alice"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.AddMember(ctx, store.Member{MeshID: f.mesh.ID, Pubkey: fmt.Sprintf("%064x", 101), DisplayName: "alice"})
	if !errors.Is(err, store.ErrNameTaken) || !errors.Is(err, store.ErrConflict) {
		t.Fatalf("second alice: %v, want ErrNameTaken", err)
	}
	_, err = s.AddMember(ctx, store.Member{MeshID: f.mesh.ID, Pubkey: alice.Pubkey, DisplayName: "Alice"})
	if !errors.Is(err, store.ErrConflict) || errors.Is(err, store.ErrNameTaken) {
		t.Fatalf("same key again: %v, want the pubkey conflict", err)
	}
	other := seed(t, s, 0)
	if _, err := s.AddMember(ctx, store.Member{MeshID: other.mesh.ID, Pubkey: fmt.Sprintf("%064x", 101), DisplayName: "alice"}); err != nil {
		t.Fatalf("alice in another mesh: %v", err)
	}

	inv, err := s.CreateInvite(ctx, store.Invite{ID: store.NewID(), MeshID: f.mesh.ID, Token: "tok-" + store.NewID(),
		Payload: "p", Signature: "s", Role: "member", MaxUses: 20, ExpiresAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.RedeemInvite(ctx, inv, fmt.Sprintf("%064x", 102), "ALICE"); !errors.Is(err, store.ErrNameTaken) {
		t.Fatalf("redeem as ALICE: %v, want ErrNameTaken", err)
	}
	// Eight keys join as "bob" at once: one wins, one use is spent.
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, errs[i] = s.RedeemInvite(ctx, inv, fmt.Sprintf("%064x", 200+i), "bob")
		}()
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, store.ErrNameTaken):
			t.Fatalf("concurrent join: %v", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d joins as bob succeeded, want 1", won)
	}
	got, err := s.InviteByToken(ctx, inv.Token)
	if err != nil || got.UsedCount != 1 {
		t.Fatalf("invite used %d times (%v), want 1: refused joins spend nothing", got.UsedCount, err)
	}

	if _, err := s.RevokeMember(ctx, f.mesh.ID, alice.Pubkey); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AddMember(ctx, store.Member{MeshID: f.mesh.ID, Pubkey: fmt.Sprintf("%064x", 103), DisplayName: "alice"}); err != nil {
		t.Fatalf("alice after the first was revoked: %v", err)
	}
}

// The migration that adds the unique index keeps the oldest of live
// members sharing a name and appends their key's fingerprint to the others.
func TestUniqueNameMigrationRenamesDuplicates(t *testing.T) {
	url := pgtest.NewDB(t)
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	db := stdlib.OpenDB(*cfg)
	defer db.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS, goose.WithDisableGlobalRegistry(true))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := p.DownTo(ctx, 2); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`INSERT INTO mesh (id, name, slug, owner_pubkey) VALUES ('m1', 'm', 'm1', 'o')`,
		`INSERT INTO member (id, mesh_id, pubkey, display_name, joined_at) VALUES
			('a1', 'm1', 'aaaaaaaa11', 'alice', now() - interval '2 hours'),
			('a2', 'm1', 'bbbbbbbb22', 'Alice', now() - interval '1 hour'),
			('a3', 'm1', 'cccccccc33', 'bob', now())`,
		`INSERT INTO member (id, mesh_id, pubkey, display_name, revoked_at) VALUES ('a4', 'm1', 'dddddddd44', 'alice', now())`,
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Up(ctx); err != nil {
		t.Fatal(err)
	}
	names := map[string]string{}
	rows, err := db.QueryContext(ctx, `SELECT id, display_name FROM member`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var id, name string
		if err := rows.Scan(&id, &name); err != nil {
			t.Fatal(err)
		}
		names[id] = name
	}
	want := map[string]string{"a1": "alice", "a2": "Alice (bbbbbbbb)", "a3": "bob", "a4": "alice"}
	for id, n := range want {
		if names[id] != n {
			t.Fatalf("after the migration %s is %q, want %q (all: %v)", id, names[id], n, names)
		}
	}
}
