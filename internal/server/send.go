package server

import (
	"encoding/json"
	"strconv"

	"golang.org/x/time/rate"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/protocol"
)

// handleSend validates a send, resolves its recipients and hands it to the
// committer. The ack is written after the commit. decoded is the frame
// as DecodeFrame read it, when it did.
func (ss *session) handleSend(data []byte, reqID string, decoded *protocol.Send) {
	s := ss.s
	var m *protocol.Send
	var err error
	if decoded != nil {
		m, err = protocol.CheckSend(decoded)
	} else {
		m, err = protocol.DecodeSend(data)
	}
	if err != nil {
		id := ""
		if m != nil {
			id = m.ID
		}
		ss.rejectSend(reqID, id, protocol.CodeMalformed)
		return
	}
	if ss.sendLimit == nil && s.cfg.SendRatePerSec > 0 {
		// Made on the first send (by the read loop, the only user):
		// sessions that never send carry none.
		ss.sendLimit = rate.NewLimiter(rate.Limit(s.cfg.SendRatePerSec), int(2*s.cfg.SendRatePerSec)+1)
	}
	if ss.sendLimit != nil && !ss.sendLimit.Allow() {
		ss.rejectSend(reqID, m.ID, protocol.CodeRateLimited)
		return
	}
	if len(m.Ciphertext)+len(m.Nonce) > s.maxEnvelope() {
		ss.rejectSend(reqID, m.ID, protocol.CodeTooLarge)
		return
	}
	rank, _ := protocol.PriorityRank(m.Priority)
	// The cache bounds a lookup that reaches Postgres; a send answered
	// from it (nearly all) makes no timer.
	recipients, code := s.members.Targets(ss.ctx, ss.meshID, ss.memberID, m.TargetSpec, s.replica.GroupMembers)
	if code != "" {
		ss.rejectSend(reqID, m.ID, code)
		return
	}
	send := &delivery.Send{
		From: ss, ReqID: reqID, ID: m.ID,
		Message: delivery.NewMessage{
			MeshID: ss.meshID, SenderMemberID: ss.memberID, SenderPubkey: ss.pubkey, SenderName: ss.displayName,
			TargetSpec: m.TargetSpec, Priority: int16(rank), Nonce: m.Nonce, Ciphertext: m.Ciphertext,
			ClientMessageID: m.ClientMessageID,
		},
	}
	send.Message.Recipients = make([]delivery.NewRecipient, len(recipients))
	for i, r := range recipients {
		send.Message.Recipients[i].MemberID = r
	}
	select {
	case ss.sendSlots <- struct{}{}: // released when the ack is written
	case <-ss.ctx.Done():
		return
	}
	s.engine.Submit(send)
}

// Answer queues a send's ack, which frees the send's slot once written
// (delivery.Sender). The channel is closed once the ack is written, or
// once it never will be.
func (ss *session) Answer(ack protocol.Ack) <-chan struct{} {
	written := make(chan struct{})
	data, err := json.Marshal(ack)
	f := frame{data: data, slot: true, written: written}
	if ss.s.TestSignals.Frame.On() {
		f.ackOf, _ = strconv.ParseInt(ack.MessageID, 10, 64)
	}
	if err != nil || !ss.queueRaw(f) {
		ss.releaseSlot()
		close(written)
	}
	return written
}

// Done is closed when the session ends (delivery.Sender).
func (ss *session) Done() <-chan struct{} { return ss.ctx.Done() }

// pushOverhead is room left in a frame for the push's other fields.
const pushOverhead = 1024

// maxEnvelope bounds nonce plus ciphertext so that the push carrying them
// still fits in MAX_MESSAGE_BYTES.
func (s *Server) maxEnvelope() int { return s.cfg.MaxMessageBytes - pushOverhead }

func (ss *session) rejectSend(reqID, id, code string) {
	ss.s.m.MessagesRejected.WithLabelValues(code).Inc()
	ss.queue(protocol.Ack{Type: protocol.TypeAck, ReqID: reqID, ID: id, MessageID: "", Queued: false, Error: code})
}
