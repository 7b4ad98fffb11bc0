package wan

import (
	"context"
	"fmt"
	"time"
)

// Failover is a peer's reattach after its node was killed (issue 14's
// "failover stalls delivery"): messages acked for it while it was away
// were leased to its session on the dead node (the remote fast path), and
// its new session elsewhere takes them over.
type Failover struct {
	Dead, Sender, MoveTo string
	N                    int
	// SentIn is kill → the last of the N sends acked; Reattached is kill →
	// the new session's hello_ack.
	SentIn, Reattached time.Duration
	// Delivered is hello_ack → the last of the N pushes on the new
	// session (zero if not all arrived).
	Delivered time.Duration
	Got, Dup  int
	// Leased counts the N rows that were leased to the dead node's
	// session when they committed (the case the takeover is for).
	Leased int
}

func (f Failover) String() string {
	return fmt.Sprintf("kill %s, %d sends from %s acked within %s (%d leased to the dead session), reattach on %s %s after the kill: %d delivered, the last %s after the reattach, %d twice",
		f.Dead, f.N, f.Sender, ms(f.SentIn), f.Leased, f.MoveTo, ms(f.Reattached), f.Got, ms(f.Delivered), f.Dup)
}

// failoverWatch is how long after the kill the new session is watched for
// a second push of a message: past the survivors' death confirmation and
// release of the dead node's leases.
const failoverWatch = 15 * time.Second

// Failover kills dead's node with a peer's session on it (a client_ack
// peer), has a peer in sender send n messages to it while it is away, and
// reattaches it (same session id) on moveTo's node. It must be the last
// scenario of a cluster: the dead node stays dead.
func (r *Runner) Failover(dead, sender, moveTo string, n int) Failover {
	r.t.Helper()
	f := Failover{Dead: dead, Sender: sender, MoveTo: moveTo, N: n}
	id := r.member()
	session := "failover-" + id.MemberID
	first := r.connectAs(dead, id, session)
	from := r.connect(sender)
	sn := r.c.Node(sender)
	if !waitUntil(30*time.Second, func() bool {
		e, ok := sn.Replica().SoleRemoteSession(id.MemberID)
		return ok && e.Owner == r.c.Node(dead).Name()
	}) {
		r.t.Fatalf("wan: %s never saw the recipient's session on %s", sender, dead)
	}
	if _, err := from.Send(context.Background(), id.Pubkey(), "failover-probe", "probe"); err != nil {
		r.t.Fatalf("wan: send: %v", err)
	}
	if _, ok := first.WaitPush("failover-probe", ackTimeout); !ok {
		r.t.Fatal("wan: the probe did not reach the session on the node to kill")
	}
	killed := time.Now()
	r.c.Node(dead).Kill()
	// One at a time, as a conversation goes: each commits alone, and the
	// sender's node leases it to the session it still sees on the dead
	// node (a batch of many would take the wake-up path).
	cmids := make([]string, n)
	for i := range cmids {
		cmids[i] = fmt.Sprintf("failover-%d", i)
		if _, err := from.Send(context.Background(), id.Pubkey(), cmids[i], cmids[i]); err != nil {
			r.t.Fatalf("wan: send: %v", err)
		}
		if a, _, ok := from.WaitAck(cmids[i], ackTimeout); !ok || !a.Queued {
			r.t.Fatalf("wan: send %s: no ack (%+v)", cmids[i], a)
		}
	}
	f.SentIn = time.Since(killed)
	f.Leased = r.leasedTo(id.MemberID, r.c.Node(dead).Engine().LeaseNode())
	second := r.connectAs(moveTo, id, session)
	f.Reattached = second.HelloAckAt.Sub(killed)
	var last time.Time
	all := second.wait(ackTimeout, func() bool {
		for _, cmid := range cmids {
			ts := second.pushes[cmid]
			if len(ts) == 0 {
				return false
			}
			if ts[0].After(last) {
				last = ts[0]
			}
		}
		return true
	})
	for _, cmid := range cmids {
		if second.Pushes(cmid) > 0 {
			f.Got++
		}
	}
	if all {
		f.Delivered = last.Sub(second.HelloAckAt)
	}
	// Watch for a second push of any of them.
	second.wait(time.Until(killed.Add(failoverWatch)), func() bool {
		for _, cmid := range cmids {
			if len(second.pushes[cmid]) > 1 {
				return true
			}
		}
		return false
	})
	for _, cmid := range cmids {
		if k := second.Pushes(cmid); k > 1 {
			f.Dup += k - 1
		}
	}
	return f
}

// leasedTo counts the rows of member, not delivered, whose lease (live or
// not) names node: the rows the sender's node leased to the dead session.
func (r *Runner) leasedTo(member, node string) int {
	var k int
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := r.c.Admin.Pool().QueryRow(ctx, `SELECT count(*) FROM delivery d JOIN message m ON m.id = d.message_id
		WHERE d.recipient_member_id = $1 AND d.delivered_at IS NULL AND d.lease_node = $2
		  AND m.client_message_id LIKE 'failover-%' AND m.client_message_id <> 'failover-probe'`, member, node).Scan(&k)
	if err != nil {
		r.t.Fatalf("wan: count leases: %v", err)
	}
	return k
}
