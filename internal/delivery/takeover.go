package delivery

import (
	"context"
	"time"

	"github.com/claudemesh/broker/internal/presence"
)

// Lease takeover on reattach.
//
// A member's rows may be leased to one of its sessions on another node: by
// the remote fast path (the sender's node leased the row to the session it
// saw there), or by that node's claim. When that node dies, or the session
// moves, the rows used to wait for the death to be confirmed or for the
// lease to run out (11 s and more, issue 14). Instead, a session that
// attaches here takes them over (Queue.TakeOver) in its first claim:
//
//   - rows leased by node incarnations that are not confirmed alive and
//     answering this node (Liveness), at once;
//   - rows leased to the connection this session replaced on another node
//     (a reattach with the same session id), at once for a client_ack
//     session (it dedupes what the old node may also have pushed); for a
//     session without client_ack, whose written pushes count as delivered,
//     after takeoverSettle unless the old node has stopped answering, so
//     that the marks of pushes the old node wrote before the client left
//     have committed and are not pushed again.
//
// Whenever a node stops answering, every member with a session here takes
// over again, and so does every sweep while some node does not answer
// (rows a sender leased to the dead node before it noticed). A node that
// does not answer gets no more remote fast-path rows (committer.envelope).
//
// A taken row's lease names this node incarnation, which fences the old
// holder out: its claims, releases and delivery marks (MarkParams.Node) no
// longer match the row. What it cannot be kept from is a push from an
// envelope it already held, to the session it still has: for a session
// that moved, a socket nobody reads.

// Liveness is what the engine needs from the gossip layer
// (presence.Cluster) to tell the node incarnations whose leases stand.
type Liveness interface {
	// Members lists the cluster's nodes, this one included.
	Members() []presence.NodeInfo
	// Reachable reports whether a node is a member that answers this one.
	Reachable(name string) bool
}

var _ Liveness = (*presence.Cluster)(nil)

// Replaced names the connection a (re)attaching session took the place of:
// the previous connection of the same session, on node Node.
type Replaced struct {
	Conn string
	Node string // node name
}

// takeoverSettle is how long a session without client_ack waits before it
// takes over the rows of the connection it replaced on a node that still
// answers: the ack linger and a mark's round trip there, with room.
const takeoverSettle = 250 * time.Millisecond

// maxSilent bounds the silent nodes remembered (a node that died for good
// stays silent); past it, a node falling silent still triggers a takeover,
// but sweeps do not keep taking over for it.
const maxSilent = 256

// maxGone bounds the replaced connections a member's next takeover names.
const maxGone = 16

// acksItself is what a Recipient with the client_ack capability reports.
type acksItself interface{ ClientAck() bool }

// replacedConns handles the connections r replaced at attach: those on
// other nodes are taken over by the member's next takeover, now or after
// takeoverSettle.
func (e *Engine) replacedConns(r Recipient, replaced []Replaced) {
	for _, p := range replaced {
		if p.Conn == "" || p.Node == e.cfg.Node || p.Conn == r.ConnID() {
			continue
		}
		a, ok := r.(acksItself)
		if (ok && a.ClientAck()) || !e.live.Reachable(p.Node) {
			e.addGone(r.MemberID(), p.Conn)
			continue
		}
		member, conn := r.MemberID(), p.Conn
		e.loops.Go(func(ctx context.Context) {
			t := time.NewTimer(takeoverSettle)
			defer t.Stop()
			select {
			case <-ctx.Done():
			case <-t.C:
				e.addGone(member, conn)
			}
		})
	}
}

// addGone queues a connection for the member's next takeover.
func (e *Engine) addGone(member, conn string) {
	e.mu.Lock()
	lm := e.members[member]
	if lm != nil {
		if len(lm.gone) < maxGone {
			lm.gone = append(lm.gone, conn)
		}
		lm.dirty |= ReasonTakeOver
	}
	e.mu.Unlock()
	if lm != nil {
		e.Kick()
	}
}

// NodeReach reacts to a node starting or ceasing to answer this one
// (presence.Cluster.SetReachHandler): when one stops, every member with a
// session here takes over what that node holds, and sweeps keep taking
// over until it answers again. It does not block.
func (e *Engine) NodeReach(ev presence.ReachEvent) {
	if e.live == nil || ev.Name == e.cfg.Node {
		return
	}
	e.mu.Lock()
	if ev.Reachable {
		delete(e.silent, ev.Name)
	} else if len(e.silent) < maxSilent {
		e.silent[ev.Name] = struct{}{}
	}
	e.mu.Unlock()
	if !ev.Reachable {
		e.WakeAll(ReasonTakeOver)
	}
}

// someSilent reports whether some node does not answer this one.
func (e *Engine) someSilent() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.silent) > 0
}

// keep lists the lease node names whose live leases a takeover leaves
// alone: this incarnation and the other nodes that are alive and answer.
func (e *Engine) keep() []string {
	out := []string{e.leaseNode}
	for _, m := range e.live.Members() {
		if m.Self || m.State != "alive" || !e.live.Reachable(m.Name) {
			continue
		}
		out = append(out, LeaseNodeName(m.Name, m.Incarnation))
	}
	return out
}

// answering reports whether a node answers this one (true without
// Liveness).
func (e *Engine) answering(node string) bool {
	return e.live == nil || node == e.cfg.Node || e.live.Reachable(node)
}
