package server_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/faultkit"
	"github.com/claudemesh/broker/internal/httpapi"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func health(t *testing.T, base string) int {
	t.Helper()
	resp, err := http.Get(base + "/health")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var h httpapi.Health
	_ = json.NewDecoder(resp.Body).Decode(&h)
	if (resp.StatusCode == 503) != (h.DB == "down") {
		t.Fatalf("health %d with db %q", resp.StatusCode, h.DB)
	}
	return resp.StatusCode
}

// Postgres stops and starts under a running node: /health goes 503 then 200,
// sockets stay up, sends during the outage get ack errors, and every acked
// message is delivered exactly once.
func TestPostgresOutage(t *testing.T) {
	pg := faultkit.PrivatePostgres(t)
	n := testkit.StartNode(t, pg.URL("postgres"), testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	online := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{Capabilities: []string{protocol.CapClientAck}})
	offline := mesh.Members[2] // connects only after the outage

	acked := map[string]bool{}
	sendBoth := func(tag string) (ok, failed int) {
		for _, to := range []client.Identity{mesh.Members[1], offline} {
			ack := testkit.Send(t, sender, protocol.Send{TargetSpec: to.Pubkey(), Priority: "now", Ciphertext: tag})
			if ack.Queued {
				acked[ack.MessageID+"/"+to.MemberID] = true
				ok++
			} else {
				if ack.Error != protocol.CodeUnavailable {
					t.Fatalf("send during outage: error %q, want unavailable", ack.Error)
				}
				failed++
			}
		}
		return ok, failed
	}
	for i := 0; i < 5; i++ {
		if ok, _ := sendBoth("before-" + strconv.Itoa(i)); ok != 2 {
			t.Fatal("send before the outage failed")
		}
	}
	if health(t, n.HTTPURL()) != 200 {
		t.Fatal("not healthy before the outage")
	}

	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "/health 503", func() bool { return health(t, n.HTTPURL()) == 503 })
	if ok, failed := sendBoth("during"); ok != 0 || failed != 2 {
		t.Fatalf("during the outage: %d acked, %d failed", ok, failed)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := pg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 20*time.Second, "/health 200", func() bool { return health(t, n.HTTPURL()) == 200 })
	// The first sends after recovery may still meet a dead pooled connection;
	// a client retries with the same client_message_id.
	for i := 0; i < 5; i++ {
		for _, to := range []client.Identity{mesh.Members[1], offline} {
			var ack protocol.Ack
			testkit.Eventually(t, 10*time.Second, "send after recovery", func() bool {
				ack = testkit.Send(t, sender, protocol.Send{TargetSpec: to.Pubkey(), Priority: "now", Ciphertext: "after-" + strconv.Itoa(i),
					ClientMessageID: "after-" + strconv.Itoa(i) + "-" + to.MemberID})
				return ack.Queued
			})
			acked[ack.MessageID+"/"+to.MemberID] = true
		}
	}

	late := testkit.Connect(t, n.URL(), offline, client.HelloOptions{Capabilities: []string{protocol.CapClientAck}})
	got := map[string]int{}
	want := len(acked)
	for _, c := range []struct {
		conn *client.Conn
		id   client.Identity
	}{{online, mesh.Members[1]}, {late, offline}} {
		for i := 0; i < want/2; i++ {
			p := testkit.ExpectPush(t, c.conn, 20*time.Second)
			got[p.MessageID+"/"+c.id.MemberID]++
			testkit.Write(t, c.conn, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID})
		}
	}
	for k := range acked {
		if got[k] != 1 {
			t.Errorf("acked message %s delivered %d times", k, got[k])
		}
	}
	for k := range got {
		if !acked[k] {
			t.Errorf("delivered %s that was never acked", k)
		}
	}
	noPush(t, online, 500*time.Millisecond)
	noPush(t, late, 500*time.Millisecond)
}
