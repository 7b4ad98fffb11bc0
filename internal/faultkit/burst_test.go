package faultkit

import (
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

// accountingBurst is a burst of two peers with no broker: the test plays
// the broker's part by calling the peers' ack and push handlers.
func accountingBurst() *Burst {
	b := &Burst{ledger: &ledger{msgs: map[string]*record{}}, started: time.Now()}
	for i := 0; i < 2; i++ {
		p := NewPeer(client.Identity{MemberID: string(rune('a' + i))}, []string{"ws://unused"}, 0)
		p.index, p.ledger = i, b.ledger
		b.peers = append(b.peers, p)
	}
	return b
}

func (b *Burst) offer(cmid string, from, to int, at time.Time) {
	b.ledger.offered(cmid, from, to, cmid, at)
	b.peers[from].Send("pub", cmid, cmid)
}

func push(messageID, cmid, body string) protocol.Push {
	return protocol.Push{Type: protocol.TypePush, MessageID: messageID, ClientMessageID: cmid, Ciphertext: body}
}

// The report finds every way a message can go wrong.
func TestReportAccounting(t *testing.T) {
	b := accountingBurst()
	p0, p1 := b.peers[0], b.peers[1]
	t0 := time.Now()
	for _, cmid := range []string{"ok", "redelivered", "lost", "twice", "wrong", "unacked", "retried", "refused"} {
		b.offer(cmid, 0, 1, t0)
	}
	for id, cmid := range map[string]string{"1": "ok", "2": "redelivered", "3": "lost", "4": "twice", "6": "wrong"} {
		p0.onAck(protocol.Ack{ID: cmid, MessageID: id, Queued: true})
	}
	p0.onAck(protocol.Ack{ID: "retried", Error: protocol.CodeUnavailable})
	p0.onAck(protocol.Ack{ID: "retried", MessageID: "7", Queued: true, Duplicate: true})
	p0.onAck(protocol.Ack{ID: "retried", MessageID: "8", Queued: true}) // another id for the same send
	p0.onAck(protocol.Ack{ID: "refused", Error: protocol.CodeUnknownRecipient})
	p1.onPush(push("1", "ok", "ok"))
	p1.onPush(push("7", "retried", "retried"))
	p1.onPush(push("2", "redelivered", "redelivered"))
	p1.onPush(push("2", "redelivered", "redelivered")) // deduped by the peer
	p1.onPush(push("4", "twice", "twice"))
	p1.onPush(push("5", "twice", "twice")) // the same send committed twice
	p0.onPush(push("6", "wrong", "wrong"))
	p1.onPush(push("9", "nobody-sent-this", "x"))

	r := b.Report()
	type counts struct{ offered, acked, unacked, rejected, delivered, lost, dups, redelivered, misdelivered, conflicts int }
	want := counts{offered: 8, acked: 6, unacked: 1, rejected: 1, delivered: 4, lost: 2, dups: 1, redelivered: 1, misdelivered: 2, conflicts: 1}
	got := counts{r.Offered, r.Acked, r.Unacked, r.Rejected, r.Delivered, r.Lost, r.AppDuplicates, r.Redeliveries, r.Misdelivered, r.ConflictingAcks}
	if got != want {
		t.Fatalf("report\n got %+v\nwant %+v", got, want)
	}
	if r.AckErrors[protocol.CodeUnavailable] != 1 {
		t.Fatalf("ack errors %v", r.AckErrors)
	}
	if len(r.Problems()) == 0 {
		t.Fatal("no problems found in a report with lost and duplicated messages")
	}
}

// Recovery waits for every peer to have a send acked and a message
// delivered, both offered after the fault.
func TestRecovery(t *testing.T) {
	b := accountingBurst()
	fault := time.Now()
	b.offer("before", 0, 1, fault.Add(-time.Second))
	b.peers[0].onAck(protocol.Ack{ID: "before", MessageID: "1", Queued: true})
	b.peers[1].onPush(push("1", "before", "before"))
	if _, ok := b.Recovery(fault); ok {
		t.Fatal("recovered on traffic from before the fault")
	}
	b.offer("a", 0, 1, fault.Add(time.Millisecond))
	b.offer("b", 1, 0, fault.Add(time.Millisecond))
	b.peers[0].onAck(protocol.Ack{ID: "a", MessageID: "2", Queued: true})
	b.peers[1].onAck(protocol.Ack{ID: "b", MessageID: "3", Queued: true})
	b.peers[1].onPush(push("2", "a", "a"))
	if _, ok := b.Recovery(fault); ok {
		t.Fatal("recovered while peer 0 has received nothing since the fault")
	}
	b.peers[0].onPush(push("3", "b", "b"))
	if d, ok := b.Recovery(fault); !ok || d <= 0 {
		t.Fatalf("recovery %s %v", d, ok)
	}
}
