package presence

import (
	"encoding/json"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// The delta channel.
//
// A node sends the changes of its own entries straight to every other
// node. memberlist's reliable channel dials a new TCP connection for every
// message, so a delta paid a handshake round trip before its one-way
// delay: three one-way delays in all (~420 ms from Sydney to Amsterdam
// against 140 ms). Deltas therefore go as memberlist packets (UDP,
// encrypted and authenticated with the cluster key exactly like the rest
// of gossip) whenever they fit in one, and the receiver acknowledges each
// packet with one of its own. A packet not acknowledged within the
// retransmission timeout (from the measured round trip, as TCP computes
// it) has its entries sent again — their current versions, so a resend
// never carries a stale one — with a backoff; after reliableAfter
// timeouts in a row, and for entries too large for a packet or a burst too
// large for the window, the reliable channel carries them instead. A
// reliable send that fails is retried the same way. Nothing is dropped
// while the peer is a member: a delta lost in a cut is resent until the
// peer answers, and a peer that was declared dead and comes back (or
// restarts) exchanges full state with this node at once (push-pull), which
// also settles what was deleted meanwhile. The periodic push-pull stays as
// the last repair.
//
// An idle peer is sent an empty packet (a heartbeat) every
// timings.heartbeat, so that every peer's round trip is known and a peer
// that stops answering is noticed within about a second: Reachable.
//
// Nodes that predate acknowledgements (their metadata lacks "a") get every
// delta over the reliable channel, as before, and count as reachable while
// they are members.

// Retransmission timeout bounds (RFC 6298's rules, a smaller minimum:
// gossip acks are answered by memberlist's packet handler at once, not
// delayed like TCP's).
const (
	initialRTO = time.Second
	minRTO     = 200 * time.Millisecond
	maxRTO     = 3 * time.Second
	// rttGranularity is the least variance allowed for: the scheduling
	// noise of a loaded machine.
	rttGranularity = 50 * time.Millisecond
)

const (
	// maxInflight bounds the packets awaiting an ack per peer (and with
	// them the ids they carry); a burst beyond it goes over the reliable
	// channel.
	maxInflight = 64
	// maxPacketsPerRound: a round with more changes than this many packets
	// hold sends them as one reliable message instead.
	maxPacketsPerRound = 16
	// reliableAfter is the number of timeouts in a row after which a
	// peer's deltas go over the reliable channel until it answers again.
	reliableAfter = 3
	// packetOverhead is what memberlist adds to a user message in a packet
	// (type, CRC, encryption's version, nonce and tag) with room to spare.
	packetOverhead = 64
)

// deltaTimings are the delta channel's timings, by profile.
type deltaTimings struct {
	heartbeat time.Duration // an idle peer is sent an empty delta this often
	// unreachable: a peer that answers nothing for this long (or three
	// retransmission timeouts, if longer) is unreachable.
	unreachable time.Duration
	backoffMax  time.Duration // the longest wait between resends to a silent peer
	// reconnect: a node declared dead is contacted (push-pull) after
	// reconnectMin, then at intervals doubling up to reconnectMax, for
	// reconnectFor after its death.
	reconnectMin, reconnectMax, reconnectFor time.Duration
}

func timingsFor(profile string) deltaTimings {
	if profile == "test" {
		return deltaTimings{heartbeat: 100 * time.Millisecond, unreachable: 300 * time.Millisecond, backoffMax: 300 * time.Millisecond,
			reconnectMin: 200 * time.Millisecond, reconnectMax: time.Second, reconnectFor: time.Minute}
	}
	return deltaTimings{heartbeat: 500 * time.Millisecond, unreachable: time.Second, backoffMax: time.Second,
		reconnectMin: time.Second, reconnectMax: 4 * time.Second, reconnectFor: 30 * time.Minute}
}

// ackMsg acknowledges the delta packet Seq of the node whose incarnation
// is To.
type ackMsg struct {
	From string `json:"f"`
	Inc  int64  `json:"i"`
	To   int64  `json:"t"`
	Seq  uint64 `json:"q"`
}

// flight is a packet awaiting its ack.
type flight struct {
	sent, due time.Time
	ids       []string // the entries it carries (none for a heartbeat)
}

// rtt estimates a peer's round trip (RFC 6298).
type rtt struct {
	srtt, rttvar time.Duration
	ok           bool
}

func (r *rtt) sample(d time.Duration) {
	if !r.ok {
		r.srtt, r.rttvar, r.ok = d, d/2, true
		return
	}
	diff := r.srtt - d
	if diff < 0 {
		diff = -diff
	}
	r.rttvar = (3*r.rttvar + diff) / 4
	r.srtt = (7*r.srtt + d) / 8
}

func (r *rtt) rto() time.Duration {
	if !r.ok {
		return initialRTO
	}
	return min(max(r.srtt+max(rttGranularity, 4*r.rttvar), minRTO), maxRTO)
}

// Stats counts what the delta channel did, for tests and operators.
type Stats struct {
	DeltaPackets uint64 // delta packets sent (heartbeats excluded)
	DeltaStreams uint64 // deltas sent over the reliable channel
	Heartbeats   uint64 // empty packets sent to idle peers
	Timeouts     uint64 // packets not acknowledged in time (their entries were sent again)
	SendFailures uint64 // reliable sends that failed (retried)
	Acks         uint64 // acks received for packets in flight
	Syncs        uint64 // push-pulls completed with a joining or rejoining node
	Reconnects   uint64 // push-pull attempts with nodes declared dead
	Deaths       uint64 // nodes this node saw declared dead (not those that left)
	Unreachable  uint64 // times a member became unreachable
}

type stats struct {
	deltaPackets, deltaStreams, heartbeats, timeouts, sendFailures, acks, syncs, reconnects, deaths, unreachable atomic.Uint64
}

// Stats returns the delta channel's counters.
func (c *Cluster) Stats() Stats {
	s := &c.stats
	return Stats{DeltaPackets: s.deltaPackets.Load(), DeltaStreams: s.deltaStreams.Load(), Heartbeats: s.heartbeats.Load(),
		Timeouts: s.timeouts.Load(), SendFailures: s.sendFailures.Load(), Acks: s.acks.Load(), Syncs: s.syncs.Load(),
		Reconnects: s.reconnects.Load(), Deaths: s.deaths.Load(), Unreachable: s.unreachable.Load()}
}

// ReachEvent reports that Reachable(Name) changed.
type ReachEvent struct {
	Name        string
	Incarnation int64
	Reachable   bool
}

// Reachable reports whether node name is a member of the cluster that
// answers this node: it was not declared dead and has not left, and the
// last packet this node sent it (a delta or a heartbeat, at least every
// heartbeat interval) was acknowledged, or was sent less than the
// unreachable timeout ago (one second, or three retransmission timeouts if
// longer; 300 ms in the test profile). A node that is cut off or dead is
// therefore unreachable about heartbeat + timeout after it stopped
// answering (~1–1.5 s in the LAN and WAN profiles), well before memberlist
// declares it dead, and reachable again with its first answer. Its
// sessions may still be live: only the gossip path is judged, which
// Postgres' relay does not share. The node itself is always reachable; a
// node this one never heard of is not. Nodes that predate acks are
// reachable while they are members.
func (c *Cluster) Reachable(name string) bool {
	if name == c.opts.Name {
		return true
	}
	c.mu.Lock()
	p := c.peers[name]
	c.mu.Unlock()
	if p == nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return c.answering(p, time.Now())
}

// SetReachHandler sets fn, called whenever Reachable of a node changes
// (joins and deaths included). Call it before Start; fn runs on the
// cluster's goroutines and must not block.
func (c *Cluster) SetReachHandler(fn func(ReachEvent)) { c.onReach = fn }

// answering is Reachable for a peer; p.mu held.
func (c *Cluster) answering(p *peer, now time.Time) bool {
	if !p.acks || p.silentSince.IsZero() || !p.lastHeard.Before(p.silentSince) {
		return true
	}
	return now.Sub(p.silentSince) < c.unreachableAfter(p)
}

func (c *Cluster) unreachableAfter(p *peer) time.Duration {
	return max(c.timings.unreachable, 3*p.rtt.rto())
}

// timeout is how long a packet sent now waits for its ack: the
// retransmission timeout, doubled for each timeout in a row, up to the
// backoff cap (or the timeout itself when the round trip is longer).
func (c *Cluster) timeout(p *peer) time.Duration {
	rto := p.rtt.rto()
	return min(rto<<min(p.failures, 4), max(rto, c.timings.backoffMax))
}

// deltaPacket is one delta ready to send: entries idx of a round.
type deltaPacket struct {
	seq uint64
	idx []int
}

// pack splits encoded entries into packets of at most the packet budget;
// entries that fit in no packet are returned apart.
func (c *Cluster) pack(bodies []json.RawMessage) (packets []deltaPacket, big []int) {
	head, _ := Marshal(deltaOut{From: c.opts.Name, Inc: c.opts.Incarnation, Seq: ^uint64(0), Entries: []json.RawMessage{}})
	room := c.packetBudget - len(head)
	var cur deltaPacket
	size := 0
	for i, b := range bodies {
		if len(b) > room {
			big = append(big, i)
			continue
		}
		if len(cur.idx) > 0 && size+1+len(b) > room {
			packets = append(packets, cur)
			cur, size = deltaPacket{}, 0
		}
		if len(cur.idx) > 0 {
			size++
		}
		cur.idx = append(cur.idx, i)
		size += len(b)
	}
	if len(cur.idx) > 0 {
		packets = append(packets, cur)
	}
	return packets, big
}

// sendLoop sends one peer its deltas and heartbeats until the peer leaves
// or the cluster stops.
func (c *Cluster) sendLoop(p *peer) {
	defer c.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := c.round(p)
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(max(time.Until(next), time.Millisecond))
		select {
		case <-p.stop:
			return
		case <-c.done:
			return
		case <-p.wake:
		case <-timer.C:
		}
	}
}

// round does what is due for p: it expires packets whose ack is late,
// sends what is pending and a heartbeat if the peer is idle, reports a
// change of reachability, and returns when it is next due.
func (c *Cluster) round(p *peer) time.Time {
	now := time.Now()
	p.mu.Lock()
	timedOut := false
	for seq, f := range p.inflight {
		if now.Before(f.due) {
			continue
		}
		delete(p.inflight, seq)
		for _, id := range f.ids {
			if p.latest[id] == seq {
				delete(p.latest, id)
				p.pending[id] = struct{}{}
			}
		}
		timedOut = true
		c.stats.timeouts.Add(1)
	}
	if timedOut {
		p.failures++
	}
	reliable := !p.acks || p.failures >= reliableAfter
	var ids []string
	if len(p.pending) > 0 && !(reliable && now.Before(p.retryAt)) {
		ids = make([]string, 0, len(p.pending))
		for id := range p.pending {
			ids = append(ids, id)
		}
		clear(p.pending)
	}
	node, acks := p.node, p.acks
	p.mu.Unlock()

	// The current versions: an entry changed since it was queued is sent
	// as it is now, and one forgotten meanwhile is not sent.
	entries := c.replica.OwnEntries(ids)
	ids = ids[:0]
	bodies := make([]json.RawMessage, 0, len(entries))
	for _, e := range entries {
		b, err := Marshal(wireEntry(e))
		if err != nil {
			continue
		}
		ids = append(ids, e.PresenceID)
		bodies = append(bodies, b)
	}
	var packets []deltaPacket
	var streamIdx []int
	if reliable {
		streamIdx = make([]int, len(bodies))
		for i := range bodies {
			streamIdx[i] = i
		}
	} else {
		packets, streamIdx = c.pack(bodies)
	}

	p.mu.Lock()
	if len(packets) > maxPacketsPerRound || len(packets) > maxInflight-len(p.inflight) {
		// A burst: one reliable message costs less than a window of
		// packets and their acks.
		for _, pk := range packets {
			streamIdx = append(streamIdx, pk.idx...)
		}
		packets = nil
	}
	if acks && len(packets) == 0 && len(p.inflight) == 0 && !now.Before(p.lastPacket.Add(c.heartbeatEvery(p))) {
		packets = append(packets, deltaPacket{})
	}
	for i := range packets {
		p.seq++
		packets[i].seq = p.seq
		f := &flight{sent: now, due: now.Add(c.timeout(p))}
		for _, j := range packets[i].idx {
			f.ids = append(f.ids, ids[j])
			p.latest[ids[j]] = p.seq
		}
		p.inflight[p.seq] = f
	}
	if len(packets) > 0 {
		// Only packets are answered: the reliable channel's sends do not
		// start a wait, and do not stand in for a heartbeat.
		if p.silentSince.IsZero() || !p.lastHeard.Before(p.silentSince) {
			p.silentSince = now
		}
		p.lastPacket = now
	}
	p.mu.Unlock()

	for _, pk := range packets {
		batch := make([]json.RawMessage, len(pk.idx))
		for k, j := range pk.idx {
			batch[k] = bodies[j]
		}
		body, _ := Marshal(deltaOut{From: c.opts.Name, Inc: c.opts.Incarnation, Seq: pk.seq, Entries: batch})
		if len(pk.idx) == 0 {
			c.stats.heartbeats.Add(1)
		} else {
			c.stats.deltaPackets.Add(1)
		}
		if err := c.ml.SendBestEffort(node, append([]byte{msgDeltas}, body...)); err != nil {
			// Its timeout resends it.
			c.logger.Debug("presence delta packet not sent", "peer", node.Name, "err", err)
		}
	}
	if len(streamIdx) > 0 {
		c.sendReliable(p, node, ids, bodies, streamIdx)
	}
	return c.settle(p)
}

// heartbeatEvery is how long an idle peer waits for its next heartbeat: a
// silent one is probed again as soon as its last probe timed out.
func (c *Cluster) heartbeatEvery(p *peer) time.Duration {
	if p.failures > 0 {
		return 0
	}
	return c.timings.heartbeat
}

// sendReliable sends the entries bodies[idx] over the reliable channel in
// batches; those of a batch that fails go back to pending.
func (c *Cluster) sendReliable(p *peer, node *memberlist.Node, ids []string, bodies []json.RawMessage, idx []int) {
	for len(idx) > 0 {
		var batch []json.RawMessage
		var batchIDs []string
		size := 0
		for len(idx) > 0 && len(batch) < maxDeltaBatch && size < maxDeltaBytes {
			i := idx[0]
			idx = idx[1:]
			batch = append(batch, bodies[i])
			batchIDs = append(batchIDs, ids[i])
			size += len(bodies[i]) + 1
		}
		body, _ := Marshal(deltaOut{From: c.opts.Name, Inc: c.opts.Incarnation, Entries: batch})
		c.stats.deltaStreams.Add(1)
		err := c.ml.SendReliable(node, append([]byte{msgDeltas}, body...))
		if err == nil {
			continue
		}
		c.stats.sendFailures.Add(1)
		c.logger.Debug("presence delta not sent; will retry", "peer", node.Name, "err", err)
		// This batch and the rest go back to pending (sent as they are
		// then), after a backoff, over the reliable channel until the peer
		// answers a packet again.
		p.mu.Lock()
		for _, id := range batchIDs {
			p.pending[id] = struct{}{}
		}
		for _, i := range idx {
			p.pending[ids[i]] = struct{}{}
		}
		p.failures = max(p.failures+1, reliableAfter)
		p.retryAt = time.Now().Add(c.timings.backoffMax)
		p.mu.Unlock()
		return
	}
}

// settle reports a change of p's reachability and returns when p is next
// due: its first ack deadline, its next heartbeat, the end of a reliable
// backoff, or the moment it would turn unreachable.
func (c *Cluster) settle(p *peer) time.Time {
	now := time.Now()
	p.mu.Lock()
	next := now.Add(time.Hour)
	for _, f := range p.inflight {
		if f.due.Before(next) {
			next = f.due
		}
	}
	if p.acks && len(p.inflight) == 0 {
		if hb := p.lastPacket.Add(c.heartbeatEvery(p)); hb.Before(next) {
			next = hb
		}
	}
	if len(p.pending) > 0 {
		at := now
		if p.failures >= reliableAfter || !p.acks {
			at = p.retryAt
		}
		if at.Before(next) {
			next = at
		}
	}
	reach := c.answering(p, now)
	if reach && p.acks && !p.silentSince.IsZero() && p.lastHeard.Before(p.silentSince) {
		if at := p.silentSince.Add(c.unreachableAfter(p)); at.Before(next) {
			next = at
		}
	}
	changed := reach != p.reachable
	p.reachable = reach
	ev := ReachEvent{Name: p.name, Incarnation: p.inc, Reachable: reach}
	p.mu.Unlock()
	if changed {
		c.reachChanged(ev)
	}
	return next
}

func (c *Cluster) reachChanged(ev ReachEvent) {
	if !ev.Reachable {
		c.stats.unreachable.Add(1)
		c.logger.Info("cluster node not answering", "peer", ev.Name)
	} else {
		c.logger.Info("cluster node answering", "peer", ev.Name)
	}
	if c.onReach != nil {
		c.onReach(ev)
	}
}

// acked handles an ack from p for packet seq.
func (c *Cluster) acked(p *peer, seq uint64) {
	now := time.Now()
	p.mu.Lock()
	p.lastHeard = now
	if f := p.inflight[seq]; f != nil {
		delete(p.inflight, seq)
		for _, id := range f.ids {
			if p.latest[id] == seq {
				delete(p.latest, id)
			}
		}
		p.rtt.sample(now.Sub(f.sent))
		c.stats.acks.Add(1)
	}
	p.failures = 0
	p.retryAt = time.Time{}
	p.mu.Unlock()
	poke(p.wake)
}

// sendAck acknowledges delta packet seq from node from (incarnation inc).
func (c *Cluster) sendAck(from string, inc int64, seq uint64) {
	c.mu.Lock()
	p := c.peers[from]
	c.mu.Unlock()
	if p == nil {
		return // not a member (yet): it will send again
	}
	p.mu.Lock()
	node := p.node
	p.mu.Unlock()
	body, _ := Marshal(ackMsg{From: c.opts.Name, Inc: c.opts.Incarnation, To: inc, Seq: seq})
	if err := c.ml.SendBestEffort(node, append([]byte{msgAck}, body...)); err != nil {
		c.logger.Debug("presence ack not sent", "peer", from, "err", err)
	}
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// syncLoop runs the push-pulls asked of p (on its join, a rejoin after it
// was declared dead, a restart), each retried until it succeeds.
func (c *Cluster) syncLoop(p *peer) {
	defer c.wg.Done()
	for {
		select {
		case <-p.stop:
			return
		case <-c.done:
			return
		case <-p.syncReq:
		}
		wait := c.timings.reconnectMin / 2
		for {
			p.mu.Lock()
			addr := p.node.Address()
			p.mu.Unlock()
			if _, err := c.ml.Join([]string{addr}); err == nil {
				c.stats.syncs.Add(1)
				break
			}
			select {
			case <-p.stop:
				return
			case <-c.done:
				return
			case <-time.After(wait):
			}
			wait = min(2*wait, c.timings.reconnectMax)
		}
	}
}

// deadPeer is a node declared dead that this node keeps contacting, so
// that both sides of a healed cut find each other again whatever the
// shape of the cut (memberlist alone only gossips to the dead for a
// while, and only when it has something to say).
type deadPeer struct {
	addr   string
	since  time.Time // declared dead
	next   time.Time // next attempt
	wait   time.Duration
	trying bool
}

// maxDeadPeers bounds the dead nodes contacted; beyond it the longest dead
// is forgotten.
const maxDeadPeers = 128

// reconnectLoop contacts the nodes declared dead, each at its own
// backoff, until they are back or reconnectFor has passed.
func (c *Cluster) reconnectLoop() {
	defer c.wg.Done()
	tick := time.NewTicker(c.timings.reconnectMin / 2)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-tick.C:
		}
		now := time.Now()
		type attempt struct{ name, addr string }
		var due []attempt
		c.mu.Lock()
		for name, d := range c.dead {
			switch {
			case now.Sub(d.since) > c.timings.reconnectFor:
				delete(c.dead, name)
			case !d.trying && !now.Before(d.next):
				d.trying = true
				due = append(due, attempt{name, d.addr})
			}
		}
		c.mu.Unlock()
		for _, a := range due {
			c.stats.reconnects.Add(1)
			c.dials.Add(1)
			go func() {
				defer c.dials.Done()
				_, err := c.ml.Join([]string{a.addr})
				c.mu.Lock()
				if d := c.dead[a.name]; d != nil {
					d.trying = false
					d.next = time.Now().Add(d.wait)
					d.wait = min(2*d.wait, c.timings.reconnectMax)
				}
				c.mu.Unlock()
				if err != nil {
					c.logger.Debug("dead cluster node not reached", "peer", a.name, "err", err)
				}
			}()
		}
	}
}

// noteDead starts contacting a node declared dead; c.mu held.
func (c *Cluster) noteDead(name, addr string) {
	if len(c.dead) >= maxDeadPeers {
		var oldest string
		for n, d := range c.dead {
			if oldest == "" || d.since.Before(c.dead[oldest].since) {
				oldest = n
			}
		}
		delete(c.dead, oldest)
	}
	now := time.Now()
	c.dead[name] = &deadPeer{addr: addr, since: now, next: now.Add(c.timings.reconnectMin), wait: 2 * c.timings.reconnectMin}
}
