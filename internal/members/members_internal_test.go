package members

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"fmt"
	"testing"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/store"
)

// Anyone can sign a hello with a key of their own for a mesh id they make
// up: the lookups it causes must not leave entries behind, and real meshes
// stay bounded too, the oldest list going first (counted).
func TestMemberCacheBounded(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, pgtest.NewDB(t), 4)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	evicted := 0
	c := New(st, func() { evicted++ })
	c.max = 2

	var meshes []string
	for i := 0; i < 3; i++ {
		mc, err := admin.CreateMesh(ctx, st, fmt.Sprintf("m%d", i), "")
		if err != nil {
			t.Fatal(err)
		}
		pub, _, _ := ed25519.GenerateKey(nil)
		if _, err := admin.AddMember(ctx, st, mc.MeshID, hex.EncodeToString(pub), "alice", "member"); err != nil {
			t.Fatal(err)
		}
		meshes = append(meshes, mc.MeshID)
	}
	stranger := hex.EncodeToString(make([]byte, 32))
	for i := 0; i < 500; i++ {
		if _, err := c.ByPubkey(ctx, fmt.Sprintf("made-up-%d", i), stranger); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("lookup in a made-up mesh: %v", err)
		}
	}
	if n := c.Len(); n != 0 {
		t.Fatalf("%d made-up meshes cached", n)
	}
	for _, m := range meshes {
		all, err := c.All(ctx, m)
		if err != nil || len(all) != 1 {
			t.Fatalf("mesh %s: %v members, %v", m, len(all), err)
		}
	}
	if n := c.Len(); n != 2 || evicted != 1 {
		t.Fatalf("%d meshes cached, %d evicted; want 2 and 1", n, evicted)
	}
	if _, ok := c.meshes[meshes[0]]; ok {
		t.Fatal("the oldest list was kept and a newer one dropped")
	}
}
