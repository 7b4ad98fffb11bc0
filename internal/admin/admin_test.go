package admin_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func TestAdmin(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, pgtest.NewDB(t), 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	a, err := admin.CreateMesh(ctx, st, "Team Rocket!", "")
	if err != nil || a.Slug != "team-rocket" || len(a.OwnerSecretKey) != 128 {
		t.Fatalf("create: %+v %v", a, err)
	}
	// The same name again gets a distinct derived slug; an explicit taken slug is an error.
	b, err := admin.CreateMesh(ctx, st, "Team Rocket!", "")
	if err != nil || b.Slug == a.Slug || !strings.HasPrefix(b.Slug, "team-rocket-") {
		t.Fatalf("second create: %+v %v", b, err)
	}
	if _, err := admin.CreateMesh(ctx, st, "x", "team-rocket"); err == nil {
		t.Fatal("taken slug accepted")
	}
	if _, err := admin.CreateMesh(ctx, st, "x", "Bad Slug"); err == nil {
		t.Fatal("invalid slug accepted")
	}

	// The identity point (a small-order key) verifies forged signatures.
	identity := "01" + strings.Repeat("00", 31)
	if _, err := admin.AddMember(ctx, st, a.MeshID, identity, "mallory", "member"); err == nil {
		t.Fatal("small-order key enrolled")
	}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	m, err := admin.AddMember(ctx, st, a.MeshID, strings.ToUpper(hex.EncodeToString(pub)), " alice ", "")
	if err != nil || m.Role != "member" || m.DisplayName != "alice" || m.Pubkey != hex.EncodeToString(pub) {
		t.Fatalf("add: %+v %v", m, err)
	}
	if _, err := admin.AddMember(ctx, st, a.MeshID, hex.EncodeToString(pub), "again", "member"); err == nil {
		t.Fatal("same pubkey enrolled twice")
	}

	inv, err := admin.CreateInvite(ctx, st, a.MeshID, 2, time.Hour, "admin", "wss://broker.example/ws")
	if err != nil {
		t.Fatal(err)
	}
	p, err := auth.ParseInvite(inv.Token)
	if err != nil || p.Verify() != nil || p.OwnerPubkey != a.OwnerPubkey || p.Role != "admin" || p.RootKey == "" {
		t.Fatalf("invite %+v: %v", p, err)
	}
	for _, bad := range []struct {
		uses int
		ttl  time.Duration
		role string
	}{{0, time.Hour, "member"}, {1, 0, "member"}, {1, time.Hour, "root"}} {
		if _, err := admin.CreateInvite(ctx, st, a.MeshID, bad.uses, bad.ttl, bad.role, ""); err == nil {
			t.Errorf("invite %+v accepted", bad)
		}
	}
	if _, err := admin.RevokeMember(ctx, st, a.MeshID, hex.EncodeToString(pub)); err != nil {
		t.Fatal(err)
	}
	if err := admin.DeleteMesh(ctx, st, a.MeshID); err != nil {
		t.Fatal(err)
	}
}
