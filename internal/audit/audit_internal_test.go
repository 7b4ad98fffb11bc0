package audit

import (
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/metrics"
	"github.com/claudemesh/broker/internal/store"
)

// Large events cannot pile up below the event-count bound: the buffer is
// bounded in bytes too, every drop is counted, and room taken by a flush
// is room again.
func TestAuditBufferBoundedInBytes(t *testing.T) {
	met := metrics.New(prometheus.NewRegistry())
	a := New(nil, met, nil)
	ids := make([]int64, 4096) // a delivery event of a large batch
	const events = 1000
	for i := 0; i < events; i++ {
		a.Add(store.AuditEvent{Type: store.EventMessageDelivered, Actor: "m", Metadata: map[string]any{"message_ids": ids}})
	}
	queued := len(a.ch)
	if queued == 0 || queued >= events {
		t.Fatalf("%d of %d large events queued", queued, events)
	}
	if b := a.bytes.Load(); b > auditBufferBytes {
		t.Fatalf("%d bytes queued, bound %d", b, auditBufferBytes)
	}
	var m dto.Metric
	if err := met.AuditDropped.Write(&m); err != nil {
		t.Fatal(err)
	}
	if d := m.GetCounter().GetValue(); d != float64(events-queued) {
		t.Fatalf("broker_audit_dropped_total = %v, want %d", d, events-queued)
	}
	taken := a.take(10)
	if len(taken) != 10 {
		t.Fatalf("took %d", len(taken))
	}
	a.Add(store.AuditEvent{Type: store.EventPeerConnected})
	if len(a.ch) != queued-10+1 {
		t.Fatalf("no room after a flush took events: %d queued", len(a.ch))
	}
	for len(a.take(5000)) > 0 {
	}
	if b := a.bytes.Load(); b != 0 {
		t.Fatalf("%d bytes accounted for an empty buffer", b)
	}
}

// Fields of rejected hellos are stored as bounded, valid text whatever an
// unauthenticated client sent.
func TestClipText(t *testing.T) {
	for _, c := range []struct {
		in  string
		max int
	}{
		{strings.Repeat("a", 60000), 128}, {"a\x00b", 128}, {"bad\xff\xfe", 128},
		{strings.Repeat("é", 100), 127}, {"", 10}, {"short", 128},
	} {
		out := clipText(c.in, c.max)
		if len(out) > c.max || !utf8.ValidString(out) || strings.IndexByte(out, 0) >= 0 {
			t.Errorf("clipText(%.20q…, %d) = %.20q… (%d bytes)", c.in, c.max, out, len(out))
		}
		if len(c.in) <= c.max && utf8.ValidString(c.in) && strings.IndexByte(c.in, 0) < 0 && out != c.in {
			t.Errorf("clipText altered %q to %q", c.in, out)
		}
	}
}

// One sender's messages of one batch make one event that lists each of
// them; the row's target is theirs only when they share it.
func TestMessagesQueuedOneEventPerBatch(t *testing.T) {
	a := New(nil, metrics.New(prometheus.NewRegistry()), nil)
	at := time.Unix(1700000000, 0)
	a.MessagesQueued("mesh", "s", at, []delivery.QueuedMessage{
		{ID: 7, Target: "a", Priority: "now", Size: 10, Recipients: 1},
		{ID: 9, Target: "b", Priority: "next", Size: 20, Recipients: 2},
	})
	a.MessagesQueued("mesh", "s", at, []delivery.QueuedMessage{{ID: 11, Target: "a", Priority: "now", Size: 5, Recipients: 1}})
	a.MessagesQueued("mesh", "s", at, nil) // nothing: no event
	got := a.take(10)
	if len(got) != 2 {
		t.Fatalf("%d events, want 2", len(got))
	}
	e := got[0]
	if e.Type != store.EventMessageQueued || e.MeshID != "mesh" || e.Actor != "s" || e.Target != "" || !e.CreatedAt.Equal(at) {
		t.Errorf("event %+v", e)
	}
	want := map[string]any{"message_ids": []int64{7, 9}, "count": 2, "targets": []string{"a", "b"},
		"priorities": []string{"now", "next"}, "sizes": []int{10, 20}, "recipients": []int{1, 2}}
	if !reflect.DeepEqual(e.Metadata, want) {
		t.Errorf("metadata %v, want %v", e.Metadata, want)
	}
	if got[1].Target != "a" || !reflect.DeepEqual(got[1].Metadata["message_ids"], []int64{11}) {
		t.Errorf("single-message event %+v", got[1])
	}
}
