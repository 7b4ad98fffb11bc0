package server_test

import (
	"context"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// A client that speaks only the seed's v0.1 frames (hello, send, set_status;
// no capabilities) works end to end, pipelining a send right after its hello.
func TestV01Client(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	a, b := mesh.Members[0], mesh.Members[1]

	recv := testkit.Connect(t, n.URL(), b, client.HelloOptions{SessionID: "peer-b-session", Cwd: "/tmp/peer-b"})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	send, err := client.Dial(ctx, n.URL(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer send.CloseNow()
	hello := client.NewHello(a, client.HelloOptions{SessionID: "peer-a-session", Cwd: "/tmp/peer-a"})
	if err := send.WriteJSON(ctx, hello); err != nil {
		t.Fatal(err)
	}
	// The original smoke test sends without waiting for hello_ack.
	if err := send.WriteRaw(ctx, []byte(`{"type":"send","targetSpec":"`+b.Pubkey()+`","priority":"now","nonce":"fake-nonce-aaa","ciphertext":"aGVsbG8="}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := send.WaitHelloAck(ctx); err != nil {
		t.Fatal(err)
	}
	var ack protocol.Ack
	if err := testkit.Expect(t, send, protocol.TypeAck, 5*time.Second).Decode(&ack); err != nil {
		t.Fatal(err)
	}
	if !ack.Queued || ack.MessageID == "" || ack.Error != "" {
		t.Fatalf("ack = %+v", ack)
	}
	f := testkit.Expect(t, recv, protocol.TypePush, 5*time.Second)
	var p protocol.Push
	if err := f.Decode(&p); err != nil {
		t.Fatal(err)
	}
	if p.SenderPubkey != a.Pubkey() || p.Nonce != "fake-nonce-aaa" || p.Ciphertext != "aGVsbG8=" || p.MessageID != ack.MessageID {
		t.Fatalf("push = %+v", p)
	}
	// The receiver must not get anything it did not ask for (no system events).
	var raw map[string]any
	_ = json.Unmarshal(f.Raw, &raw)
	if raw["subtype"] != nil {
		t.Fatalf("v0.1 client got a system frame: %s", f.Raw)
	}
	if err := send.WriteRaw(ctx, []byte(`{"type":"set_status","status":"working"}`)); err != nil {
		t.Fatal(err)
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
