package httpapi_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

// /join refuses a display name another member has (whatever its case) with
// 409 name_taken, and spends no use of the invite.
func TestJoinNameTaken(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "names", "")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 2, time.Hour, "member", "ws://x/ws")
	if err != nil {
		t.Fatal(err)
	}
	if code, r := testkit.Join(t, n.HTTPURL(), inv.Token, "alice"); code != http.StatusOK || !r.OK {
		t.Fatalf("first alice: %d %+v", code, r)
	}
	code, r := testkit.Join(t, n.HTTPURL(), inv.Token, "ALICE")
	if code != http.StatusConflict || r.Error != "name_taken" {
		t.Fatalf("second alice: %d %+v, want 409 name_taken", code, r)
	}
	// The refused join spent nothing: one use is left.
	if code, r := testkit.Join(t, n.HTTPURL(), inv.Token, "bob"); code != http.StatusOK || !r.OK {
		t.Fatalf("bob after the refusal: %d %+v", code, r)
	}
}
