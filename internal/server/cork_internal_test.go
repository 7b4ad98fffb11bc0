package server

import (
	"bytes"
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
	if err := c.uncork(time.Second); err != nil {
		t.Fatal(err)
	}
	if w := rc.got(); len(w) != 2 || string(w[1]) != "bcde" {
		t.Fatalf("writes after uncork: %q", w)
	}
	if err := c.uncork(time.Second); err != nil || len(rc.got()) != 2 {
		t.Fatalf("a second uncork: %v, %d writes", err, len(rc.got()))
	}
	c.cork()
	if err := c.uncork(time.Second); err != nil || len(rc.got()) != 2 {
		t.Fatalf("an empty batch wrote: %v, %d writes", err, len(rc.got()))
	}
}

// A peer that takes nothing: the uncork gives up at its timeout with
// errCorkTimeout (the session counts a slow consumer), and every write
// after it fails.
func TestCorkTimeoutIsASlowConsumer(t *testing.T) {
	a, b := net.Pipe() // b is never read
	defer a.Close()
	defer b.Close()
	c := &corkConn{Conn: a}
	c.cork()
	if _, err := c.Write(make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err := c.uncork(50 * time.Millisecond)
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
