package server

import (
	"context"
	"time"

	"github.com/claudemesh/broker/internal/store"
)

// auditor writes audit events asynchronously in batches. A full buffer
// drops events (counted) rather than slowing the hot path.
type auditor struct {
	s    *Server
	ch   chan store.AuditEvent
	kick chan struct{} // the buffer is half full: flush before the tick
}

// auditBuffer bounds the events waiting for their batch (at 200 ms per
// batch, room for 40,000 events a second).
const auditBuffer = 8192

func newAuditor(s *Server) *auditor {
	return &auditor{s: s, ch: make(chan store.AuditEvent, auditBuffer), kick: make(chan struct{}, 1)}
}

func (a *auditor) add(e store.AuditEvent) {
	if e.CreatedAt.IsZero() {
		e.CreatedAt = time.Now()
	}
	if e.Metadata == nil {
		e.Metadata = map[string]any{}
	}
	select {
	case a.ch <- e:
	default:
		a.s.m.AuditDropped.Inc()
	}
	if len(a.ch) > auditBuffer/2 {
		select {
		case a.kick <- struct{}{}:
		default:
		}
	}
}

func (a *auditor) run(ctx context.Context) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			a.flush(ctx)
		case <-a.kick:
			a.flush(ctx)
		}
	}
}

func (a *auditor) take(max int) []store.AuditEvent {
	var batch []store.AuditEvent
	for len(batch) < max {
		select {
		case e := <-a.ch:
			batch = append(batch, e)
		default:
			return batch
		}
	}
	return batch
}

func (a *auditor) flush(ctx context.Context) {
	for {
		batch := a.take(5000)
		if len(batch) == 0 {
			return
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := a.s.store.InsertAudit(cctx, batch)
		cancel()
		if err != nil {
			// Audit is best effort while Postgres is down.
			a.s.m.AuditDropped.Add(float64(len(batch)))
			if ctx.Err() == nil {
				a.s.logger.Warn("audit write failed; events dropped", "err", err, "events", len(batch))
			}
			return
		}
	}
}

// flushNow writes what is buffered (at shutdown).
func (a *auditor) flushNow(ctx context.Context) { a.flush(ctx) }
