package server_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// concurrentHellos dials one socket per identity, then says every hello at
// once; it returns how many were accepted and how many refused capacity
// (any other outcome fails t). Accepted connections stay open (returned).
func concurrentHellos(t *testing.T, url string, ids []client.Identity, tag string) (accepted []*client.Conn, capacity int) {
	t.Helper()
	conns := make([]*client.Conn, len(ids))
	for i := range ids {
		conns[i] = testkit.Dial(t, url)
	}
	start := make(chan struct{})
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			h := client.NewHello(ids[i], client.HelloOptions{SessionID: fmt.Sprintf("%s-%d", tag, i)})
			<-start
			if err := c.WriteJSON(ctx, h); err != nil {
				errs[i] = err
				return
			}
			_, errs[i] = c.WaitHelloAck(ctx)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		var he *client.HelloError
		switch {
		case err == nil:
			accepted = append(accepted, conns[i])
		case errors.As(err, &he) && he.Code == protocol.ReasonCapacity:
			capacity++
		default:
			t.Fatalf("%s hello %d: %v, want hello_ack or capacity", tag, i, err)
		}
	}
	return accepted, capacity
}

// MAX_SESSIONS_PER_MEMBER and MAX_CONNECTIONS_PER_MESH hold against
// concurrent hellos: the caps were checked before the hello's database
// round trip and counted only at register, so 40 hellos said at once all
// passed a cap of 3. Each hello now holds its place from the check on.
// Honest members keep sending, and say new hellos, meanwhile.
func TestConcurrentHellosKeepCaps(t *testing.T) {
	const perMember, perMesh, burst = 3, 8, 40
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) {
		c.MaxSessionsPerMember, c.MaxConnsPerMesh = perMember, perMesh
	}})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	flooder, honest, honest2 := mesh.Members[0], mesh.Members[1], mesh.Members[2]
	a := testkit.Connect(t, n.URL(), honest, client.HelloOptions{SessionID: "honest-a"})
	b := testkit.Connect(t, n.URL(), honest2, client.HelloOptions{SessionID: "honest-b"})

	stopHonest := testkit.HonestTraffic(t, a, b, honest2)
	defer stopHonest()

	ids := make([]client.Identity, burst)
	for i := range ids {
		ids[i] = flooder
	}
	acc, capa := concurrentHellos(t, n.URL(), ids, "member")
	if len(acc) != perMember || capa != burst-perMember {
		t.Fatalf("%d concurrent hellos of one member with MAX_SESSIONS_PER_MEMBER=%d: %d accepted, %d capacity; want %d and %d",
			burst, perMember, len(acc), capa, perMember, burst-perMember)
	}
	// The honest member's second session still fits (its own cap, and the
	// mesh has 2+3 of 8).
	testkit.Connect(t, n.URL(), honest, client.HelloOptions{SessionID: "honest-a2"})

	// Per mesh: many members of a second mesh at once.
	other := testkit.NewMesh(t, n.Store(), burst/perMember+1)
	ids = ids[:0]
	for _, m := range other.Members {
		for range perMember {
			ids = append(ids, m)
		}
	}
	acc, capa = concurrentHellos(t, n.URL(), ids, "mesh")
	if len(acc) != perMesh || capa != len(ids)-perMesh {
		t.Fatalf("%d concurrent hellos in one mesh with MAX_CONNECTIONS_PER_MESH=%d: %d accepted, %d capacity; want %d and %d",
			len(ids), perMesh, len(acc), capa, perMesh, len(ids)-perMesh)
	}
	// The first mesh is not touched by the second's cap.
	testkit.Connect(t, n.URL(), honest2, client.HelloOptions{SessionID: "honest-b2"})
	if sent := stopHonest(); sent == 0 {
		t.Fatal("no honest message went through during the hellos")
	}
	exchange(t, a, b, honest2, 3, "after")

	// The places of the refused hellos were given back: once a session of
	// the full mesh leaves, a new one fits.
	if err := acc[0].Close(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "the closed session to leave the live count", func() bool {
		return n.Replica().CountLive(other.MeshID) == perMesh-1
	})
	testkit.Connect(t, n.URL(), other.AddMember(t, n.Store(), "late"), client.HelloOptions{})
	testkit.Connect(t, n.URL(), honest, client.HelloOptions{SessionID: "honest-a3"})
}
