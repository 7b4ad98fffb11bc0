package outbox_test

import (
	"testing"

	"github.com/claudemesh/broker/internal/server/outbox"
)

type frame struct {
	n       int
	dropped *int
}

func (f frame) Len() int { return f.n }
func (f frame) Dropped() { *f.dropped++ }

// The queue is bounded in frames and in bytes; bytes taken by the writer
// count until written; a drop releases every frame left.
func TestQueueBounds(t *testing.T) {
	drops := 0
	q := outbox.New[frame](3, 100)
	f := func(n int) frame { return frame{n: n, dropped: &drops} }
	if !q.Push(f(60)) || q.Push(f(50)) || !q.Push(f(40)) {
		t.Fatal("byte bound not kept")
	}
	if q.Free() != 1 || q.FreeBytes() != 0 {
		t.Fatalf("free %d frames, %d bytes", q.Free(), q.FreeBytes())
	}
	if q.PushUpTo(f(0), 2, 100) {
		t.Fatal("a smaller frame limit was ignored")
	}
	buf := q.Take(nil)
	if len(buf) != 2 || !q.Empty() || q.FreeBytes() != 0 {
		t.Fatalf("took %d; bytes of taken frames must count until written (free %d)", len(buf), q.FreeBytes())
	}
	q.Written(60)
	if q.FreeBytes() != 60 {
		t.Fatalf("free bytes %d after a write", q.FreeBytes())
	}
	q.Push(f(1))
	q.Push(f(1))
	q.Drop()
	if drops != 2 || !q.Empty() || q.FreeBytes() != 100 {
		t.Fatalf("drop released %d frames, free bytes %d", drops, q.FreeBytes())
	}
}
