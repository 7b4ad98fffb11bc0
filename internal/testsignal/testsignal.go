// Package testsignal lets a test wait for an event inside a worker (a
// claim round done, a batch committed, the relay listening) instead of
// polling a metric. A Signal costs one atomic load until a test calls
// Init; production code never does. (river's internal/testsignal has the
// same idea.)
package testsignal

import (
	"sync/atomic"
	"time"
)

// bufferSize bounds what a Signal keeps for a test that does not read:
// past it the oldest value is dropped, so a long test sees recent events.
const bufferSize = 1024

// Signal carries values of one event to a test. The zero value is off.
type Signal[T any] struct {
	ch atomic.Pointer[chan T]
}

// Init turns the signal on; values signalled from then on are kept.
func (s *Signal[T]) Init() {
	c := make(chan T, bufferSize)
	s.ch.Store(&c)
}

// Signal records v if a test asked for the signal; it never blocks.
func (s *Signal[T]) Signal(v T) {
	p := s.ch.Load()
	if p == nil {
		return
	}
	for range 4 {
		select {
		case *p <- v:
			return
		default:
		}
		select {
		case <-*p: // drop the oldest
		default:
		}
	}
}

// On reports whether a test asked for the signal (to skip preparing a
// value nobody reads).
func (s *Signal[T]) On() bool { return s.ch.Load() != nil }

// C is the channel of values (nil before Init).
func (s *Signal[T]) C() <-chan T {
	if p := s.ch.Load(); p != nil {
		return *p
	}
	return nil
}

// Clear drops the values kept so far.
func (s *Signal[T]) Clear() {
	c := s.C()
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

// WaitFor returns the first value (kept or yet to come) for which match
// holds, or false once timeout has passed.
func (s *Signal[T]) WaitFor(timeout time.Duration, match func(T) bool) (T, bool) {
	var zero T
	c := s.C()
	if c == nil {
		return zero, false
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		select {
		case v := <-c:
			if match == nil || match(v) {
				return v, true
			}
		case <-deadline.C:
			return zero, false
		}
	}
}

// Wait returns the next value, or false once timeout has passed.
func (s *Signal[T]) Wait(timeout time.Duration) (T, bool) { return s.WaitFor(timeout, nil) }
