// Package audit writes the audit log: events queued in a bounded buffer
// and written in batches, off every hot path.
package audit

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/startstop"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testsignal"
)

// Writer writes audit events asynchronously in batches. A full buffer
// drops events (counted) rather than slowing the hot path. Every part of a
// node writes through the one Writer: the WebSocket front (connects,
// rejected hellos, status changes), the HTTP routes (joins) and the
// delivery engine (queued, delivered, expired), which is why it is a
// package of its own rather than part of either.
type Writer struct {
	startstop.Base
	store   Store
	m       *metrics.Metrics
	logger  *slog.Logger
	ch      chan queuedEvent
	bytes   atomic.Int64  // estimated size of the events in ch
	kick    chan struct{} // the buffer is half full: flush before the tick
	flushed testsignal.Signal[int]
	abandon atomic.Bool // stop without the last flush (a crash)
}

// Store is where events go (store.Store).
type Store interface {
	InsertAudit(ctx context.Context, events []store.AuditEvent) error
}

var (
	_ startstop.Service = (*Writer)(nil)
	_ delivery.Auditor  = (*Writer)(nil)
)

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

// New makes a writer; Start runs it.
func New(st Store, m *metrics.Metrics, logger *slog.Logger) *Writer {
	return &Writer{store: st, m: m, logger: logger, ch: make(chan queuedEvent, auditBuffer), kick: make(chan struct{}, 1)}
}

// Start runs the flush loop.
func (a *Writer) Start(ctx context.Context) error {
	if _, ok := a.StartInit(ctx); !ok {
		return nil
	}
	a.Go(a.run)
	return nil
}

// Stop writes what is buffered and stops (bounded by ctx).
func (a *Writer) Stop(ctx context.Context) { a.Base.Stop(ctx) }

// Abort stops without writing what is buffered, as a crash would.
func (a *Writer) Abort() {
	a.abandon.Store(true)
	a.Base.Stop(context.Background())
}

// Flushed signals the events written by each flush (for tests).
func (a *Writer) Flushed() *testsignal.Signal[int] { return &a.flushed }

// Add queues an event; it never blocks.
func (a *Writer) Add(e store.AuditEvent) {
	if e.CreatedAt.IsZero() {
		e.CreatedAt = time.Now()
	}
	if e.Metadata == nil {
		e.Metadata = map[string]any{}
	}
	size := eventSize(&e)
	if a.bytes.Add(size) > auditBufferBytes {
		a.bytes.Add(-size)
		a.m.AuditDropped.Inc()
		a.flushSoon()
		return
	}
	select {
	case a.ch <- queuedEvent{e: e, size: size}:
	default:
		a.bytes.Add(-size)
		a.m.AuditDropped.Inc()
	}
	if len(a.ch) > auditBuffer/2 || a.bytes.Load() > auditBufferBytes/2 {
		a.flushSoon()
	}
}

func (a *Writer) flushSoon() {
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

// HelloRejected records a rejected hello.
func (a *Writer) HelloRejected(meshID, pubkey, reason, detail, remote string) {
	meta := map[string]any{"reason": reason, "remote": clipText(remote, maxRejectedField)}
	if detail != "" {
		meta["detail"] = clipText(detail, maxRejectedDetail)
	}
	a.Add(store.AuditEvent{MeshID: clipText(meshID, maxRejectedField), Type: store.EventHelloRejected,
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
		case []int:
			n += 12 * len(v)
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

func (a *Writer) run(ctx context.Context) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if a.abandon.Load() {
				return
			}
			// Last call: what the node's other parts wrote while stopping.
			fctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			a.flush(fctx)
			cancel()
			return
		case <-tick.C:
			a.flush(ctx)
		case <-a.kick:
			a.flush(ctx)
		}
	}
}

func (a *Writer) take(max int) []store.AuditEvent {
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

func (a *Writer) flush(ctx context.Context) {
	for {
		batch := a.take(5000)
		if len(batch) == 0 {
			return
		}
		a.flushed.Signal(len(batch))
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := a.store.InsertAudit(cctx, batch)
		cancel()
		var re *store.RowsError
		if errors.As(err, &re) {
			// Only the events Postgres refused were left out (or, if it
			// went away meanwhile, those not yet written).
			refused := re.Refused()
			a.m.BatchRowsFailed.WithLabelValues("audit").Add(float64(refused))
			a.logger.Warn("audit events refused by Postgres; the rest were written", "err", err, "refused", refused)
			lost := 0
			for _, e := range re.Errs {
				if e != nil && !store.IsDataError(e) {
					lost++
				}
			}
			if lost == 0 {
				continue
			}
			a.m.AuditDropped.Add(float64(lost))
			return
		}
		if err != nil {
			// Audit is best effort while Postgres is down.
			a.m.AuditDropped.Add(float64(len(batch)))
			if ctx.Err() == nil {
				a.logger.Warn("audit write failed; events dropped", "err", err, "events", len(batch))
			}
			return
		}
	}
}

// MessagesQueued records one sender's messages committed by one batch
// (delivery.Auditor) as one event: their ids, targets, priorities, sizes
// and recipient counts as parallel lists; the row's target is the
// messages' common target, if they have one.
func (a *Writer) MessagesQueued(mesh, sender string, at time.Time, msgs []delivery.QueuedMessage) {
	if len(msgs) == 0 {
		return
	}
	ids, targets, prios := make([]int64, len(msgs)), make([]string, len(msgs)), make([]string, len(msgs))
	sizes, recipients := make([]int, len(msgs)), make([]int, len(msgs))
	target := msgs[0].Target
	for i, m := range msgs {
		ids[i], targets[i], prios[i], sizes[i], recipients[i] = m.ID, m.Target, m.Priority, m.Size, m.Recipients
		if m.Target != target {
			target = ""
		}
	}
	a.Add(store.AuditEvent{MeshID: mesh, Type: store.EventMessageQueued, Actor: sender, Target: target, CreatedAt: at,
		Metadata: map[string]any{"message_ids": ids, "count": len(ids), "targets": targets, "priorities": prios,
			"sizes": sizes, "recipients": recipients}})
}

// MessagesDelivered records one recipient's rows marked delivered by one
// batch (delivery.Auditor).
func (a *Writer) MessagesDelivered(mesh, member string, ids []int64) {
	a.Add(store.AuditEvent{MeshID: mesh, Type: store.EventMessageDelivered, Actor: member,
		Metadata: map[string]any{"message_ids": ids, "count": len(ids)}})
}

// MessageExpired records a row that reached its TTL undelivered
// (delivery.Auditor).
func (a *Writer) MessageExpired(mesh, member string, id int64) {
	a.Add(store.AuditEvent{MeshID: mesh, Type: store.EventMessageExpired, Actor: member,
		Metadata: map[string]any{"message_id": id}})
}
