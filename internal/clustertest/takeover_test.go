package clustertest_test

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// reattachBound is the lease takeover's promise (issue 14): messages acked
// for a peer while its node was dead reach it within a second of its
// reattach elsewhere.
const reattachBound = time.Second

// takeoverMessages are sent to each receiver while its node is dead.
const takeoverMessages = 50

// A peer's node is killed (SIGKILL: nothing released) right after the
// sender's node has leased rows to the peer's session there (the remote
// fast path), and messages are acked for the peer while it is away; the
// peer reattaches (same session id) on another node. Its new session
// takes the dead node's leases over: every message arrives within
// reattachBound of the hello ack, exactly once, for a client_ack peer and
// for a v0.1 peer (whose written pushes count as delivered), with the
// default 30 s lease — and nothing comes again once the survivors release
// the dead node's leases, nor when the killed node comes back.
var reattachTakeover = faultScenario{
	name: "reattach_takeover", label: "SIGKILL of a peer's node, the peer reattaches elsewhere", procs: 3, members: 3,
	fault: func(t *testing.T, c *faultCluster) faultOutcome {
		nodes, mesh := c.procs, c.mesh
		sender := testkit.Connect(t, nodes[1].URL(), mesh.Members[burstLoad.Peers], client.HelloOptions{})
		type receiver struct {
			id   client.Identity
			opts client.HelloOptions
			ids  map[string]bool // acked while away
		}
		rcv := []*receiver{
			{id: mesh.Members[burstLoad.Peers+1], opts: client.HelloOptions{SessionID: "takeover-ack", Capabilities: []string{protocol.CapClientAck}}},
			{id: mesh.Members[burstLoad.Peers+2], opts: client.HelloOptions{SessionID: "takeover-v01"}},
		}
		for _, r := range rcv {
			first := testkit.Connect(t, nodes[0].URL(), r.id, r.opts)
			// The sender's node sees the session on node 0 once a probe
			// reaches it there.
			ack := sendAck(t, sender, protocol.Send{TargetSpec: r.id.Pubkey(), Priority: protocol.PriorityNow, Ciphertext: "cHJvYmU="})
			if p := testkit.ExpectPush(t, first, 10*time.Second); p.MessageID != ack.MessageID {
				t.Fatalf("probe: got %s, want %s", p.MessageID, ack.MessageID)
			}
			if len(r.opts.Capabilities) > 0 {
				testkit.Write(t, first, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: ack.MessageID})
			}
		}
		killedAt := c.b.Mark("SIGKILL " + nodes[0].name)
		signalNode(t, nodes[0], syscall.SIGKILL)
		<-nodes[0].exited
		for i, r := range rcv {
			r.ids = map[string]bool{}
			for j := 0; j < takeoverMessages; j++ {
				ack := sendAck(t, sender, protocol.Send{TargetSpec: r.id.Pubkey(), Priority: protocol.PriorityNow,
					Ciphertext: "YXdheQ==", ClientMessageID: fmt.Sprintf("away-%d-%d", i, j)})
				r.ids[ack.MessageID] = true
			}
		}
		sentIn := time.Since(killedAt)
		// Both reattach at once, each on another survivor, and read until
		// well past the survivors' release of the dead node's leases
		// (death noticed, then confirmed 5 s later): a push beyond the
		// first of each message would come by then.
		watchUntil := time.Now().Add(12 * time.Second)
		type outcome struct {
			i        int
			last     time.Duration // hello ack → last message acked while away
			got, dup int
			err      error
		}
		results := make(chan outcome, len(rcv))
		allIn := make(chan struct{}, len(rcv)) // a receiver has all its messages
		for i, r := range rcv {
			go func() {
				o := outcome{i: i}
				defer func() { results <- o }()
				ctx, cancel := context.WithDeadline(context.Background(), watchUntil)
				defer cancel()
				conn, err := client.Dial(ctx, nodes[1+i].URL(), nil)
				if err != nil {
					o.err = err
					return
				}
				defer conn.CloseNow()
				ha, err := conn.Hello(ctx, r.id, r.opts)
				if err != nil {
					o.err = err
					return
				}
				attached := time.Now()
				if !ha.Reattached {
					o.err = fmt.Errorf("hello ack %+v: not reattached", ha)
					return
				}
				seen := map[string]bool{}
				for {
					f, err := conn.Next(ctx)
					if err != nil {
						if o.got < len(r.ids) {
							o.err = fmt.Errorf("after %d of %d: %w", o.got, len(r.ids), err)
						}
						return
					}
					var p protocol.Push
					if f.Type != protocol.TypePush || f.Decode(&p) != nil || p.Subtype != "" || !r.ids[p.MessageID] {
						continue
					}
					if seen[p.MessageID] {
						o.dup++
						continue
					}
					seen[p.MessageID] = true
					if o.got++; o.got == len(r.ids) {
						o.last = time.Since(attached)
						allIn <- struct{}{}
					}
					if len(r.opts.Capabilities) > 0 {
						if err := conn.WriteJSON(ctx, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p.MessageID}); err != nil {
							o.err = err
							return
						}
					}
				}
			}()
		}
		// The killed node comes back (a new incarnation, same name) once
		// both have their messages: it gets none of the taken rows back.
		for range rcv {
			select {
			case <-allIn:
			case <-time.After(time.Until(watchUntil)):
			}
		}
		nodes[0].start(t)
		out := make([]outcome, len(rcv))
		for range rcv {
			o := <-results
			out[o.i] = o
		}
		names := []string{"client_ack", "v0.1"}
		for i, o := range out {
			switch {
			case o.err != nil:
				t.Errorf("%s peer: %v", names[i], o.err)
			case o.got != takeoverMessages || o.dup != 0:
				t.Errorf("%s peer: %d of %d messages, %d pushed twice", names[i], o.got, takeoverMessages, o.dup)
			case o.last > reattachBound:
				t.Errorf("%s peer: the last message acked while it was away came %s after its reattach, want ≤ %s", names[i], o.last, reattachBound)
			}
		}
		return faultOutcome{from: killedAt, result: recoveryIn("; %d messages per peer acked within %s of the kill; reattach → last delivered: client_ack %s, v0.1 %s; none twice",
			takeoverMessages, roundMs(sentIn), roundMs(out[0].last), roundMs(out[1].last))}
	},
}
