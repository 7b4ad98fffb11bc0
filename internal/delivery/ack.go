package delivery

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/broker/internal/startstop"
)

// acker marks delivered rows in batches: client_acks, and pushes written
// to sessions without client_ack.
type acker struct {
	startstop.Base
	e       *Engine
	mu      sync.Mutex
	pending []ackItem
	// unmarked holds every key queued or being written, until its mark has
	// committed: claims skip them.
	unmarked map[Key]int
	signal   chan struct{}
	abandon  atomic.Bool // stop without the last flush (a crash)
	// batch bounds the keys one mark statement writes: maxMarkBatch,
	// halved when a statement runs out of time (down to minMarkBatch) and
	// doubled back after growStreak that finish in a row; guarded by mu.
	batch, streak int
}

const (
	maxMarkBatch = 4096
	minMarkBatch = 64
)

type ackItem struct {
	key  Key
	mesh string
}

// maxPendingAcks bounds the acks kept while the queue is down.
const maxPendingAcks = 1 << 20

func newAcker(e *Engine) *acker {
	return &acker{e: e, signal: make(chan struct{}, 1), unmarked: map[Key]int{}, batch: maxMarkBatch}
}

func (a *acker) Start(ctx context.Context) error {
	if _, ok := a.StartInit(ctx); !ok {
		return nil
	}
	a.Go(a.run)
	return nil
}

func (a *acker) Stop(ctx context.Context) { a.Base.Stop(ctx) }

// unmarkedHas reports whether a row is acked but not yet marked delivered.
func (a *acker) unmarkedHas(k Key) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.unmarked[k] > 0
}

// add queues rows of one mesh to mark delivered.
func (a *acker) add(mesh string, keys ...Key) {
	a.mu.Lock()
	if len(a.pending)+len(keys) <= maxPendingAcks {
		for _, k := range keys {
			a.pending = append(a.pending, ackItem{key: k, mesh: mesh})
			a.unmarked[k]++
		}
	}
	a.mu.Unlock()
	select {
	case a.signal <- struct{}{}:
	default:
	}
}

// ackLinger lets marks accumulate before a flush: the push is already on
// the wire, so a few milliseconds cost nothing visible, and at moderate
// rates they turn one small transaction per push into one per batch.
const ackLinger = 5 * time.Millisecond

func (a *acker) run(ctx context.Context) {
	defer a.last()
	linger := time.NewTimer(ackLinger)
	linger.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.signal:
		}
		linger.Reset(ackLinger)
		select {
		case <-ctx.Done():
			return
		case <-linger.C:
		}
		for a.flush(ctx) {
		}
	}
}

// last writes what is pending as the acker stops (bounded).
func (a *acker) last() {
	if a.abandon.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		a.mu.Lock()
		n := len(a.pending)
		a.mu.Unlock()
		if n == 0 || !a.flush(ctx) {
			return
		}
	}
}

// resize adapts the mark batch to how the last statement of n keys went.
func (a *acker) resize(ok, timedOut bool, n int) {
	a.mu.Lock()
	switch {
	case timedOut:
		a.batch, a.streak = max(minMarkBatch, min(a.batch, n)/2), 0
	case ok && a.batch < maxMarkBatch:
		if a.streak++; a.streak >= growStreak {
			a.batch, a.streak = min(maxMarkBatch, a.batch*2), 0
		}
	}
	a.mu.Unlock()
	if timedOut {
		a.e.m.MarkShrinks.Inc()
	}
}

// flush writes one batch and reports whether more is pending.
func (a *acker) flush(ctx context.Context) bool {
	a.mu.Lock()
	n := min(len(a.pending), a.batch)
	if n == 0 {
		a.mu.Unlock()
		return false
	}
	batch := make([]ackItem, n)
	copy(batch, a.pending)
	a.pending = a.pending[n:]
	if len(a.pending) == 0 {
		a.pending = nil
	}
	a.mu.Unlock()
	e := a.e
	keys := make([]Key, n)
	meshOf := make(map[string]string, n) // member → mesh
	for i, it := range batch {
		keys[i] = it.key
		meshOf[it.key.MemberID] = it.mesh
	}
	cctx, cancel := context.WithTimeout(ctx, e.cfg.StatementTimeout)
	done, err := e.q.MarkDelivered(cctx, &MarkParams{Keys: keys, Node: e.leaseNode})
	timedOut := errors.Is(cctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil
	cancel()
	a.resize(err == nil, timedOut, n)
	var re *RowsError
	if errors.As(err, &re) {
		// Keys the queue refused can never be marked: they are dropped (a
		// lease on such a row runs out by itself). Keys that failed because
		// the queue went away meanwhile are queued again.
		err = nil
		e.m.BatchRowsFailed.WithLabelValues("mark").Add(float64(re.Refused()))
		e.logger.Warn("delivery marks refused by Postgres; the rest were written", "err", re)
		var again []ackItem
		settled := keys[:0:0]
		for i, err := range re.Errs {
			if err != nil && !errors.Is(err, ErrRefused) {
				again = append(again, batch[i])
			} else {
				settled = append(settled, keys[i])
			}
		}
		keys = settled
		if len(again) > 0 {
			a.mu.Lock()
			a.pending = append(again, a.pending...)
			a.mu.Unlock()
		}
	}
	if err != nil {
		a.mu.Lock()
		a.pending = append(batch, a.pending...)
		a.mu.Unlock()
		if timedOut {
			// Too large to finish in time: retry at once, smaller.
			e.logger.Warn("marking deliveries ran out of time; retrying with fewer", "err", err, "rows", len(batch))
			return true
		}
		if ctx.Err() == nil {
			e.logger.Warn("marking deliveries failed; will retry", "err", err, "rows", len(batch))
			select {
			case <-ctx.Done():
			case <-time.After(500 * time.Millisecond):
			}
		}
		return ctx.Err() == nil
	}
	a.mu.Lock()
	for _, k := range keys {
		if a.unmarked[k]--; a.unmarked[k] <= 0 {
			delete(a.unmarked, k)
		}
	}
	a.mu.Unlock()
	e.m.MessagesDelivered.Add(float64(len(done)))
	// One audit event per recipient and batch, listing its messages.
	byMember := map[string][]int64{}
	for _, d := range done {
		byMember[d.MemberID] = append(byMember[d.MemberID], d.MessageID)
	}
	for member, ids := range byMember {
		e.audit.MessagesDelivered(meshOf[member], member, ids)
	}
	e.TestSignals.Marked.Signal(len(done))
	return true
}
