package server

import (
	"context"
	"time"

	"github.com/claudemesh/broker/internal/store"
)

// auditor writes audit events asynchronously in batches. A full buffer
// drops events (counted) rather than slowing the hot path.
type auditor struct {
	s  *Server
	ch chan store.AuditEvent
}

func newAuditor(s *Server) *auditor { return &auditor{s: s, ch: make(chan store.AuditEvent, 65536)} }

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
