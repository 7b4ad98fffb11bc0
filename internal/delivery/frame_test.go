package delivery_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/protocol"
)

// A row's push frame carries the row's message as a v0.1 push.
func TestDeliveryFrame(t *testing.T) {
	created := time.UnixMilli(1_700_000_000_123).UTC()
	d := delivery.Delivery{MessageID: 77, MemberID: "rcpt", MeshID: "mesh", SenderMemberID: "snd", SenderPubkey: "ab12",
		SenderName: `A "quoted" <name>`, TargetSpec: "*", Priority: 2, Nonce: "bm9uY2U=", Ciphertext: "Y2lwaGVy",
		ClientMessageID: "c-1", CreatedAt: created}
	var p protocol.Push
	if err := json.Unmarshal(d.Frame(), &p); err != nil {
		t.Fatalf("frame is not JSON: %v\n%s", err, d.Frame())
	}
	want := protocol.Push{Type: protocol.TypePush, MessageID: "77", MeshID: "mesh", SenderPubkey: "ab12",
		Priority: protocol.PriorityLow, Nonce: "bm9uY2U=", Ciphertext: "Y2lwaGVy", CreatedAt: protocol.FormatTime(created),
		SenderMemberID: "snd", SenderName: `A "quoted" <name>`, TargetSpec: "*", ClientMessageID: "c-1"}
	if p.Type != want.Type || p.MessageID != want.MessageID || p.MeshID != want.MeshID || p.SenderPubkey != want.SenderPubkey ||
		p.Priority != want.Priority || p.Nonce != want.Nonce || p.Ciphertext != want.Ciphertext || p.CreatedAt != want.CreatedAt ||
		p.SenderMemberID != want.SenderMemberID || p.SenderName != want.SenderName || p.TargetSpec != want.TargetSpec ||
		p.ClientMessageID != want.ClientMessageID || p.Subtype != "" {
		t.Fatalf("push %+v, want %+v", p, want)
	}
}
