package server

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/claudemesh/broker/internal/store"
)

// auditor writes audit events asynchronously in batches. A full buffer
// drops events (counted) rather than slowing the hot path.
type auditor struct {
	s     *Server
	ch    chan queuedEvent
	bytes atomic.Int64  // estimated size of the events in ch
	kick  chan struct{} // the buffer is half full: flush before the tick
}

type queuedEvent struct {
	e    store.AuditEvent
	size int64
}

// auditBuffer bounds the events waiting for their batch (at 200 ms per
// batch, room for 40,000 events a second), and auditBufferBytes their
// size: events differ in size (a delivery event lists up to thousands of
// message ids), and a count alone would let large ones pile up.
const (
	auditBuffer      = 8192
	auditBufferBytes = 16 << 20
)

func newAuditor(s *Server) *auditor {
	return &auditor{s: s, ch: make(chan queuedEvent, auditBuffer), kick: make(chan struct{}, 1)}
}

func (a *auditor) add(e store.AuditEvent) {
	if e.CreatedAt.IsZero() {
		e.CreatedAt = time.Now()
	}
	if e.Metadata == nil {
		e.Metadata = map[string]any{}
	}
	size := eventSize(&e)
	if a.bytes.Add(size) > auditBufferBytes {
		a.bytes.Add(-size)
		a.s.m.AuditDropped.Inc()
		a.flushSoon()
		return
	}
	select {
	case a.ch <- queuedEvent{e: e, size: size}:
	default:
		a.bytes.Add(-size)
		a.s.m.AuditDropped.Inc()
	}
	if len(a.ch) > auditBuffer/2 || a.bytes.Load() > auditBufferBytes/2 {
		a.flushSoon()
	}
}

func (a *auditor) flushSoon() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// Rejected hellos come from anyone, before any authentication: what they
// claim is stored clipped, so that a flood of them costs a bounded row
// each (the shape check already bounds these fields; this holds whatever
// path a rejection takes).
const (
	maxRejectedField  = 128
	maxRejectedDetail = 256
)

// helloRejected records a rejected hello.
func (a *auditor) helloRejected(meshID, pubkey, reason, detail, remote string) {
	meta := map[string]any{"reason": reason, "remote": clipText(remote, maxRejectedField)}
	if detail != "" {
		meta["detail"] = clipText(detail, maxRejectedDetail)
	}
	a.add(store.AuditEvent{MeshID: clipText(meshID, maxRejectedField), Type: store.EventHelloRejected,
		Actor: clipText(pubkey, maxRejectedField), Metadata: meta})
}

// clipText makes s storable text of at most max bytes: invalid UTF-8 and
// NUL are replaced, and the cut falls between characters.
func clipText(s string, max int) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\ufffd")
	}
	s = strings.ReplaceAll(s, "\x00", "\ufffd")
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// eventSize estimates the bytes an event holds (in memory and as a row).
func eventSize(e *store.AuditEvent) int64 {
	n := 64 + len(e.MeshID) + len(e.Type) + len(e.Actor) + len(e.Target)
	for k, v := range e.Metadata {
		n += len(k) + 8
		switch v := v.(type) {
		case string:
			n += len(v)
		case []int64:
			n += 20 * len(v)
		case []string:
			for _, x := range v {
				n += len(x) + 8
			}
		case int, int64, int32, float64, bool, nil:
			n += 20
		default:
			b, _ := json.Marshal(v)
			n += len(b)
		}
	}
	return int64(n)
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
		case q := <-a.ch:
			a.bytes.Add(-q.size)
			batch = append(batch, q.e)
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
		var re *store.RowsError
		if errors.As(err, &re) {
			// Only the events Postgres refused were left out (or, if it
			// went away meanwhile, those not yet written).
			refused := re.Refused()
			a.s.m.BatchRowsFailed.WithLabelValues("audit").Add(float64(refused))
			a.s.logger.Warn("audit events refused by Postgres; the rest were written", "err", err, "refused", refused)
			lost := 0
			for _, e := range re.Errs {
				if e != nil && !store.IsDataError(e) {
					lost++
				}
			}
			if lost == 0 {
				continue
			}
			a.s.m.AuditDropped.Add(float64(lost))
			return
		}
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
