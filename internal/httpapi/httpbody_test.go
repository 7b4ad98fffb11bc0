package httpapi_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

// Hook and /join bodies with a NUL (which Postgres refuses) are answered
// 400 at the edge, while honest hooks (kept as pending statuses, a
// Postgres write) and honest joins of the same moment succeed.
func TestNULHookAndJoinBodies(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	ctx := context.Background()
	mesh, err := admin.CreateMesh(ctx, n.Store(), "bodies", "")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := admin.CreateInvite(ctx, n.Store(), mesh.MeshID, 100, time.Hour, "member", "ws://x/ws")
	if err != nil {
		t.Fatal(err)
	}
	status := func(url, body string) int {
		resp, err := http.Post(url, "application/json", bytes.NewBufferString(body))
		if err != nil {
			t.Error(err)
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	const each = 20
	var wg sync.WaitGroup
	codes := make(chan string, 4*each)
	for i := 0; i < each; i++ {
		wg.Add(4)
		go func() { // an honest hook before its session: a pending status
			defer wg.Done()
			if c := status(n.HookURL(), fmt.Sprintf(`{"cwd":"/honest/%d","pid":%d,"status":"working"}`, i, 1000+i)); c != http.StatusOK {
				codes <- fmt.Sprintf("honest hook %d: %d", i, c)
			}
		}()
		go func() {
			defer wg.Done()
			if c := status(n.HookURL(), fmt.Sprintf(`{"cwd":"/bad\u0000%d","pid":%d,"status":"working"}`, i, 2000+i)); c != http.StatusBadRequest {
				codes <- fmt.Sprintf("NUL hook %d: %d, want 400", i, c)
			}
		}()
		go func() {
			defer wg.Done()
			if c, r := testkit.Join(t, n.HTTPURL(), inv.Token, fmt.Sprintf("honest-%d", i)); c != http.StatusOK {
				codes <- fmt.Sprintf("honest join %d: %d %+v", i, c, r)
			}
		}()
		go func() {
			defer wg.Done()
			if c, r := testkit.Join(t, n.HTTPURL(), inv.Token, fmt.Sprintf("bad\x00%d", i)); c != http.StatusBadRequest || r.Error != "malformed" {
				codes <- fmt.Sprintf("NUL join %d: %d %+v, want 400 malformed", i, c, r)
			}
		}()
	}
	wg.Wait()
	close(codes)
	for c := range codes {
		t.Error(c)
	}
}
