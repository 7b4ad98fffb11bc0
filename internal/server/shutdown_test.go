package server_test

import (
	"context"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/testkit"
)

// A peer that never answers the close handshake cannot keep a session's
// goroutines alive past a shutdown that ran out of time: the sockets left
// are cut, and every session is gone when Shutdown returns.
func TestShutdownCutsUnansweredCloses(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	testkit.DialSilent(t, n.URL(), mesh.Members[1], client.HelloOptions{}, 0) // reads nothing, answers no close
	testkit.Eventually(t, 5*time.Second, "both sessions up", func() bool { return n.Server().Sessions() == 2 })
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_ = n.Shutdown(ctx)
	if left := n.Server().Sessions(); left != 0 {
		t.Fatalf("%d sessions still being torn down %v after the shutdown began", left, time.Since(start))
	}
}
