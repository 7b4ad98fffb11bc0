package wan

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// chunkSize bounds one chunk of a stream: what one read takes from a
// socket, and how a large write is split.
const chunkSize = 32 << 10

// DefaultMaxBuffer is how many bytes one direction of one stream may hold
// in flight. Like a TCP window it caps throughput at MaxBuffer/delay
// (1 MiB over 140 ms: 7 MiB/s per stream), far above what the scenarios
// move.
const DefaultMaxBuffer = 1 << 20

var errQueueClosed = errors.New("wan: stream closed")

// link is the state of a simulated network path: open, or cut. A cut
// blackholes: nothing is refused, data sent meanwhile waits and arrives one
// delay after the heal, as TCP's retransmissions would carry it (without
// their backoff).
type link struct {
	mu       sync.Mutex
	open     chan struct{} // closed while the link is open
	healedAt time.Time     // when it last became open
}

func newLink() *link {
	l := &link{open: make(chan struct{})}
	close(l.open)
	return l
}

func (l *link) cut() {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.open:
		l.open = make(chan struct{})
	default: // already cut
	}
}

func (l *link) heal() {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.open:
	default:
		l.healedAt = time.Now()
		close(l.open)
	}
}

func (l *link) state() (open <-chan struct{}, healedAt time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open, l.healedAt
}

func (l *link) isCut() bool {
	open, _ := l.state()
	select {
	case <-open:
		return false
	default:
		return true
	}
}

// Stats count what a proxy or transport did. Read them with Snapshot.
type Stats struct {
	conns          atomic.Int64
	refused        atomic.Int64
	peakBuffered   atomic.Int64
	stalls         atomic.Int64
	packetsDelayed atomic.Int64
	packetsDropped atomic.Int64
}

// StatsSnapshot is a copy of Stats.
type StatsSnapshot struct {
	Conns   int64 // connections accepted (proxy) or dialed (transport)
	Refused int64 // connections refused: MaxConns were open
	// PeakBuffered is the most bytes one direction of one stream held at
	// once; it never exceeds MaxBuffer.
	PeakBuffered int64
	// Stalls counts writes that waited because their direction held
	// MaxBuffer bytes (the sender was slowed, nothing was dropped).
	Stalls int64
	// PacketsDelayed and PacketsDropped count gossip packets; a packet is
	// dropped when its destination's queue holds MaxBuffer bytes.
	PacketsDelayed, PacketsDropped int64
}

// Snapshot reads the counters.
func (s *Stats) Snapshot() StatsSnapshot {
	return StatsSnapshot{
		Conns: s.conns.Load(), Refused: s.refused.Load(), PeakBuffered: s.peakBuffered.Load(),
		Stalls: s.stalls.Load(), PacketsDelayed: s.packetsDelayed.Load(), PacketsDropped: s.packetsDropped.Load(),
	}
}

func (s *Stats) notePeak(n int) {
	for {
		cur := s.peakBuffered.Load()
		if int64(n) <= cur || s.peakBuffered.CompareAndSwap(cur, int64(n)) {
			return
		}
	}
}

// chunk is a piece of one direction of a stream, or its end.
type chunk struct {
	b    []byte
	sent time.Time
	end  error // io.EOF: the sender closed; another error: the stream failed
}

// delayQueue carries one direction of a stream: a chunk put at t is taken
// no earlier than t+delay (and, while the link is cut, no earlier than one
// delay after the heal), in order. It holds at most max bytes; put waits for
// room, so a slow receiver slows the sender down, as TCP would.
type delayQueue struct {
	delay time.Duration
	link  *link
	max   int
	stats *Stats

	mu sync.Mutex
	q  []chunk
	// notBefore is when the sender could first send (the end of the TCP
	// handshake); guarded by mu.
	notBefore time.Time
	bytes     int
	closed    bool
	space     chan struct{} // poked when bytes shrink or a write deadline changes
	ready     chan struct{} // poked when a chunk arrives or a read deadline changes
	done      chan struct{} // closed by close
}

func newDelayQueue(delay time.Duration, l *link, max int, stats *Stats) *delayQueue {
	if max < chunkSize {
		max = chunkSize
	}
	return &delayQueue{delay: delay, link: l, max: max, stats: stats,
		space: make(chan struct{}, 1), ready: make(chan struct{}, 1), done: make(chan struct{})}
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// setNotBefore records when the handshake let the sender start.
func (q *delayQueue) setNotBefore(t time.Time) {
	q.mu.Lock()
	q.notBefore = t
	q.mu.Unlock()
	poke(q.ready)
}

// close wakes every waiter; later puts and takes fail.
func (q *delayQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.closed {
		q.closed = true
		close(q.done)
	}
}

// deadlineTimer returns a channel that fires at deadline (nil for none).
func deadlineTimer(deadline time.Time) (<-chan time.Time, func()) {
	if deadline.IsZero() {
		return nil, func() {}
	}
	t := time.NewTimer(time.Until(deadline))
	return t.C, func() { t.Stop() }
}

// put queues b (at most chunkSize bytes), or the stream's end when end is
// set. It waits for room until deadline() passes (zero: no deadline).
func (q *delayQueue) put(b []byte, end error, deadline func() time.Time) error {
	stalled := false
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return errQueueClosed
		}
		if end != nil || q.bytes+len(b) <= q.max {
			q.q = append(q.q, chunk{b: b, sent: time.Now(), end: end})
			q.bytes += len(b)
			if q.stats != nil {
				q.stats.notePeak(q.bytes)
			}
			q.mu.Unlock()
			poke(q.ready)
			return nil
		}
		q.mu.Unlock()
		if !stalled && q.stats != nil {
			q.stats.stalls.Add(1)
		}
		stalled = true
		var dl time.Time
		if deadline != nil {
			dl = deadline()
		}
		if !dl.IsZero() && !time.Now().Before(dl) {
			return os.ErrDeadlineExceeded
		}
		timeout, stop := deadlineTimer(dl)
		select {
		case <-q.space:
		case <-q.done:
		case <-timeout:
		}
		stop()
	}
}

// take returns the next chunk once it is due, waiting until deadline()
// passes (zero: no deadline).
func (q *delayQueue) take(deadline func() time.Time) (chunk, error) {
	for {
		var dl time.Time
		if deadline != nil {
			dl = deadline()
		}
		if !dl.IsZero() && !time.Now().Before(dl) {
			return chunk{}, os.ErrDeadlineExceeded
		}
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return chunk{}, errQueueClosed
		}
		var wait <-chan time.Time
		var stopWait func()
		if len(q.q) > 0 {
			c := q.q[0]
			sent := c.sent
			if q.notBefore.After(sent) {
				sent = q.notBefore
			}
			due := sent.Add(q.delay)
			open, healedAt := q.link.state()
			select {
			case <-open:
				// Whatever was in flight when the link was cut was lost
				// and is sent again after the heal.
				if healedAt.After(sent) && healedAt.Add(q.delay).After(due) {
					due = healedAt.Add(q.delay)
				}
				if !time.Now().Before(due) {
					q.q[0] = chunk{}
					q.q = q.q[1:]
					q.bytes -= len(c.b)
					q.mu.Unlock()
					poke(q.space)
					return c, nil
				}
				t := time.NewTimer(time.Until(due))
				wait, stopWait = t.C, func() { t.Stop() }
			default:
				// Cut: wait for the heal (ready is poked by nothing
				// then, the deadline and close still apply).
				q.mu.Unlock()
				timeout, stop := deadlineTimer(dl)
				select {
				case <-open:
				case <-q.done:
				case <-timeout:
				}
				stop()
				continue
			}
		}
		q.mu.Unlock()
		timeout, stop := deadlineTimer(dl)
		select {
		case <-wait:
		case <-q.ready:
		case <-q.done:
		case <-timeout:
		}
		stop()
		if stopWait != nil {
			stopWait()
		}
	}
}

// closeWrite half-closes c when it can (a TCP connection), else closes it.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}

// resetConn closes c so that its peer sees a reset rather than an orderly
// end.
func resetConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}
