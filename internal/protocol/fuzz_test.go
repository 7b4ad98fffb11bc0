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

// DecodeFrame, which parses a frame once, answers exactly what
// DecodeEnvelope and then DecodeSend answer.
func FuzzDecodeFrameOnce(f *testing.F) {
	for _, s := range frameSeeds {
		f.Add([]byte(s))
	}
	for _, s := range []string{
		`{"type":"send","priority":3,"targetSpec":"*","ciphertext":"c"}`,
		`{"type":"send","_reqId":5,"targetSpec":"*","ciphertext":"c"}`,
		`{"TYPE":"send","targetSpec":"*","ciphertext":"c","Type":"ping"}`,
		`{"type":"send","type":"client_ack","brokerMessageId":"1"}`,
		`{"type":"set_status","nonce":[1],"status":"idle"}`,
		`{"type":"send","_reqId":"` + hex64 + hex64 + hex64 + `","targetSpec":"*","ciphertext":"c"}`,
		`{"type":"send","id":"` + hex64 + hex64 + hex64 + `","targetSpec":"*","ciphertext":"c"}`,
		"{\"type\":\"send\u0000\"}", ` {"type":"ping"} `, `{"type":null,"_reqId":null}`, `{}`, `"send"`,
	} {
		f.Add([]byte(s))
	}
	errText := func(err error) string {
		if err == nil {
			return ""
		}
		return err.Error()
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		env, send, err := protocol.DecodeFrame(data)
		wantEnv, wantErr := protocol.DecodeEnvelope(data)
		if env != wantEnv || errText(err) != errText(wantErr) {
			t.Fatalf("DecodeFrame %+v, %v; DecodeEnvelope %+v, %v", env, err, wantEnv, wantErr)
		}
		if send == nil {
			return
		}
		if err != nil || env.Type != protocol.TypeSend {
			t.Fatalf("a send from a frame of type %q (err %v)", env.Type, err)
		}
		got, gotErr := protocol.CheckSend(send)
		want, wantSendErr := protocol.DecodeSend(data)
		if errText(gotErr) != errText(wantSendErr) || (got == nil) != (want == nil) || (got != nil && *got != *want) {
			t.Fatalf("CheckSend %+v, %v; DecodeSend %+v, %v", got, gotErr, want, wantSendErr)
		}
	})
}
