package protocol_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/protocol"
)

func TestAppendPushMatchesEncodingJSON(t *testing.T) {
	p := protocol.PushFields{MessageID: 42, MeshID: "m", SenderPubkey: "ab", Priority: "now", Nonce: "n\"\\\n",
		Ciphertext: "c\x01\u2028é", CreatedAt: time.UnixMilli(1764480000123), SenderMemberID: "s", SenderName: "Ünïcode <b>",
		TargetSpec: "*", ClientMessageID: "k"}
	got := protocol.AppendPush(nil, &p)
	var back protocol.Push
	if err := json.Unmarshal(got, &back); err != nil {
		t.Fatalf("invalid JSON %s: %v", got, err)
	}
	want := protocol.Push{Type: "push", MessageID: "42", MeshID: "m", SenderPubkey: "ab", Priority: "now", Nonce: p.Nonce,
		Ciphertext: p.Ciphertext, CreatedAt: "2025-11-30T05:20:00.123Z", SenderMemberID: "s", SenderName: p.SenderName,
		TargetSpec: "*", ClientMessageID: "k"}
	if back.MessageID != want.MessageID || back.Nonce != want.Nonce || back.Ciphertext != want.Ciphertext ||
		back.CreatedAt != want.CreatedAt || back.SenderName != want.SenderName || back.Type != "push" || back.ClientMessageID != "k" {
		t.Fatalf("round trip:\n got %+v\nwant %+v", back, want)
	}
}

// Any string survives AppendString → json.Unmarshal as encoding/json
// would carry it (invalid UTF-8 becomes U+FFFD in both).
func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "plain", "\"\\/", "\x00\x1f\x7f", "\xff\xfe", "\u2028\u2029", "é漢字🙂", "a\xc3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		enc := protocol.AppendString(nil, s)
		var got string
		if err := json.Unmarshal(enc, &got); err != nil {
			t.Fatalf("invalid JSON %q for %q: %v", enc, s, err)
		}
		ref, _ := json.Marshal(s)
		var want string
		_ = json.Unmarshal(ref, &want)
		if got != want {
			t.Fatalf("AppendString(%q) decodes to %q, encoding/json gives %q", s, got, want)
		}
	})
}

func BenchmarkAppendPush(b *testing.B) {
	p := protocol.PushFields{MessageID: 123456, MeshID: "01m8nfsvexng49hq2b03jj9eje", SenderPubkey: "10dfbab38782ed2f968de0aa11272957bd7c6d6eb26b01c5df67ec9db352b57b",
		Priority: "next", Nonce: "ZmFrZS1ub25jZS1hYWFhYWFhYWFhYWFh", Ciphertext: strings.Repeat("QUFB", 90), CreatedAt: time.Now(),
		SenderMemberID: "01m8nfsvf3ch5m66t2zpzbhxdb", SenderName: "alice", TargetSpec: "10dfbab38782ed2f968de0aa11272957bd7c6d6eb26b01c5df67ec9db352b57b"}
	buf := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		buf = protocol.AppendPush(buf[:0], &p)
	}
}

func BenchmarkMarshalPush(b *testing.B) {
	p := protocol.Push{Type: "push", MessageID: "123456", MeshID: "01m8nfsvexng49hq2b03jj9eje", SenderPubkey: "10dfbab38782ed2f968de0aa11272957bd7c6d6eb26b01c5df67ec9db352b57b",
		Priority: "next", Nonce: "ZmFrZS1ub25jZS1hYWFhYWFhYWFhYWFh", Ciphertext: strings.Repeat("QUFB", 90), CreatedAt: "2026-11-30T05:20:00.123Z",
		SenderMemberID: "01m8nfsvf3ch5m66t2zpzbhxdb", SenderName: "alice", TargetSpec: "10dfbab38782ed2f968de0aa11272957bd7c6d6eb26b01c5df67ec9db352b57b"}
	b.ReportAllocs()
	for b.Loop() {
		_, _ = json.Marshal(p)
	}
}
