package server_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// expectRejection reads the error frame and the close of a rejected hello.
func expectRejection(t *testing.T, c *client.Conn, reason string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	f, err := c.Next(ctx)
	if err != nil {
		t.Fatalf("want error frame %q, got %v", reason, err)
	}
	var e protocol.ErrorFrame
	if err := f.Decode(&e); err != nil || e.Type != protocol.TypeError || e.Code != reason || e.Message != "hello rejected: "+reason {
		t.Fatalf("want error frame for %q, got %s", reason, f.Raw)
	}
	_, err = c.Next(ctx)
	var ce *client.CloseError
	if !errors.As(err, &ce) {
		t.Fatalf("want close after %q, got %v", reason, err)
	}
	if ce.Code != 1008 || ce.Reason != reason {
		t.Fatalf("close = %d %q, want 1008 %q", ce.Code, ce.Reason, reason)
	}
}

// Every rejection reason of the handshake, in protocol order: the error
// frame, close 1008 with the reason, and the counter.
func TestHelloRejections(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) {
		c.MaxConnsPerMesh = 2
		c.HelloTimeout = 300 * time.Millisecond
	}})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	a := mesh.Members[0]
	_, strangerKey, _ := ed25519.GenerateKey(rand.Reader)
	stranger := client.Identity{MeshID: mesh.MeshID, MemberID: a.MemberID, Priv: strangerKey}

	tamper := func(mut func(h *protocol.Hello)) []byte {
		h := client.NewHello(a, client.HelloOptions{})
		mut(&h)
		b, _ := json.Marshal(h)
		return b
	}
	cases := []struct {
		name   string
		frame  []byte
		reason string
	}{
		{"not json", []byte(`{"type":"hello",`), protocol.ReasonMalformed},
		{"missing signature", tamper(func(h *protocol.Hello) { h.Signature = "" }), ""}, // empty is a shape error below
		{"pid is a string", []byte(strings.Replace(string(tamper(func(*protocol.Hello) {})), `"pid":0`, `"pid":"12"`, 1)), protocol.ReasonMalformed},
		{"missing cwd", []byte(strings.Replace(string(tamper(func(*protocol.Hello) {})), `"cwd":"/",`, ``, 1)), protocol.ReasonMalformed},
		{"old timestamp", tamper(func(h *protocol.Hello) {
			*h = client.NewHello(a, client.HelloOptions{Timestamp: time.Now().Add(-61 * time.Second)})
		}), protocol.ReasonTimestampSkew},
		{"future timestamp", tamper(func(h *protocol.Hello) {
			*h = client.NewHello(a, client.HelloOptions{Timestamp: time.Now().Add(61 * time.Second)})
		}), protocol.ReasonTimestampSkew},
		{"short pubkey", tamper(func(h *protocol.Hello) { h.Pubkey = h.Pubkey[:62] }), protocol.ReasonMalformed},
		{"short signature", tamper(func(h *protocol.Hello) { h.Signature = h.Signature[:126] }), protocol.ReasonMalformed},
		{"wrong key", tamper(func(h *protocol.Hello) {
			s := client.NewHello(stranger, client.HelloOptions{})
			h.Signature = s.Signature
		}), protocol.ReasonBadSignature},
		{"tampered mesh", tamper(func(h *protocol.Hello) { h.MeshID = mesh.MeshID + "x" }), protocol.ReasonBadSignature},
		{"not a member", tamper(func(h *protocol.Hello) { *h = client.NewHello(stranger, client.HelloOptions{}) }), protocol.ReasonUnauthorized},
		{"memberId of another member", tamper(func(h *protocol.Hello) {
			other := a
			other.MemberID = mesh.Members[1].MemberID
			*h = client.NewHello(other, client.HelloOptions{})
		}), protocol.ReasonUnauthorized},
	}
	cases[1].reason = protocol.ReasonMalformed // "signature":"" is not 128 hex chars
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := n.Counter("broker_connections_rejected_total", "reason", tc.reason)
			c := testkit.Dial(t, n.URL())
			testkit.Write(t, c, tc.frame)
			expectRejection(t, c, tc.reason)
			if got := n.Counter("broker_connections_rejected_total", "reason", tc.reason); got != before+1 {
				t.Fatalf("counter %s = %v, want %v", tc.reason, got, before+1)
			}
		})
	}

	t.Run("replayed", func(t *testing.T) {
		h := client.NewHello(a, client.HelloOptions{SessionID: "s-replay"})
		c1 := testkit.Dial(t, n.URL())
		testkit.Write(t, c1, h)
		testkit.Expect(t, c1, protocol.TypeHelloAck, 5*time.Second)
		c1.Close()
		c2 := testkit.Dial(t, n.URL())
		testkit.Write(t, c2, h) // the very same signed frame
		expectRejection(t, c2, protocol.ReasonReplayed)
	})

	t.Run("capacity", func(t *testing.T) {
		// Wait for the replay test's session to leave (it is in grace, not live).
		testkit.Eventually(t, 5*time.Second, "no live sessions", func() bool { return len(n.Replica().Live(mesh.MeshID)) == 0 })
		testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{SessionID: "cap-1"})
		testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{SessionID: "cap-2"})
		c := testkit.Dial(t, n.URL())
		testkit.Write(t, c, client.NewHello(a, client.HelloOptions{SessionID: "cap-3"}))
		expectRejection(t, c, protocol.ReasonCapacity)
	})

	t.Run("hello_timeout", func(t *testing.T) {
		c := testkit.Dial(t, n.URL())
		expectRejection(t, c, protocol.ReasonHelloTimeout)
	})

	t.Run("revoked", func(t *testing.T) {
		id := mesh.AddMember(t, n.Store(), "soon-revoked")
		if _, err := admin.RevokeMember(context.Background(), n.Store(), mesh.MeshID, id.Pubkey()); err != nil {
			t.Fatal(err)
		}
		c := testkit.Dial(t, n.URL())
		testkit.Write(t, c, client.NewHello(id, client.HelloOptions{}))
		expectRejection(t, c, protocol.ReasonUnauthorized)
	})
}

// Frames before a successful hello get no_hello and the socket stays open;
// unknown types after the hello get unknown_type and the socket stays open.
func TestFramesBeforeAndAfterHello(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	c := testkit.Dial(t, n.URL())
	testkit.Write(t, c, []byte(`{"type":"send","_reqId":"r1","targetSpec":"*","ciphertext":"x"}`))
	var e protocol.ErrorFrame
	testkit.Expect(t, c, protocol.TypeError, 5*time.Second).Decode(&e)
	if e.Code != protocol.CodeNoHello || e.ReqID != "r1" {
		t.Fatalf("got %+v, want no_hello echoing _reqId", e)
	}
	testkit.Write(t, c, client.NewHello(mesh.Members[0], client.HelloOptions{}))
	testkit.Expect(t, c, protocol.TypeHelloAck, 5*time.Second)
	testkit.Write(t, c, []byte(`{"type":"teleport","_reqId":"r2"}`))
	testkit.Expect(t, c, protocol.TypeError, 5*time.Second).Decode(&e)
	if e.Code != protocol.CodeUnknownType || e.ReqID != "r2" {
		t.Fatalf("got %+v, want unknown_type", e)
	}
	testkit.Write(t, c, []byte(`not json`))
	testkit.Expect(t, c, protocol.TypeError, 5*time.Second).Decode(&e)
	if e.Code != protocol.CodeMalformed {
		t.Fatalf("got %+v, want malformed", e)
	}
	testkit.Write(t, c, []byte(`{"type":"ping","_reqId":"r3"}`))
	var pong protocol.Pong
	testkit.Expect(t, c, protocol.TypePong, 5*time.Second).Decode(&pong)
	if pong.ReqID != "r3" {
		t.Fatalf("pong did not echo _reqId: %+v", pong)
	}
}

// A frame over MAX_MESSAGE_BYTES closes the socket with 1009.
func TestFrameTooLarge(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MaxMessageBytes = 4096 }})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	big := `{"type":"send","targetSpec":"*","ciphertext":"` + strings.Repeat("A", 5000) + `"}`
	testkit.Write(t, c, []byte(big))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		_, err := c.Next(ctx)
		var ce *client.CloseError
		if errors.As(err, &ce) {
			if ce.Code != 1009 {
				t.Fatalf("close code %d, want 1009", ce.Code)
			}
			return
		}
		if err != nil {
			t.Fatalf("want close 1009, got %v", err)
		}
	}
}
