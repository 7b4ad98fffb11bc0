package server

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/server/outbox"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testsignal"
)

// maxSendsInFlight bounds a session's sends awaiting their ack (a quarter
// of its queue when that is smaller).
const maxSendsInFlight = 256

// maxReplyRoom is the queue room kept for replies other than acks.
const maxReplyRoom = 16

// writeTimeout bounds the write of one corked batch (uncork); a peer that
// cannot take it in this long is a slow consumer.
const writeTimeout = 10 * time.Second

// frame is one queued outgoing WebSocket message.
type frame struct {
	data []byte
	push *pushMeta // set for envelope pushes
	slot bool      // the ack of a send: frees its send slot once written
	// written, when set, is closed once the frame is written or dropped
	// (the ack a same-node push waits for).
	written chan struct{}
	ackOf   int64 // the message an ack is of, for tests (TestSignals.Frame)
}

// FrameEvent is a push about to be written, or an ack just written, on a
// session (TestSignals.Frame): their Seq order is the order on the wire.
type FrameEvent struct {
	Conn      string
	Kind      string // "push" (before its write) or "ack" (after its write)
	MessageID int64
	Seq       int64
}

// TestSignals are the front's events a test may wait for (testsignal).
type TestSignals struct {
	Frame testsignal.Signal[FrameEvent]
}

var frameSeq atomic.Int64

func (ss *session) signalFrame(kind string, id int64) {
	if sig := &ss.s.TestSignals.Frame; sig.On() {
		sig.Signal(FrameEvent{Conn: ss.id, Kind: kind, MessageID: id, Seq: frameSeq.Add(1)})
	}
}

// pushMeta tracks a pushed envelope until it is marked delivered.
type pushMeta struct {
	key       delivery.Key
	committed time.Time
	priority  string
	// after: the push goes on the wire once the sender's ack is written,
	// or at afterBy if that ack is held up (a sender that stops reading
	// must not stall its recipients).
	after   <-chan struct{}
	afterBy time.Time
}

// ackWait bounds how long a push waits for its sender's ack to be written:
// an ack is written as soon as its session's writer runs, unless the
// sender's socket is full (a sender that stopped reading), which must not
// stall its recipients for longer.
const ackWait = 500 * time.Millisecond

// dropped releases what waits on a frame that will never be written.
func (f *frame) dropped() {
	if f.written != nil {
		close(f.written)
		f.written = nil
	}
}

// Len is the frame's size in the queue's byte budget.
func (f frame) Len() int { return len(f.data) }

// Dropped releases what waits on a frame the queue drops unwritten.
func (f frame) Dropped() { f.dropped() }

// session is one WebSocket connection. The read loop (serveWS's goroutine)
// owns frame handling; the write loop owns all writes to the socket.
type session struct {
	s      *Server
	conn   *websocket.Conn
	cc     *corkConn  // conn's connection, corked by the write loop
	evMu   sync.Mutex // orders system events after the hello_ack (register)
	id     string     // connection id; leases name it
	remote string     // client address (clientaddr), for logs and audit
	ctx    context.Context
	cancel context.CancelFunc

	addrKey string // what per-address limits count it by (clientaddr.Key)

	// What a hello claimed, before it is verified (reject audits it).
	// Guarded by mu: the hello timeout reads them from its own goroutine.
	claimedMesh, claimedPubkey string

	// Set by the hello before authed is stored; read-only afterwards.
	meshID, memberID, pubkey, displayName, presenceID, sessionID string
	clientAck, sysEvents                                         bool
	sendOnly                                                     bool // capability send_only: never handed a message
	authed                                                       atomic.Bool

	maxPrio  atomic.Int32 // least urgent priority its status accepts
	starved  atomic.Bool  // a claim was skipped because the queue was full
	lastPong atomic.Int64 // unix nanos
	nextPing atomic.Int64

	q       *outbox.Queue[frame]
	writing atomic.Bool   // a write loop is running (started on demand)
	done    chan struct{} // closed once the socket is closed
	torn    chan struct{} // closed once teardown has run (leases given back, audited)

	// helloDecided is set by the first of: the hello accepted (register),
	// the hello rejected, the hello timeout. The others then do nothing.
	helloDecided atomic.Bool

	sendLimit *rate.Limiter
	// peersLimit paces list_peers; nil until the first one (peers.go).
	// Owned by the read loop.
	peersLimit   *rate.Limiter
	membersLimit *rate.Limiter // list_members; made on first use (read loop only)
	statusLimit  *rate.Limiter // message_status; made on first use (read loop only, msgstatus.go)
	// sendSlots bounds sends accepted whose ack is not written yet: when
	// it is full the read loop stops reading, so TCP pushes back on the
	// client instead of work piling up in the broker.
	sendSlots chan struct{}
	// reserve is queue room envelope pushes leave free, for the acks of
	// the sends in flight and other replies: a burst of deliveries must
	// not leave a client that reads without room for its acks.
	reserve int

	mu          sync.Mutex
	inflight    map[int64]struct{} // leased to this connection, not yet marked delivered
	closing     bool
	closed      atomic.Bool // mirrors closing, for lock-free reads
	flushFirst  bool
	closeCode   websocket.StatusCode
	closeReason string
}

func (s *Server) newSession(conn *websocket.Conn, cc *corkConn, remote, addrKey string) *session {
	ctx, cancel := context.WithCancel(s.conns.Context())
	id := strings.ToLower(s.node) + "/" + store.NewID()
	slots := min(maxSendsInFlight, max(1, s.cfg.SendQueueLen/4))
	ss := &session{
		s: s, conn: conn, cc: cc, id: id, remote: remote, addrKey: addrKey, ctx: ctx, cancel: cancel,
		q:         outbox.New[frame](s.cfg.SendQueueLen, s.cfg.SendQueueBytes),
		done:      make(chan struct{}),
		torn:      make(chan struct{}),
		inflight:  map[int64]struct{}{},
		sendSlots: make(chan struct{}, slots),
		reserve:   slots + min(maxReplyRoom, s.cfg.SendQueueLen/4),
	}
	now := time.Now()
	ss.lastPong.Store(now.UnixNano())
	ss.nextPing.Store(now.Add(s.cfg.PingInterval).UnixNano())
	return ss
}

// log returns the session's logger. It is built per call, not kept: a
// session logs a few lines in its life, and an idle connection should not
// carry a logger of its own.
func (ss *session) log() *slog.Logger {
	if ss.authed.Load() {
		return ss.s.logger.With("conn", ss.id, "remote", ss.remote, "mesh_id", ss.meshID, "presence_id", ss.presenceID)
	}
	return ss.s.logger.With("conn", ss.id, "remote", ss.remote)
}

// ServeWS serves GET /ws: it upgrades the connection and runs its session.
func (s *Server) ServeWS(w http.ResponseWriter, r *http.Request) {
	if s.draining.Load() {
		http.Error(w, "node is shutting down", http.StatusServiceUnavailable)
		return
	}
	addr := s.clientAddr(r)
	key := addr.Key()
	if refused := s.perAddr.Admit(key); refused != "" {
		s.m.ConnectionsRejected.WithLabelValues(protocol.ReasonRateLimited).Inc()
		http.Error(w, refused, http.StatusTooManyRequests)
		return
	}
	var ss *session
	cw := &corkingWriter{ResponseWriter: w}
	conn, err := websocket.Accept(cw, r, &websocket.AcceptOptions{
		// Clients authenticate by signature, not cookies: any origin may connect.
		InsecureSkipVerify: true,
		OnPongReceived: func(context.Context, []byte) {
			if ss != nil {
				ss.lastPong.Store(time.Now().UnixNano())
			}
		},
	})
	if err != nil {
		s.perAddr.Release(key, false)
		return // Accept has written the HTTP error
	}
	conn.SetReadLimit(int64(s.cfg.MaxMessageBytes))
	s.m.ConnectionsTotal.Inc()
	ss = s.newSession(conn, cw.conn, addr.String(), key)
	s.mu.Lock()
	s.sessions[ss] = struct{}{}
	s.mu.Unlock()
	if s.draining.Load() {
		// Drain began during the upgrade and may have missed this
		// session: close it here.
		ss.closeAfterFlush(websocket.StatusGoingAway, "shutdown")
	}
	// The connection is hijacked: serve it on a goroutine of our own (that
	// Shutdown waits for) and let the HTTP handler (and its deep stack)
	// return.
	started := s.conns.Go(func(context.Context) {
		defer close(ss.torn)
		defer func() { s.perAddr.Release(key, ss.authed.Load()) }()
		// The first of the timeout and the hello decides (helloDecided).
		helloTimer := time.AfterFunc(s.cfg.HelloTimeout, func() { ss.reject(protocol.ReasonHelloTimeout, "") })
		ss.readLoop()
		helloTimer.Stop()
		ss.teardown()
	})
	if !started {
		// Shutting down between the check above and here.
		s.mu.Lock()
		delete(s.sessions, ss)
		s.mu.Unlock()
		s.perAddr.Release(key, false)
		close(ss.torn)
		_ = conn.Close(websocket.StatusGoingAway, "shutdown")
	}
}

// readLoop reads frames until the connection ends, handling each in order.
func (ss *session) readLoop() {
	for {
		typ, data, err := ss.conn.Read(ss.ctx)
		if err != nil {
			ss.noteReadError(err)
			return
		}
		if typ != websocket.MessageText {
			if !ss.authed.Load() {
				ss.reject(protocol.ReasonMalformed, "binary frame")
				return
			}
			ss.sendError(protocol.CodeMalformed, "frames must be text", "")
			continue
		}
		ss.handleFrame(data)
		if ss.isClosing() {
			return
		}
	}
}

func (ss *session) noteReadError(err error) {
	if errors.Is(err, websocket.ErrMessageTooBig) || strings.Contains(err.Error(), "read limited at") {
		ss.setClose(websocket.StatusMessageTooBig, "frame too large", false)
		ss.s.m.ClientCloses.WithLabelValues("too_large").Inc()
		return
	}
	ss.setClose(websocket.StatusNormalClosure, "", false)
}

func (ss *session) isClosing() bool { return ss.closed.Load() }

// setClose records why the session closes (first call wins) and wakes the
// write loop. With flush, frames already queued are written first.
func (ss *session) setClose(code websocket.StatusCode, reason string, flush bool) {
	ss.mu.Lock()
	if ss.closing {
		ss.mu.Unlock()
		return
	}
	ss.closing, ss.flushFirst, ss.closeCode, ss.closeReason = true, flush, code, reason
	ss.closed.Store(true)
	ss.mu.Unlock()
	ss.kickWriter()
}

// closeAfterFlush closes once queued frames are written.
func (ss *session) closeAfterFlush(code websocket.StatusCode, reason string) {
	ss.setClose(code, reason, true)
}

// closeNow closes without writing queued frames.
func (ss *session) closeNow(code websocket.StatusCode, reason string) {
	ss.setClose(code, reason, false)
	ss.cancel()
}

// claim records what a hello claims, before it is verified.
func (ss *session) claim(mesh, pubkey string) {
	ss.mu.Lock()
	ss.claimedMesh, ss.claimedPubkey = mesh, pubkey
	ss.mu.Unlock()
}

// reject answers a failed hello: an error frame, close 1008 with the
// reason, and the rejection counter. Only the first decision about a hello
// counts (helloDecided): a hello that timed out is not also rejected or
// accepted.
func (ss *session) reject(reason, detail string) {
	if !ss.helloDecided.CompareAndSwap(false, true) {
		return
	}
	ss.s.m.ConnectionsRejected.WithLabelValues(reason).Inc()
	msg := "hello rejected: " + reason
	ss.log().Info("ws hello rejected", "reason", reason, "detail", detail)
	code := websocket.StatusPolicyViolation
	switch reason {
	case protocol.ReasonUnavailable:
		code = websocket.StatusTryAgainLater
	case protocol.ReasonDraining:
		code = websocket.StatusGoingAway
	}
	ss.queue(protocol.ErrorFrame{Type: protocol.TypeError, Code: reason, Message: msg})
	ss.closeAfterFlush(code, reason)
	if reason == protocol.ReasonRateLimited {
		return // a flood: counted above, not written row by row
	}
	ss.mu.Lock()
	mesh, pubkey := ss.claimedMesh, ss.claimedPubkey
	ss.mu.Unlock()
	ss.s.audit.HelloRejected(mesh, pubkey, reason, detail, ss.remote)
}

// queue marshals v and queues it; a full queue closes the session as a
// slow consumer.
func (ss *session) queue(v any) bool {
	data, err := json.Marshal(v)
	if err != nil {
		ss.log().Error("marshal frame", "err", err)
		return false
	}
	return ss.queueRaw(frame{data: data})
}

func (ss *session) queueRaw(f frame) bool {
	if ss.q.Push(f) {
		ss.kickWriter()
		return true
	}
	ss.slow()
	return false
}

// deliveryRoom is how many more envelope pushes the queue takes now: none
// while the bytes pushes may use (all but config.ReplyReserveBytes) have
// no room left for a maximal one, so claims wait for the writer instead
// of claiming rows the queue would refuse.
func (ss *session) deliveryRoom() int {
	if ss.q.FreeBytes()-config.ReplyReserveBytes < ss.s.cfg.MaxMessageBytes {
		return 0
	}
	return ss.q.Free() - ss.reserve
}

// pushByteLimit is the queue bytes envelope pushes may fill.
func (ss *session) pushByteLimit() int { return ss.q.MaxBytes() - config.ReplyReserveBytes }

// The session as the delivery engine's Recipient. The reads are
// lock-free (the engine calls them under its lock); Reserve, Unreserve
// and Push take the session's.
var (
	_ delivery.Recipient = (*session)(nil)
	_ delivery.Sender    = (*session)(nil)
)

// ConnID is the connection id leases name.
func (ss *session) ConnID() string { return ss.id }

// MeshID is the session's mesh (set by the hello, read-only after).
func (ss *session) MeshID() string { return ss.meshID }

// MemberID is the session's member (set by the hello, read-only after).
func (ss *session) MemberID() string { return ss.memberID }

// SendOnly reports the send_only capability.
func (ss *session) SendOnly() bool { return ss.sendOnly }

// MaxPriority is the least urgent priority its status accepts now.
func (ss *session) MaxPriority() int { return int(ss.maxPrio.Load()) }

// Room is how many more envelope pushes the queue takes now.
func (ss *session) Room() int { return ss.deliveryRoom() }

// Closing reports whether the session is closing.
func (ss *session) Closing() bool { return ss.isClosing() }

// Starved notes that a claim was skipped for want of room: the writer
// kicks the engine once it has made some.
func (ss *session) Starved() { ss.starved.Store(true) }

// Reserve enters a row in the session's in-flight set.
func (ss *session) Reserve(messageID int64) delivery.Reservation {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closing || ss.inflight == nil {
		return delivery.Gone
	}
	if _, dup := ss.inflight[messageID]; dup {
		return delivery.AlreadyHeld
	}
	ss.inflight[messageID] = struct{}{}
	return delivery.Reserved
}

// Unreserve takes a row out of the in-flight set.
func (ss *session) Unreserve(messageID int64) {
	ss.mu.Lock()
	if ss.inflight != nil {
		delete(ss.inflight, messageID)
	}
	ss.mu.Unlock()
}

// Push queues a reserved row's push, within the room pushes may use.
func (ss *session) Push(p *delivery.Push) bool {
	data := p.Frame()
	meta := &pushMeta{key: p.Key(), committed: p.Committed, priority: protocol.PriorityName(int(p.Priority)), after: p.After}
	if p.After != nil {
		meta.afterBy = time.Now().Add(ackWait)
	}
	if !ss.q.PushUpTo(frame{data: data, push: meta}, ss.q.Max()-ss.reserve, ss.pushByteLimit()) {
		return false
	}
	ss.kickWriter()
	return true
}

// releaseSlot frees a send slot (its ack was written, or never will be).
func (ss *session) releaseSlot() {
	select {
	case <-ss.sendSlots:
	default:
	}
}

// kickWriter starts the write loop unless one is running. An idle session
// has no writer goroutine, which keeps idle connections cheap.
func (ss *session) kickWriter() {
	if !ss.writing.CompareAndSwap(false, true) || ss.s.conns.Go(func(context.Context) { ss.writeLoop() }) {
		return
	}
	// The server is stopping: nothing is written any more. A closing
	// session is still closed, here, by the caller holding the writer
	// mark, which it keeps: teardown waits for ss.done.
	if ss.isClosing() {
		ss.finishClose()
		return
	}
	ss.writing.Store(false)
	if ss.isClosing() && ss.writing.CompareAndSwap(false, true) {
		ss.finishClose() // a close that came in between found the mark held
	}
}

// slow closes a session whose queue refused a reply or event: it is over
// its frame or byte budget because its client does not read.
func (ss *session) slow() {
	if ss.isClosing() {
		return
	}
	ss.s.m.SlowConsumers.Inc()
	ss.log().Warn("slow consumer: closing", "queued_bytes", ss.q.MaxBytes()-ss.q.FreeBytes())
	ss.closeNow(websocket.StatusPolicyViolation, protocol.CloseReasonSlowConsumer)
}

func (ss *session) sendError(code, message, reqID string) {
	ss.queue(protocol.ErrorFrame{Type: protocol.TypeError, ReqID: reqID, Code: code, Message: message})
}

// writeLoop writes queued frames until the queue is empty, then exits; it
// owns every write to the socket while it runs, and performs the close.
func (ss *session) writeLoop() {
	var buf []frame
	var delivered []delivery.Key
	for {
		ss.mu.Lock()
		closing, flush := ss.closing, ss.flushFirst
		ss.mu.Unlock()
		if !closing || flush {
			buf = ss.q.Take(buf)
			if ss.starved.Swap(false) {
				ss.s.engine.Kick() // room again: claim what waits
			}
			delivered = delivered[:0]
			if err := ss.writeBatch(buf, &delivered); err != nil {
				ss.writeFailed(err)
				ss.finishClose()
				return
			}
			if len(delivered) > 0 {
				// Without client_ack a written push counts as delivery.
				ss.s.engine.Delivered(ss.meshID, delivered...)
				ss.mu.Lock()
				for _, k := range delivered {
					delete(ss.inflight, k.MessageID)
				}
				ss.mu.Unlock()
			}
		}
		if closing && (!flush || ss.q.Empty()) {
			ss.finishClose()
			return
		}
		if !ss.q.Empty() {
			continue
		}
		// Going idle. A producer that queued after the check above either
		// sees writing=false and starts a new loop, or we see its frame.
		ss.writing.Store(false)
		if (ss.q.Empty() && !ss.isClosing()) || !ss.writing.CompareAndSwap(false, true) {
			return
		}
	}
}

// waitAck holds a push until its sender's ack is on the wire, at most
// until the push's bound.
func (ss *session) waitAck(p *pushMeta) {
	select {
	case <-p.after:
		return
	default:
	}
	wait := time.Until(p.afterBy)
	if wait <= 0 {
		return
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-p.after:
	case <-t.C:
	case <-ss.ctx.Done():
	}
}

// writeBatch writes frames taken from the queue, corked: they reach the
// kernel together, at most corkFlushBytes at a time, and count as written
// (acks freeing their send slots and the pushes waiting on them, pushes
// counted as delivered without client_ack) only once they did. A push
// whose sender's ack is not written yet sends what came before it first,
// so that two sessions never wait on each other's corked acks. On error
// every frame not yet on the wire is dropped.
func (ss *session) writeBatch(buf []frame, delivered *[]delivery.Key) error {
	lo := 0 // buf[lo:i] is written to the cork, not yet to the kernel
	fail := func(err error) error {
		ss.cc.discard()
		for j := lo; j < len(buf); j++ {
			buf[j].dropped()
		}
		return err
	}
	ss.cc.cork()
	for i := range buf {
		if p := buf[i].push; p != nil {
			if p.after != nil && !isClosed(p.after) {
				if err := ss.uncork(buf[lo:i], delivered); err != nil {
					return fail(err)
				}
				lo = i
				ss.waitAck(p)
				ss.cc.cork()
			}
			ss.signalFrame("push", p.key.MessageID)
		}
		if err := ss.write(buf[i].data); err != nil {
			return fail(err)
		}
		if ss.cc.buffered() >= corkFlushBytes {
			if err := ss.uncork(buf[lo:i+1], delivered); err != nil {
				return fail(err)
			}
			lo = i + 1
			ss.cc.cork()
		}
	}
	if err := ss.uncork(buf[lo:], delivered); err != nil {
		return fail(err)
	}
	return nil
}

// uncork puts the corked frames on the wire and then counts them written.
func (ss *session) uncork(frames []frame, delivered *[]delivery.Key) error {
	if err := ss.cc.uncork(ss.ctx, writeTimeout); err != nil {
		return err
	}
	if len(frames) > 0 {
		ss.s.m.FramesPerWrite.Observe(float64(len(frames)))
	}
	for i := range frames {
		f := &frames[i]
		ss.q.Written(len(f.data))
		if f.slot {
			ss.signalFrame("ack", f.ackOf)
		}
		f.dropped() // written: what waits on it may go
		if f.slot {
			ss.releaseSlot()
		}
		if p := f.push; p != nil {
			ss.pushed(p)
			if !ss.clientAck {
				*delivered = append(*delivered, p.key)
			}
		}
		*f = frame{}
	}
	return nil
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// write hands a frame to coder/websocket. The write loop has the
// connection corked, so the frame reaches the socket only in uncork, which
// bounds it by writeTimeout; the session's end ends both.
func (ss *session) write(data []byte) error {
	return ss.conn.Write(ss.ctx, websocket.MessageText, data)
}

func (ss *session) writeFailed(err error) {
	if errors.Is(err, errCorkTimeout) {
		ss.s.m.SlowConsumers.Inc()
		// The stuck write may have ended the read loop first with a
		// reasonless close: the cause to report is still the slow
		// consumer.
		ss.mu.Lock()
		if !ss.closing || ss.closeReason == "" {
			ss.closing, ss.flushFirst = true, false
			ss.closed.Store(true)
			ss.closeCode, ss.closeReason = websocket.StatusPolicyViolation, protocol.CloseReasonSlowConsumer
		}
		ss.mu.Unlock()
	}
	ss.log().Debug("write failed", "err", err)
	ss.cancel()
}

// pushed records metrics for a written envelope.
func (ss *session) pushed(p *pushMeta) {
	ss.s.m.MessagesRouted.WithLabelValues(p.priority).Inc()
	if !p.committed.IsZero() {
		ss.s.m.CommitToPush.Observe(time.Since(p.committed).Seconds())
	}
}

// finishClose closes the socket; the session's writer stays marked busy so
// no other write loop starts.
func (ss *session) finishClose() {
	defer close(ss.done)
	defer ss.q.Drop()
	ss.mu.Lock()
	code, reason := ss.closeCode, ss.closeReason
	ss.mu.Unlock()
	if code == 0 {
		code = websocket.StatusNormalClosure
	}
	if reason != "" {
		ss.s.m.ClientCloses.WithLabelValues(reason).Inc()
	}
	_ = ss.conn.Close(code, reason)
	ss.cancel()
}

// teardown runs once the read loop has ended.
func (ss *session) teardown() {
	ss.setClose(websocket.StatusNormalClosure, "", true)
	<-ss.done
	s := ss.s
	s.mu.Lock()
	delete(s.sessions, ss)
	if ss.authed.Load() {
		if s.byPresence[ss.presenceID] == ss {
			delete(s.byPresence, ss.presenceID)
		}
		removeFromSet(s.byMesh, ss.meshID, ss)
		removeFromSet(s.listeners, ss.meshID, ss)
	}
	s.mu.Unlock()
	if !ss.authed.Load() {
		return
	}
	s.engine.Detach(ss)
	s.m.ConnectionsActive.Dec()
	entry, graced := s.replica.Disconnect(ss.presenceID, ss.id)
	_ = entry
	// Leased but undelivered envelopes go back to the queue at once, so
	// another session of the member can take them.
	ss.mu.Lock()
	keys := make([]delivery.Key, 0, len(ss.inflight))
	for id := range ss.inflight {
		keys = append(keys, delivery.Key{MessageID: id, MemberID: ss.memberID})
	}
	ss.inflight = nil
	ss.mu.Unlock()
	if len(keys) > 0 {
		s.engine.Release(ss.id, ss.meshID, ss.memberID, keys)
	}
	ss.mu.Lock()
	code, reason := ss.closeCode, ss.closeReason
	ss.mu.Unlock()
	// ss.log() names the mesh and the presence already.
	ss.log().Info("ws close", "member", ss.displayName, "code", int(code), "reason", reason, "grace", graced)
	s.audit.Add(store.AuditEvent{MeshID: ss.meshID, Type: store.EventPeerDisconnected, Actor: ss.memberID,
		Target: ss.presenceID, Metadata: map[string]any{"code": int(code), "reason": reason, "node": s.node}})
}
