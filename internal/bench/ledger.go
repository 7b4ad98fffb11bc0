package bench

import (
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// ledger is the accounting of one timed phase: for every prepared message,
// when it was meant to be sent, when it was written, when its ack arrived,
// and for every (message, recipient) slot how many pushes arrived and when
// the first did. Slots are written with atomics, so the receivers of
// different connections never wait on each other; the ledger is safe for
// concurrent use.
//
// Times are nanoseconds after the ledger's epoch (its creation), never
// 0, so that 0 means "not yet".
type ledger struct {
	w     *workload
	epoch time.Time
	phase int64 // when the timed phase began; set by begin before any send

	sent   []atomic.Int64 // when the send frame was handed to the socket
	acked  []atomic.Int64 // when the ack arrived; negative for a rejection
	pushes []atomic.Int32 // per slot: pushes received
	pushAt []atomic.Int64 // per slot: first push

	remaining atomic.Int64 // acks and first pushes still expected
	done      chan struct{}
	doneOnce  sync.Once

	sentCount, unsent, ackedOK, delivered, duplicates atomic.Int64
	unknown, misrouted, corrupted, strayAcks          atomic.Int64
	lastPush                                          atomic.Int64

	mu          sync.Mutex
	rejected    map[string]int64 // ack error code → sends
	errorFrames map[string]int64 // error frame code → frames
	disconnects map[string]int64 // close reason → connections lost mid-run
	dupAfter    []time.Duration  // per duplicate: time since the slot's first push
}

func newLedger(w *workload) *ledger {
	msgs := w.messages()
	slots := msgs
	if w.broadcast {
		slots = msgs * w.peers
	}
	l := &ledger{
		w:           w,
		epoch:       time.Now(),
		sent:        make([]atomic.Int64, msgs),
		acked:       make([]atomic.Int64, msgs),
		pushes:      make([]atomic.Int32, slots),
		pushAt:      make([]atomic.Int64, slots),
		done:        make(chan struct{}),
		rejected:    map[string]int64{},
		errorFrames: map[string]int64{},
		disconnects: map[string]int64{},
	}
	l.remaining.Store(int64(msgs) * int64(1+w.fanout()))
	if msgs == 0 {
		close(l.done)
	}
	return l
}

// begin marks the start of the timed phase. It must be called before the
// senders start; scheduled sends are timed from here.
func (l *ledger) begin() { l.phase = l.now() }

// now is the current time on the ledger's clock (always ≥ 1).
func (l *ledger) now() int64 { return max(int64(time.Since(l.epoch)), 1) }

// intendedAt is when scheduled message i is due, on the ledger's clock.
func (l *ledger) intendedAt(i int32) int64 { return l.phase + l.w.intended[i] }

// Done is closed when every expected ack and push has arrived, or can no
// longer arrive (rejected or unsent messages).
func (l *ledger) Done() <-chan struct{} { return l.done }

func (l *ledger) settle(n int64) {
	if l.remaining.Add(-n) == 0 {
		l.doneOnce.Do(func() { close(l.done) })
	}
}

// markSent records that message i is being written now.
func (l *ledger) markSent(i int32, at int64) {
	l.sent[i].Store(at)
	l.sentCount.Add(1)
}

// markUnsent records that message i will not be sent (its connection
// failed or the run was interrupted): nothing more is expected for it.
func (l *ledger) markUnsent(i int32) {
	l.unsent.Add(1)
	l.settle(int64(1 + l.w.fanout()))
}

// ack records the broker's answer to the send with correlation id.
func (l *ledger) ack(id string, at int64, queued bool, code string) {
	i, err := strconv.ParseInt(id, 10, 32)
	if err != nil || i < 0 || int(i) >= len(l.acked) {
		l.strayAcks.Add(1)
		return
	}
	v := at
	if !queued {
		v = -at
	}
	if !l.acked[i].CompareAndSwap(0, v) {
		l.strayAcks.Add(1) // a second ack for one send
		return
	}
	if queued {
		l.ackedOK.Add(1)
		l.settle(1)
		return
	}
	if code == "" {
		code = "unknown"
	}
	l.mu.Lock()
	l.rejected[code]++
	l.mu.Unlock()
	l.settle(int64(1 + l.w.fanout()))
}

// pushOutcome classifies a received push.
type pushOutcome int

const (
	pushFirst     pushOutcome = iota // first delivery of the slot
	pushDuplicate                    // a further delivery of a delivered slot
	pushUnknown                      // not an envelope of this run
	pushMisrouted                    // an envelope of this run, for someone else
	pushCorrupted                    // the nonce matches but the ciphertext differs
)

// push records an envelope received by peer recipient. The envelope is
// identified by its nonce (24 random bytes, unique to one prepared
// message) and must carry the prepared ciphertext byte for byte.
func (l *ledger) push(recipient int, nonce, ciphertext string, at int64) pushOutcome {
	i, ok := l.w.byNonce[nonce]
	switch {
	case !ok:
		l.unknown.Add(1)
		return pushUnknown
	case l.w.ciphertext[i] != ciphertext:
		l.corrupted.Add(1)
		return pushCorrupted
	}
	slot, ok := l.w.slot(i, recipient)
	if !ok {
		l.misrouted.Add(1)
		return pushMisrouted
	}
	if l.pushes[slot].Add(1) > 1 {
		// A slot's pushes all reach one reader, in order: the first push's
		// time is already stored.
		l.duplicates.Add(1)
		l.mu.Lock()
		l.dupAfter = append(l.dupAfter, time.Duration(at-l.pushAt[slot].Load()))
		l.mu.Unlock()
		return pushDuplicate
	}
	l.pushAt[slot].Store(at)
	l.delivered.Add(1)
	for {
		last := l.lastPush.Load()
		if at <= last || l.lastPush.CompareAndSwap(last, at) {
			break
		}
	}
	l.settle(1)
	return pushFirst
}

// errorFrame counts an error frame by code.
func (l *ledger) errorFrame(code string) {
	l.mu.Lock()
	l.errorFrames[code]++
	l.mu.Unlock()
}

// disconnected counts a connection the broker closed during the run.
func (l *ledger) disconnected(reason string) {
	l.mu.Lock()
	l.disconnects[reason]++
	l.mu.Unlock()
}

// Delivery is the exactly-once accounting of a messaging run.
type Delivery struct {
	Messages     int64            `json:"messages"`               // prepared sends
	Sent         int64            `json:"sent"`                   // written to a socket
	Unsent       int64            `json:"unsent"`                 // never written (connection lost, interrupted)
	Acked        int64            `json:"acked"`                  // answered queued:true
	Rejected     map[string]int64 `json:"rejected"`               // answered queued:false, by error code
	NotAcked     int64            `json:"notAcked"`               // written but never answered
	Expected     int64            `json:"expected"`               // (message, recipient) pairs
	Delivered    int64            `json:"delivered"`              // distinct pairs received
	DeliveredPct float64          `json:"deliveredPct"`           // Delivered / Expected × 100
	Duplicates   int64            `json:"duplicates"`             // pushes beyond the first per pair
	Missing      int64            `json:"missing"`                // Expected − Delivered
	Unknown      int64            `json:"unknown"`                // pushes of no envelope of this run
	Misrouted    int64            `json:"misrouted"`              // envelopes pushed to a peer they were not for
	Corrupted    int64            `json:"corrupted"`              // envelopes whose ciphertext changed on the way
	StrayAcks    int64            `json:"strayAcks"`              // acks for no send, or a second ack
	ErrorFrames  map[string]int64 `json:"errorFrames,omitempty"`  // error frames received, by code
	Disconnects  map[string]int64 `json:"disconnects,omitempty"`  // connections lost mid-run, by reason
	CrossNodePct float64          `json:"crossNodePct,omitempty"` // direct messages whose two peers were on different nodes
}

// delivery summarises the counters.
func (l *ledger) delivery() Delivery {
	l.mu.Lock()
	defer l.mu.Unlock()
	msgs := int64(l.w.messages())
	d := Delivery{
		Messages:    msgs,
		Sent:        l.sentCount.Load(),
		Unsent:      l.unsent.Load(),
		Acked:       l.ackedOK.Load(),
		Rejected:    maps.Clone(l.rejected),
		Expected:    msgs * int64(l.w.fanout()),
		Delivered:   l.delivered.Load(),
		Duplicates:  l.duplicates.Load(),
		Unknown:     l.unknown.Load(),
		Misrouted:   l.misrouted.Load(),
		Corrupted:   l.corrupted.Load(),
		StrayAcks:   l.strayAcks.Load(),
		ErrorFrames: maps.Clone(l.errorFrames),
		Disconnects: maps.Clone(l.disconnects),
	}
	var rejected int64
	for _, n := range d.Rejected {
		rejected += n
	}
	d.NotAcked = d.Sent - d.Acked - rejected
	d.Missing = d.Expected - d.Delivered
	if d.Expected > 0 {
		d.DeliveredPct = float64(d.Delivered) / float64(d.Expected) * 100
	}
	return d
}

// latencies are the raw samples of a run, in nanoseconds.
type latencies struct {
	sendToAck  []time.Duration
	sendToPush []time.Duration
	sameNode   []time.Duration // sendToPush where sender and recipient share a node
	crossNode  []time.Duration // sendToPush across nodes
	sendLag    []time.Duration // actual − intended write time (scheduled runs)
	hello      []time.Duration // conns: dial + hello → hello_ack
	dupAfter   []time.Duration // per duplicate push: time since the first push
	firstSend  int64
	lastPush   int64
}

// latencies collects the samples. In a scheduled (open-loop) run every
// latency is measured from the message's intended send time, so a broker
// that stalls the generator's writes cannot hide its delay (no coordinated
// omission). With nodes > 1, send→push is also split by whether peer p
// (on node p mod nodes) sent to a peer on its own node or another.
func (l *ledger) latencies(nodes int) latencies {
	var out latencies
	from := func(i int) int64 {
		if l.w.scheduled {
			return l.intendedAt(int32(i))
		}
		return l.sent[i].Load()
	}
	out.firstSend = -1
	for i := range l.sent {
		s := l.sent[i].Load()
		if s == 0 {
			continue
		}
		if out.firstSend < 0 || s < out.firstSend {
			out.firstSend = s
		}
		base := from(i)
		if l.w.scheduled {
			out.sendLag = append(out.sendLag, time.Duration(s-base))
		}
		if a := l.acked[i].Load(); a > 0 {
			out.sendToAck = append(out.sendToAck, time.Duration(a-base))
		}
	}
	for slot := range l.pushAt {
		at := l.pushAt[slot].Load()
		if at == 0 {
			continue
		}
		i, recipient := slot, 0
		if l.w.broadcast {
			i, recipient = slot/l.w.peers, slot%l.w.peers
		} else {
			recipient = int(l.w.target[i])
		}
		d := time.Duration(at - from(i))
		out.sendToPush = append(out.sendToPush, d)
		if nodes > 1 {
			if int(l.w.sender[i])%nodes == recipient%nodes {
				out.sameNode = append(out.sameNode, d)
			} else {
				out.crossNode = append(out.crossNode, d)
			}
		}
	}
	out.lastPush = l.lastPush.Load()
	l.mu.Lock()
	out.dupAfter = slices.Clone(l.dupAfter)
	l.mu.Unlock()
	return out
}
