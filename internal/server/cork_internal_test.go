package server

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
)

// recConn records each write it is given.
type recConn struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

func (r *recConn) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.writes = append(r.writes, bytes.Clone(p))
	return len(p), nil
}

func (r *recConn) SetWriteDeadline(time.Time) error { return nil }

func (r *recConn) got() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.writes
}

// Uncorked, every write goes through as it comes; corked, the writes
// collect and go out in one when uncorked, in order.
func TestCorkedWritesGoOutAsOne(t *testing.T) {
	rc := &recConn{}
	c := &corkConn{Conn: rc}
	if _, err := c.Write([]byte("a")); err != nil || len(rc.got()) != 1 {
		t.Fatalf("uncorked write: %v, %d writes", err, len(rc.got()))
	}
	c.cork()
	for _, s := range []string{"b", "cd", "e"} {
		if n, err := c.Write([]byte(s)); err != nil || n != len(s) {
			t.Fatalf("corked write: %d %v", n, err)
		}
	}
	if len(rc.got()) != 1 || c.buffered() != 4 {
		t.Fatalf("corked: %d writes reached the connection, %d bytes buffered", len(rc.got()), c.buffered())
	}
	if err := c.uncork(context.Background(), time.Second); err != nil {
		t.Fatal(err)
	}
	if w := rc.got(); len(w) != 2 || string(w[1]) != "bcde" {
		t.Fatalf("writes after uncork: %q", w)
	}
	if err := c.uncork(context.Background(), time.Second); err != nil || len(rc.got()) != 2 {
		t.Fatalf("a second uncork: %v, %d writes", err, len(rc.got()))
	}
	c.cork()
	if err := c.uncork(context.Background(), time.Second); err != nil || len(rc.got()) != 2 {
		t.Fatalf("an empty batch wrote: %v, %d writes", err, len(rc.got()))
	}
}

// stuckCork is a corked connection holding a frame for a peer that never
// reads.
func stuckCork(t *testing.T) *corkConn {
	a, b := net.Pipe() // b is never read
	t.Cleanup(func() { a.Close(); b.Close() })
	c := &corkConn{Conn: a}
	c.cork()
	if _, err := c.Write(make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	return c
}

// A peer that takes nothing: the uncork gives up at its timeout with
// errCorkTimeout (the session counts a slow consumer), and every write
// after it fails.
func TestCorkTimeoutIsASlowConsumer(t *testing.T) {
	c := stuckCork(t)
	start := time.Now()
	err := c.uncork(context.Background(), 50*time.Millisecond)
	if !errors.Is(err, errCorkTimeout) {
		t.Fatalf("uncork to a stuck peer: %v, want errCorkTimeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("uncork took %v", d)
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("a write after the failed uncork succeeded")
	}
}

// A session that closes while its batch is stuck on a peer that takes
// nothing does not wait out the write timeout: the write ends with the
// session's context, and nothing is written after it.
func TestUncorkEndsWithTheSession(t *testing.T) {
	c := stuckCork(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.uncork(ctx, time.Hour) }()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("uncork: %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("uncork outlived its session")
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("a write after the session ended succeeded")
	}
}

// Frames that failed before they reached the kernel are dropped, and the
// close frame that follows goes out at once.
func TestDiscardedCorkWritesThrough(t *testing.T) {
	rc := &recConn{}
	c := &corkConn{Conn: rc}
	c.cork()
	if _, err := c.Write([]byte("lost")); err != nil {
		t.Fatal(err)
	}
	c.discard()
	if _, err := c.Write([]byte("close")); err != nil {
		t.Fatal(err)
	}
	if w := rc.got(); len(w) != 1 || string(w[0]) != "close" {
		t.Fatalf("writes: %q", w)
	}
}
