package server_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// hello_ack is the first frame after a hello, even while the mesh is busy
// with system events: many hellos with system_events are said while
// another member's sessions join, leave and change status as fast as the
// node takes them. Before the fix a session was published to the event
// listeners before its hello_ack was queued, so an event could come
// first (a v0.1 client waiting for hello_ack would fail its handshake).
func TestHelloAckFirstWhileEventsChurn(t *testing.T) {
	const members, perMember = 4, 25
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) {
		c.MaxConnsPerMesh = 1000
		c.MaxSessionsPerMember = 1000
		c.PresenceGrace = 1
	}})
	mesh := testkit.NewMesh(t, n.Store(), members+1)
	churner := mesh.Members[members]

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var events atomic.Int64
	// Status changes: one system event each for every listener.
	wg.Go(func() {
		c := testkit.Connect(t, n.URL(), churner, client.HelloOptions{SessionID: "churn-status"})
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		statuses := []string{protocol.StatusWorking, protocol.StatusIdle}
		// Paced so that listeners that read keep up (a reader that falls
		// 1,024 frames behind is closed slow_consumer, fairly).
		tick := time.NewTicker(300 * time.Microsecond)
		defer tick.Stop()
		for i := 0; i < 200000; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if err := c.WriteJSON(ctx, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: statuses[i%2]}); err != nil {
				t.Errorf("churner status: %v", err)
				return
			}
			events.Add(1)
		}
	})
	// Joins and leaves.
	wg.Go(func() {
		for i := 0; i < 2000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			c, err := client.Dial(ctx, n.URL(), nil)
			if err == nil {
				_, err = c.Hello(ctx, churner, client.HelloOptions{SessionID: fmt.Sprint("churn-", i)})
				_ = c.Close()
			}
			cancel()
			if err != nil {
				t.Errorf("churner join %d: %v", i, err)
				return
			}
			events.Add(1)
		}
	})
	defer func() { close(stop); wg.Wait() }()
	testkit.Eventually(t, 10*time.Second, "the churn to start", func() bool { return events.Load() > 50 })

	var hw sync.WaitGroup
	firsts := make(chan string, members*perMember)
	for m := 0; m < members; m++ {
		hw.Go(func() {
			for i := 0; i < perMember; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := client.Dial(ctx, n.URL(), nil)
				if err != nil {
					cancel()
					t.Errorf("dial: %v", err)
					return
				}
				t.Cleanup(func() { _ = c.CloseNow() })
				h := client.NewHello(mesh.Members[m], client.HelloOptions{SessionID: fmt.Sprintf("listener-%d-%d", m, i),
					Capabilities: []string{protocol.CapSystemEvents}})
				if err := c.WriteJSON(ctx, h); err != nil {
					cancel()
					t.Errorf("hello: %v", err)
					return
				}
				f, err := c.Next(ctx)
				cancel()
				if err != nil {
					t.Errorf("first frame: %v", err)
					return
				}
				go func() { // keep reading, as a client does
					for range c.Frames() {
					}
				}()
				typ := f.Type
				if f.Type == protocol.TypePush {
					typ += " " + string(f.Raw)
				}
				firsts <- typ
			}
		})
	}
	hw.Wait()
	close(firsts)
	bad := 0
	var example string
	total := 0
	for typ := range firsts {
		total++
		if typ != protocol.TypeHelloAck {
			bad++
			example = typ
		}
	}
	if total != members*perMember || bad > 0 {
		t.Fatalf("%d of %d hellos (of %d) got another frame before hello_ack, e.g. %.200s (%d churn events sent)",
			bad, total, members*perMember, example, events.Load())
	}
}
