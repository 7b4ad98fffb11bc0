// Package outbox is a WebSocket session's bounded outgoing queue.
package outbox

import (
	"sync"
	"sync/atomic"
)

// Frame is what the queue holds.
type Frame interface {
	Len() int // its size in the byte budget
	Dropped() // the queue drops it unwritten (Drop)
}

// Queue is bounded in frames and in bytes. It grows on demand, so an idle
// session costs no buffer.
type Queue[F Frame] struct {
	mu    sync.Mutex
	items []F
	max   int
	// bytes counts the data of queued frames and of frames the writer has
	// taken but not yet written: what this session holds for its client.
	// A frame count alone would let 1,024 one-megabyte peers_lists pile up
	// behind a client that stopped reading.
	bytes    int
	maxBytes int
	// n and nbytes mirror len(items) and bytes for lock-free reads (the
	// delivery engine reads them under its own lock).
	n, nbytes atomic.Int64
}

// New makes a queue of at most max frames and maxBytes bytes.
func New[F Frame](max, maxBytes int) *Queue[F] { return &Queue[F]{max: max, maxBytes: maxBytes} }

// Max is the frame bound.
func (q *Queue[F]) Max() int { return q.max }

// MaxBytes is the byte bound.
func (q *Queue[F]) MaxBytes() int { return q.maxBytes }

// Push queues f within the queue's bounds.
func (q *Queue[F]) Push(f F) bool { return q.PushUpTo(f, q.max, q.maxBytes) }

// PushUpTo queues f unless the queue already holds limit frames or f would
// take it past byteLimit bytes.
func (q *Queue[F]) PushUpTo(f F, limit, byteLimit int) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) >= min(limit, q.max) || q.bytes+f.Len() > min(byteLimit, q.maxBytes) {
		return false
	}
	q.items = append(q.items, f)
	q.bytes += f.Len()
	q.n.Store(int64(len(q.items)))
	q.nbytes.Store(int64(q.bytes))
	return true
}

// Written returns the bytes of a frame the writer has finished with.
func (q *Queue[F]) Written(n int) {
	q.mu.Lock()
	q.bytes -= n
	q.nbytes.Store(int64(q.bytes))
	q.mu.Unlock()
}

// Free is how many frames fit now (lock-free).
func (q *Queue[F]) Free() int { return q.max - int(q.n.Load()) }

// FreeBytes is how many bytes fit now (lock-free).
func (q *Queue[F]) FreeBytes() int { return q.maxBytes - int(q.nbytes.Load()) }

// Take moves the queued frames into buf; their bytes count until Written.
func (q *Queue[F]) Take(buf []F) []F {
	q.mu.Lock()
	buf = append(buf[:0], q.items...)
	clear(q.items)
	q.items = q.items[:0]
	if cap(q.items) > 256 {
		q.items = nil // give a burst's memory back
	}
	q.n.Store(0)
	q.mu.Unlock()
	return buf
}

// Drop empties the queue of a closed session, releasing what waits on its
// frames.
func (q *Queue[F]) Drop() {
	q.mu.Lock()
	items := q.items
	q.items, q.bytes = nil, 0
	q.n.Store(0)
	q.nbytes.Store(0)
	q.mu.Unlock()
	for i := range items {
		items[i].Dropped()
	}
}

// Empty reports whether nothing is queued.
func (q *Queue[F]) Empty() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items) == 0
}
