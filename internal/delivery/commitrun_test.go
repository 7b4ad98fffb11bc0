package delivery_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
)

// insertGate holds the commits of one sender's sends until the test opens
// the gate: a commit that Postgres went away under.
type insertGate struct {
	delivery.Queue
	sender  string
	entered chan struct{}
	open    chan struct{}
}

func (g *insertGate) InsertMessages(ctx context.Context, p *delivery.InsertParams) ([]delivery.Inserted, error) {
	if slices.ContainsFunc(p.Messages, func(m delivery.NewMessage) bool { return m.SenderMemberID == g.sender }) {
		select {
		case g.entered <- struct{}{}:
		default:
		}
		select {
		case <-g.open:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return g.Queue.InsertMessages(ctx, p)
}

// A commit stuck in flight holds up only its own senders: another sender
// of the same shard is committed and acked beside it, while the stuck
// sender's next send waits for its first, and both commit in order.
func TestStuckCommitHoldsOnlyItsSenders(t *testing.T) {
	defer delivery.SetStuckAfter(50 * time.Millisecond)()
	v := newEnv(t)
	g := &insertGate{Queue: v.q, sender: "stuck", entered: make(chan struct{}, 1), open: make(chan struct{})}
	v.queue = g
	a := v.node("A", func(c *delivery.Config) { c.CommitShards = 1 })
	stuck := a.session(v, "stuck", "A/s")
	other := a.session(v, "other", "A/o")
	rcpt := a.session(v, "rcpt", "A/r")

	a.send(stuck, 1, "s1", "rcpt")
	wait(t, g.entered, "the stuck commit")
	a.send(stuck, 1, "s2", "rcpt")
	a.send(other, 1, "o1", "rcpt")
	if acks := other.waitAcks(t, 1); acks[0].body != "o1|" {
		t.Fatalf("the other sender's ack: %q", acks[0].body)
	}
	if got := stuck.acks(); len(got) != 0 {
		t.Fatalf("the stuck sender was answered before its commit ended: %v", bodies(got))
	}
	close(g.open)
	acks := stuck.waitAcks(t, 2)
	if acks[0].body != "s1|" || acks[1].body != "s2|" {
		t.Fatalf("the stuck sender's acks: %q, %q; want s1, s2 committed", acks[0].body, acks[1].body)
	}
	got := rcpt.waitPushes(t, 3)
	if i, j := slices.Index(got, "s1"), slices.Index(got, "s2"); i < 0 || j < i {
		t.Fatalf("pushes %v: want s1 before s2", got)
	}
}
