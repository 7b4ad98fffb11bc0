package server_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// message_status queries Postgres for every request. One member floods it
// from several sessions (reading the answers, so within its byte budget):
// it gets message_status_result with error rate_limited for the requests
// over its sessions' rate, counted in broker_requests_rate_limited_total,
// and is not disconnected. Another member's sends are acked and pushed in
// bounded time throughout.
func TestMessageStatusFloodPaced(t *testing.T) {
	const sessions, perSession = 3, 1500
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	flooder, sender, rcptID := mesh.Members[0], mesh.Members[1], mesh.Members[2]
	a := testkit.Connect(t, n.URL(), sender, client.HelloOptions{})
	b := testkit.Connect(t, n.URL(), rcptID, client.HelloOptions{})

	var fconns []*client.Conn
	for i := range sessions {
		fconns = append(fconns, testkit.Connect(t, n.URL(), flooder, client.HelloOptions{SessionID: fmt.Sprint("flood-", i)}))
	}
	// A real message, so that every allowed request reaches Postgres.
	ack := testkit.Send(t, fconns[0], protocol.Send{TargetSpec: rcptID.Pubkey(), Ciphertext: "eA=="})
	if !ack.Queued {
		t.Fatalf("flooder's message: %+v", ack)
	}
	testkit.ExpectPush(t, b, 10*time.Second)

	type tally struct{ ok, limited, other int }
	tallies := make([]tally, sessions)
	var wg sync.WaitGroup
	for i, c := range fconns {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			// At most window requests unanswered, as a pipelining client
			// keeps: unbounded, the answers outgrow the session's queue on
			// a loaded machine and it is closed slow_consumer, as it should.
			window := make(chan struct{}, 200)
			go func() {
				for j := 0; j < perSession; j++ {
					select {
					case window <- struct{}{}:
					case <-ctx.Done():
						return
					}
					if err := c.WriteJSON(ctx, protocol.MessageStatus{Type: protocol.TypeMessageStatus, ReqID: fmt.Sprint(j), MessageID: ack.MessageID}); err != nil {
						return
					}
				}
			}()
			for got := 0; got < perSession; {
				f, err := c.Next(ctx)
				if err != nil {
					t.Errorf("flooder session %d after %d answers: %v", i, got, err)
					return
				}
				if f.Type != protocol.TypeMessageStatusR {
					if f.Type != protocol.TypePush {
						tallies[i].other++
					}
					continue
				}
				got++
				<-window
				var r protocol.MessageStatusResult
				if err := f.Decode(&r); err != nil {
					t.Error(err)
					return
				}
				switch r.Error {
				case "":
					tallies[i].ok++
				case protocol.CodeRateLimited:
					tallies[i].limited++
				default:
					tallies[i].other++
				}
			}
		})
	}

	var worst time.Duration
	floodDone := make(chan struct{})
	go func() { wg.Wait(); close(floodDone) }()
	for i := 0; ; i++ {
		select {
		case <-floodDone:
		default:
			took, err := testkit.HonestSend(a, b, rcptID, fmt.Sprint("during-", i))
			if err != nil {
				t.Fatalf("honest send %d during the flood: %v", i, err)
			}
			worst = max(worst, took)
			if i < 10000 {
				continue
			}
		}
		break
	}
	<-floodDone
	for i, ta := range tallies {
		if ta.limited == 0 || ta.ok == 0 || ta.other != 0 {
			t.Errorf("flooder session %d: %d answered, %d rate_limited, %d other; want some of each of the first two and none else", i, ta.ok, ta.limited, ta.other)
		}
	}
	if worst > 2*time.Second {
		t.Errorf("an honest send waited %s for its ack during the flood", worst)
	}
	if got := n.Counter("broker_requests_rate_limited_total", "type", protocol.TypeMessageStatus); got == 0 {
		t.Error("rate-limited message_status requests not counted")
	}
	// Rate limited, not disconnected: each flooder session still works.
	for i, c := range fconns {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := c.WriteRaw(ctx, []byte(`{"type":"ping","_reqId":"alive"}`)); err != nil {
			t.Fatalf("flooder session %d: %v", i, err)
		}
		cancel()
		testkit.Expect(t, c, protocol.TypePong, 10*time.Second)
	}
}
