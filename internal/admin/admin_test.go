package admin_test

import (
	"bytes"
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

// `--mesh` takes an id or a slug; a name that is neither says where to look.
func TestResolveMesh(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, pgtest.NewDB(t), 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := admin.CreateMesh(ctx, st, "demo", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{m.MeshID, "demo", " demo "} {
		got, err := admin.ResolveMesh(ctx, st, ref)
		if err != nil || got.ID != m.MeshID {
			t.Errorf("ResolveMesh(%q) = %s, %v; want %s", ref, got.ID, err, m.MeshID)
		}
	}
	if _, err := admin.ResolveMesh(ctx, st, "nope"); err == nil || !strings.Contains(err.Error(), "mesh list") {
		t.Errorf("unknown mesh: %v", err)
	}
}

// The audit log names members next to their ids: targets of admin actions,
// actors by member id and, for rejected hellos, by a live member's pubkey.
// Events about non-members keep the bare value.
func TestAuditShowsNames(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, pgtest.NewDB(t), 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := admin.CreateMesh(ctx, st, "demo", "")
	if err != nil {
		t.Fatal(err)
	}
	other, err := admin.CreateMesh(ctx, st, "other", "")
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	alice, err := admin.AddMember(ctx, st, m.MeshID, hex.EncodeToString(pub), "alice", "member")
	if err != nil {
		t.Fatal(err)
	}
	// The same key in another mesh under another name must not leak into
	// this mesh's events.
	if _, err := admin.AddMember(ctx, st, other.MeshID, hex.EncodeToString(pub), "not-alice", "member"); err != nil {
		t.Fatal(err)
	}
	stranger := strings.Repeat("ab", 32)
	if err := st.InsertAudit(ctx, []store.AuditEvent{
		{MeshID: m.MeshID, Type: store.EventPeerConnected, Actor: alice.ID},
		{MeshID: m.MeshID, Type: store.EventHelloRejected, Actor: alice.Pubkey},
		{MeshID: m.MeshID, Type: store.EventHelloRejected, Actor: stranger},
	}); err != nil {
		t.Fatal(err)
	}
	events, err := st.ListAudit(ctx, m.MeshID, "", 50)
	if err != nil {
		t.Fatal(err)
	}
	byActor := map[string]store.AuditEvent{}
	var added *store.AuditEvent
	for i, e := range events {
		byActor[e.Type+"/"+e.Actor] = e
		if e.Type == store.EventMemberAdded {
			added = &events[i]
		}
	}
	if added == nil || added.Target != alice.ID || added.TargetName != "alice" || added.ActorName != "" {
		t.Errorf("member_added: %+v", added)
	}
	if e := byActor[store.EventPeerConnected+"/"+alice.ID]; e.ActorName != "alice" {
		t.Errorf("peer_connected actor name %q, want alice", e.ActorName)
	}
	if e := byActor[store.EventHelloRejected+"/"+alice.Pubkey]; e.ActorName != "alice" {
		t.Errorf("hello_rejected by alice's key: actor name %q", e.ActorName)
	}
	if e, ok := byActor[store.EventHelloRejected+"/"+stranger]; !ok || e.ActorName != "" {
		t.Errorf("hello_rejected by a stranger: %+v", e)
	}
	if len(events) != 5 { // mesh_created, member_added, 3 inserted
		t.Errorf("%d events, want 5 (a join must not duplicate rows): %+v", len(events), events)
	}

	var buf bytes.Buffer
	if err := admin.WriteAuditTable(&buf, events); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), alice.ID+" (alice)") || strings.Contains(buf.String(), "not-alice") ||
		!strings.Contains(buf.String(), stranger) {
		t.Errorf("audit table:\n%s", buf.String())
	}
}
