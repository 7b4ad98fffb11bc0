package faultkit

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

var errNotSettled = errors.New("not settled")

// Options configure a Burst.
type Options struct {
	// URLs are the nodes' WebSocket URLs; peer i first connects to
	// URLs[i % len(URLs)].
	URLs []string
	// Members are the peers' identities, one peer each (at least two).
	Members []client.Identity
	// Rate is the messages offered per second by all peers together.
	Rate float64
	// Size pads each message's ciphertext to this many bytes.
	Size int
	// Seed makes the senders' choice of recipients repeatable.
	Seed uint64
	// ConnectTimeout bounds the wait for every peer's first session;
	// zero means 20 s.
	ConnectTimeout time.Duration
}

// record is what the burst knows about one message.
type record struct {
	from, to  int
	body      string
	first     time.Time // first offered
	ackedAt   time.Time
	messageID string
	delivered time.Time       // first handed to the recipient's application
	appIDs    map[string]bool // messageIds of it the application was handed
	pushes    int             // pushes to the recipient, redeliveries included
	wrongPeer int             // pushes of it to another peer
	corrupt   int             // pushes whose ciphertext differs from what was sent
}

// ledger records every message of a burst, from offer to delivery.
type ledger struct {
	mu         sync.Mutex
	msgs       map[string]*record // by client_message_id
	unexpected int                // pushes of messages the burst never offered
	faults     []string           // labels of the faults injected, in order
}

func (l *ledger) offered(cmid string, from, to int, body string, at time.Time) {
	l.mu.Lock()
	l.msgs[cmid] = &record{from: from, to: to, body: body, first: at}
	l.mu.Unlock()
}

func (l *ledger) acked(cmid, messageID string, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r := l.msgs[cmid]; r != nil && r.ackedAt.IsZero() {
		r.ackedAt, r.messageID = at, messageID
	}
}

func (l *ledger) pushed(peer int, m protocol.Push, first bool, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := l.msgs[m.ClientMessageID]
	if r == nil {
		l.unexpected++
		return
	}
	if r.to != peer {
		r.wrongPeer++
		return
	}
	r.pushes++
	if m.Ciphertext != r.body {
		r.corrupt++
	}
	if !first {
		return // the peer deduped it: its application does not see it again
	}
	if r.appIDs == nil {
		r.appIDs = map[string]bool{}
	}
	r.appIDs[m.MessageID] = true
	if r.delivered.IsZero() {
		r.delivered = at
	}
}

// Burst is a set of peers sending to each other at a steady rate while a
// test injects faults.
type Burst struct {
	opts   Options
	peers  []*Peer
	ledger *ledger

	cancel  context.CancelFunc
	stopGen chan struct{}
	genDone chan struct{}
	wg      sync.WaitGroup
	once    sync.Once
	started time.Time
	stopped time.Time // guarded by ledger.mu
}

// Start connects one peer per member, waits until all have a session and
// starts offering messages. The burst is closed when the test ends.
func Start(t testing.TB, o Options) *Burst {
	t.Helper()
	if len(o.Members) < 2 || len(o.URLs) == 0 || o.Rate <= 0 {
		t.Fatalf("faultkit: a burst needs two members, a URL and a rate (got %d, %d, %v)", len(o.Members), len(o.URLs), o.Rate)
	}
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = 20 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Burst{opts: o, ledger: &ledger{msgs: map[string]*record{}}, cancel: cancel,
		stopGen: make(chan struct{}), genDone: make(chan struct{})}
	t.Cleanup(b.Close)
	for i, id := range o.Members {
		p := NewPeer(id, o.URLs, i)
		p.index, p.ledger = i, b.ledger
		b.peers = append(b.peers, p)
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			p.Run(ctx)
		}()
	}
	if err := WaitConnected(ctx, o.ConnectTimeout, b.peers...); err != nil {
		t.Fatalf("faultkit: %v", err)
	}
	b.started = time.Now()
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		b.generate(ctx)
	}()
	return b
}

// generate offers messages at the configured rate, senders in turn, each
// to a random other peer, until Stop.
func (b *Burst) generate(ctx context.Context) {
	defer close(b.genDone)
	const step = 10 * time.Millisecond
	tick := time.NewTicker(step)
	defer tick.Stop()
	rng := rand.New(rand.NewPCG(b.opts.Seed, 0x5eed))
	n := len(b.peers)
	perStep := b.opts.Rate * step.Seconds()
	credit, seq, sender := 0.0, 0, 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-b.stopGen:
			return
		case <-tick.C:
		}
		for credit += perStep; credit >= 1; credit-- {
			from := sender % n
			sender++
			to := rng.IntN(n - 1)
			if to >= from {
				to++
			}
			seq++
			cmid := fmt.Sprintf("m%d-%d", from, seq)
			body := cmid
			if len(body) < b.opts.Size {
				body += strings.Repeat(".", b.opts.Size-len(body))
			}
			b.ledger.offered(cmid, from, to, body, time.Now())
			b.peers[from].Send(b.peers[to].id.Pubkey(), cmid, body)
		}
	}
}

// Peers are the burst's peers, in member order.
func (b *Burst) Peers() []*Peer { return b.peers }

// Mark notes a fault injected now (label says which) and returns the
// instant, from which Recovery is measured.
func (b *Burst) Mark(label string) time.Time {
	b.ledger.mu.Lock()
	defer b.ledger.mu.Unlock()
	b.ledger.faults = append(b.ledger.faults, label)
	return time.Now()
}

// Offered counts the messages offered so far.
func (b *Burst) Offered() int {
	b.ledger.mu.Lock()
	defer b.ledger.mu.Unlock()
	return len(b.ledger.msgs)
}

// Recovery is how long after since the burst was whole again: every peer
// had a send offered after since acked, and had a message offered after
// since handed to its application. ok is false while that has not
// happened.
func (b *Burst) Recovery(since time.Time) (d time.Duration, ok bool) {
	n := len(b.peers)
	acked := make([]time.Time, n)
	delivered := make([]time.Time, n)
	b.ledger.mu.Lock()
	for _, r := range b.ledger.msgs {
		if r.first.Before(since) {
			continue
		}
		if !r.ackedAt.IsZero() && (acked[r.from].IsZero() || r.ackedAt.Before(acked[r.from])) {
			acked[r.from] = r.ackedAt
		}
		if !r.delivered.IsZero() && (delivered[r.to].IsZero() || r.delivered.Before(delivered[r.to])) {
			delivered[r.to] = r.delivered
		}
	}
	b.ledger.mu.Unlock()
	var last time.Time
	for i := 0; i < n; i++ {
		if acked[i].IsZero() || delivered[i].IsZero() {
			return 0, false
		}
		last = latest(last, acked[i], delivered[i])
	}
	return last.Sub(since), true
}

func latest(ts ...time.Time) time.Time {
	var out time.Time
	for _, t := range ts {
		if t.After(out) {
			out = t
		}
	}
	return out
}

// WaitRecovered waits (bounded) until the burst has recovered from the
// fault at since, and returns the recovery time.
func (b *Burst) WaitRecovered(t testing.TB, since time.Time, timeout time.Duration) time.Duration {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if d, ok := b.Recovery(since); ok {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("faultkit: the burst did not recover within %s of the fault", timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Latencies returns offer-to-application latencies of the messages first
// offered in [from, to), sorted.
func (b *Burst) Latencies(from, to time.Time) []time.Duration {
	var out []time.Duration
	b.ledger.mu.Lock()
	for _, r := range b.ledger.msgs {
		if r.first.Before(from) || !r.first.Before(to) || r.delivered.IsZero() {
			continue
		}
		out = append(out, r.delivered.Sub(r.first))
	}
	b.ledger.mu.Unlock()
	slices.Sort(out)
	return out
}

// Quantile returns the q-quantile of sorted durations (0 when empty).
func Quantile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)))
	return sorted[min(i, len(sorted)-1)]
}

// Stop stops offering new messages; sends already offered keep being
// retried until acked.
func (b *Burst) Stop() {
	b.ledger.mu.Lock()
	select {
	case <-b.stopGen:
	default:
		close(b.stopGen)
		b.stopped = time.Now()
	}
	b.ledger.mu.Unlock()
	<-b.genDone
}

// Settle stops the load, waits until every offered message is acked and
// every acked one handed to its recipient's application (bounded by
// timeout), and reports.
func (b *Burst) Settle(timeout time.Duration) Report {
	b.Stop()
	deadline := time.Now().Add(timeout)
	for {
		r := b.Report()
		if r.Unacked == 0 && r.Lost == 0 {
			r.SettledIn = time.Since(b.stopTime())
			return r
		}
		if time.Now().After(deadline) {
			r.SettleErr = fmt.Errorf("%w after %s: %d unacked, %d acked but undelivered", errNotSettled, timeout, r.Unacked, r.Lost)
			return r
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (b *Burst) stopTime() time.Time {
	b.ledger.mu.Lock()
	defer b.ledger.mu.Unlock()
	return b.stopped
}

// Close disconnects every peer and waits for their goroutines.
func (b *Burst) Close() {
	b.once.Do(func() {
		b.cancel()
		b.wg.Wait()
	})
}

// Report accounts for every message of a burst.
type Report struct {
	Faults   []string // injected during the burst, in order
	Peers    int
	Duration time.Duration // from the start of the load to its stop
	Offered  int           // distinct messages (client_message_ids) offered
	Acked    int           // acked as queued by the broker
	Unacked  int           // offered but never acked
	Rejected int           // refused with a permanent error (a harness bug)
	// Delivered counts acked messages handed to their recipient's
	// application; Lost those acked and never handed over.
	Delivered int
	Lost      int
	// AppDuplicates counts messages handed to an application more than
	// once (under different messageIds: an idempotency failure).
	AppDuplicates int
	// Redeliveries counts pushes beyond the first of a messageId to its
	// recipient: the broker redelivered, the peer deduped.
	Redeliveries int
	// Misdelivered counts pushes to the wrong peer, with altered
	// ciphertext, or of messages nobody sent; ConflictingAcks acks that
	// named two messageIds for one client_message_id.
	Misdelivered    int
	ConflictingAcks int
	AckErrors       map[string]int // transient ack errors (retried), by code
	Resends         int            // sends written again (reconnect, retry, lost ack)
	Reconnects      int            // sessions beyond each peer's first
	P50, P99, Max   time.Duration  // offer → application latency
	SettledIn       time.Duration  // from the load's stop until all was accounted for
	SettleErr       error
}

// Report accounts for the burst so far.
func (b *Burst) Report() Report {
	r := Report{Peers: len(b.peers), AckErrors: map[string]int{}}
	for _, p := range b.peers {
		p.mu.Lock()
		for _, n := range p.seen {
			r.Redeliveries += n - 1
		}
		for code, n := range p.ackErrors {
			r.AckErrors[code] += n
		}
		r.Rejected += len(p.rejected)
		r.ConflictingAcks += p.conflicts
		r.Resends += p.resends
		r.Reconnects += max(p.connects-1, 0)
		p.mu.Unlock()
	}
	var lat []time.Duration
	b.ledger.mu.Lock()
	end := b.stopped
	if end.IsZero() {
		end = time.Now()
	}
	r.Duration = end.Sub(b.started)
	r.Faults = slices.Clone(b.ledger.faults)
	r.Offered = len(b.ledger.msgs)
	r.Misdelivered = b.ledger.unexpected
	for _, m := range b.ledger.msgs {
		r.Misdelivered += m.wrongPeer + m.corrupt
		if m.ackedAt.IsZero() {
			r.Unacked++
		} else {
			r.Acked++
		}
		if len(m.appIDs) > 1 {
			r.AppDuplicates += len(m.appIDs) - 1
		}
		switch {
		case !m.delivered.IsZero():
			r.Delivered++
			lat = append(lat, m.delivered.Sub(m.first))
		case !m.ackedAt.IsZero():
			r.Lost++
		}
	}
	b.ledger.mu.Unlock()
	r.Unacked -= r.Rejected
	slices.Sort(lat)
	r.P50, r.P99 = Quantile(lat, 0.5), Quantile(lat, 0.99)
	if len(lat) > 0 {
		r.Max = lat[len(lat)-1]
	}
	return r
}

// Problems lists what went wrong: nothing when every offered message was
// acked and every acked one reached its recipient's application exactly
// once, untouched.
func (r Report) Problems() []string {
	var out []string
	if r.SettleErr != nil {
		out = append(out, r.SettleErr.Error())
	}
	if r.Lost != 0 || r.AppDuplicates != 0 || r.Unacked != 0 || r.Rejected != 0 || r.Misdelivered != 0 || r.ConflictingAcks != 0 {
		out = append(out, r.String())
	}
	if r.Offered == 0 || r.Delivered != r.Acked {
		out = append(out, fmt.Sprintf("delivered %d of %d acked (%d offered)", r.Delivered, r.Acked, r.Offered))
	}
	return out
}

// Check fails the test when the report has Problems.
func (r Report) Check(t testing.TB) {
	t.Helper()
	for _, p := range r.Problems() {
		t.Errorf("faultkit: %s", p)
	}
}

func (r Report) String() string {
	errs := make([]string, 0, len(r.AckErrors))
	for code, n := range r.AckErrors {
		errs = append(errs, fmt.Sprintf("%s=%d", code, n))
	}
	slices.Sort(errs)
	return fmt.Sprintf("faults [%s]: %d peers, %d messages in %s (%.0f/s): acked %d, delivered %d, lost %d, app duplicates %d, "+
		"broker redeliveries %d (deduped), unacked %d, rejected %d, misdelivered %d, conflicting acks %d, "+
		"ack errors retried [%s], resends %d, reconnects %d, latency p50 %s p99 %s max %s, settled in %s",
		strings.Join(r.Faults, ", "), r.Peers, r.Offered, r.Duration.Round(time.Millisecond), float64(r.Offered)/max(r.Duration.Seconds(), 1e-9),
		r.Acked, r.Delivered, r.Lost, r.AppDuplicates, r.Redeliveries, r.Unacked, r.Rejected, r.Misdelivered,
		r.ConflictingAcks, strings.Join(errs, " "), r.Resends, r.Reconnects,
		r.P50.Round(time.Millisecond), r.P99.Round(time.Millisecond), r.Max.Round(time.Millisecond),
		r.SettledIn.Round(time.Millisecond))
}
