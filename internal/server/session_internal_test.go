package server

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Frames written within half a writeTimeout share one context; after
// that a new one is made and the old one's timer released. Each frame
// gets at least half the timeout.
func TestWriteContextRenewedAtHalfTheTimeout(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	ss := &session{ctx: parent}
	a := ss.writeCtx()
	if b := ss.writeCtx(); b != a {
		t.Fatal("a second write within the window made a new context")
	}
	dl, ok := a.Deadline()
	if left := time.Until(dl); !ok || left <= writeTimeout/2 || left > writeTimeout {
		t.Fatalf("deadline %v away, want in (%v, %v]", left, writeTimeout/2, writeTimeout)
	}
	ss.wdeadline = time.Now().Add(writeTimeout/2 - time.Millisecond) // half the window gone
	c := ss.writeCtx()
	if c == a {
		t.Fatal("a context with less than half the timeout left was reused")
	}
	if !errors.Is(a.Err(), context.Canceled) {
		t.Fatalf("old context: %v, want canceled", a.Err())
	}
	cancel()
	if c.Err() == nil {
		t.Fatal("the session's end did not end the write context")
	}
}
