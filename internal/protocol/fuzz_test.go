package protocol_test

import (
	"encoding/json"
	"testing"

	"github.com/claudemesh/broker/internal/protocol"
)

var frameSeeds = []string{
	`{"type":"hello","meshId":"m","memberId":"u","pubkey":"` + hex64 + `","sessionId":"s","pid":1,"cwd":"/","timestamp":1764480000000,"signature":"` + hex64 + hex64 + `"}`,
	`{"type":"send","id":"1","targetSpec":"*","priority":"now","nonce":"n","ciphertext":"c"}`,
	`{"type":"send","targetSpec":"@ops","ciphertext":"c","client_message_id":"k"}`,
	`{"type":"client_ack","brokerMessageId":"12"}`,
	`{"type":"set_status","status":"dnd","_reqId":"r"}`,
	`{"type":"join_group","name":"backend"}`,
	`{"type":1}`, `[]`, `null`, `{"type":"hello","pid":"x"}`, `{"type":"hello","timestamp":1.5}`,
	"{\"type\":\"send\",\"targetSpec\":\"@\u00e9\",\"ciphertext\":\"\\ud800\"}",
}

const hex64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// Frame decoding never panics, and what it accepts satisfies the
// documented invariants.
func FuzzDecodeFrame(f *testing.F) {
	for _, s := range frameSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		env, err := protocol.DecodeEnvelope(data)
		if err != nil {
			return
		}
		if env.Type == "" || len(env.ReqID) > protocol.MaxIDLen {
			t.Fatalf("accepted envelope %+v", env)
		}
		switch env.Type {
		case protocol.TypeHello:
			h, err := protocol.DecodeHello(data)
			if err != nil {
				return
			}
			if h.MeshID == "" || h.MemberID == "" || h.SessionID == "" || len(h.Groups) > protocol.MaxGroups {
				t.Fatalf("accepted hello %+v", h)
			}
			if _, err := h.TimestampMillis(); err != nil {
				t.Fatalf("accepted hello with bad timestamp %q", h.Timestamp)
			}
		case protocol.TypeSend:
			s, err := protocol.DecodeSend(data)
			if err != nil {
				return
			}
			if kind, _ := protocol.ParseTarget(s.TargetSpec); kind == protocol.TargetInvalid {
				t.Fatalf("accepted target %q", s.TargetSpec)
			}
			if _, ok := protocol.PriorityRank(s.Priority); !ok || s.Ciphertext == "" {
				t.Fatalf("accepted send %+v", s)
			}
			// The accepted fields survive a round trip unchanged.
			b, _ := json.Marshal(s)
			s2, err := protocol.DecodeSend(b)
			if err != nil || *s2 != *s {
				t.Fatalf("round trip: %v %+v %+v", err, s, s2)
			}
		}
	})
}
