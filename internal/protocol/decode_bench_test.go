package protocol_test

import (
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/protocol"
)

// A send frame as meshbench writes one (256 plaintext bytes sealed).
var benchSend = []byte(`{"type":"send","_reqId":"r-123","id":"42","targetSpec":"` + hex64 + `","priority":"next","nonce":"` +
	strings.Repeat("n", 32) + `","ciphertext":"` + strings.Repeat("c", 364) + `","client_message_id":"cm-0123456789abcdef0123456789abcdef"}`)

// BenchmarkDecodeSendTwice is how a send was read before DecodeFrame: the
// envelope, then the send.
func BenchmarkDecodeSendTwice(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := protocol.DecodeEnvelope(benchSend); err != nil {
			b.Fatal(err)
		}
		if _, err := protocol.DecodeSend(benchSend); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeSendOnce is DecodeFrame and CheckSend.
func BenchmarkDecodeSendOnce(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		_, s, err := protocol.DecodeFrame(benchSend)
		if err != nil || s == nil {
			b.Fatal(err)
		}
		if _, err := protocol.CheckSend(s); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeClientAck is the envelope of a client_ack, read by
// DecodeFrame (a frame of another type than send costs one parse too).
func BenchmarkDecodeClientAck(b *testing.B) {
	ack := []byte(`{"type":"client_ack","brokerMessageId":"123456"}`)
	b.Run("DecodeEnvelope", func(b *testing.B) {
		for b.Loop() {
			_, _ = protocol.DecodeEnvelope(ack)
		}
	})
	b.Run("DecodeFrame", func(b *testing.B) {
		for b.Loop() {
			_, _, _ = protocol.DecodeFrame(ack)
		}
	})
}
