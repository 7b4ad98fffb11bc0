package server_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

// noPush asserts that no envelope arrives within d (a negative check: the
// broker had every chance to deliver and did not).
func noPush(t *testing.T, c *client.Conn, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for {
		f, err := c.Next(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		var p protocol.Push
		if f.Type == protocol.TypePush && f.Decode(&p) == nil && p.Subtype == "" {
			t.Fatalf("unexpected push %s", f.Raw)
		}
	}
}

// A broadcast reaches every other member exactly once, including one that
// was offline when it was sent and connects afterwards.
func TestBroadcastExactlyOnce(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 4)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	b := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	// Member 2 has two sessions: the member gets the message once, on one of them.
	c1 := testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{SessionID: "c-1"})
	c2 := testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{SessionID: "c-2"})

	ack := testkit.Send(t, sender, protocol.Send{ID: "b1", TargetSpec: "*", Ciphertext: "YnJvYWRjYXN0"})
	if !ack.Queued || ack.ID != "b1" {
		t.Fatalf("ack %+v", ack)
	}
	if p := testkit.ExpectPush(t, b, 5*time.Second); p.MessageID != ack.MessageID || p.TargetSpec != "*" {
		t.Fatalf("b got %+v", p)
	}
	// Exactly one of member 2's sessions gets it.
	got := 0
	for _, c := range []*client.Conn{c1, c2} {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		for {
			f, err := c.Next(ctx)
			if err != nil {
				break
			}
			var p protocol.Push
			if f.Type == protocol.TypePush && f.Decode(&p) == nil && p.MessageID == ack.MessageID {
				got++
			}
		}
		cancel()
	}
	if got != 1 {
		t.Fatalf("member with two sessions received the broadcast %d times, want 1", got)
	}
	noPush(t, sender, 300*time.Millisecond) // the sender's own member is excluded

	// The offline member connects later and gets it once.
	late := testkit.Connect(t, n.URL(), mesh.Members[3], client.HelloOptions{})
	if p := testkit.ExpectPush(t, late, 5*time.Second); p.MessageID != ack.MessageID || p.SenderPubkey != mesh.Members[0].Pubkey() {
		t.Fatalf("late member got %+v", p)
	}
	noPush(t, late, 500*time.Millisecond)
	late.Close()
	again := testkit.Connect(t, n.URL(), mesh.Members[3], client.HelloOptions{})
	noPush(t, again, 500*time.Millisecond)
}

// A client_ack session that closes without acking: the message is
// redelivered to the member's next session; once acked it is not.
func TestClientAckRedelivery(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	acker := client.HelloOptions{SessionID: "r-1", Capabilities: []string{protocol.CapClientAck}}
	r1 := testkit.Connect(t, n.URL(), mesh.Members[1], acker)
	ack := testkit.Send(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "b25jZQ=="})
	p := testkit.ExpectPush(t, r1, 5*time.Second)
	if p.MessageID != ack.MessageID {
		t.Fatalf("got %+v", p)
	}
	r1.Close() // no client_ack

	r2 := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{SessionID: "r-2", Capabilities: []string{protocol.CapClientAck}})
	p2 := testkit.ExpectPush(t, r2, 5*time.Second)
	if p2.MessageID != ack.MessageID {
		t.Fatalf("redelivery got %+v", p2)
	}
	testkit.Write(t, r2, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: p2.MessageID})
	status := messageStatus(t, sender, ack.MessageID)
	testkit.Eventually(t, 5*time.Second, "delivered state", func() bool {
		status = messageStatus(t, sender, ack.MessageID)
		return len(status.Recipients) == 1 && status.Recipients[0].State == protocol.StateDelivered
	})
	r2.Close()
	r3 := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{SessionID: "r-3", Capabilities: []string{protocol.CapClientAck}})
	noPush(t, r3, 700*time.Millisecond)
}

// messageStatus asks for a message's status; a request over the session's
// message_status rate (tests that poll in Eventually ask 50 times a second)
// is asked again, as a client would, after a tenth of a second.
func messageStatus(t *testing.T, c *client.Conn, id string) protocol.MessageStatusResult {
	t.Helper()
	for try := 0; ; try++ {
		testkit.Write(t, c, protocol.MessageStatus{Type: protocol.TypeMessageStatus, MessageID: id})
		var res protocol.MessageStatusResult
		if err := testkit.Expect(t, c, protocol.TypeMessageStatusR, 5*time.Second).Decode(&res); err != nil {
			t.Fatal(err)
		}
		if res.Error != protocol.CodeRateLimited || try == 50 {
			return res
		}
		time.Sleep(100 * time.Millisecond) // the limiter's refill, not a synchronisation
	}
}

// Status gating: working and dnd sessions get only "now"; next and low are
// held and released when a hook or set_status turns the session idle; a
// hook cannot clear dnd.
func TestPriorityGating(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	rcv := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{PID: 4242, Cwd: "/work/proj"})
	to := mesh.Members[1].Pubkey()

	testkit.Write(t, rcv, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusWorking})
	testkit.Eventually(t, 5*time.Second, "status working", func() bool {
		e := n.Replica().Live(mesh.MeshID)
		for _, x := range e {
			if x.MemberID == mesh.Members[1].MemberID {
				return x.Status == protocol.StatusWorking
			}
		}
		return false
	})
	next := testkit.Send(t, sender, protocol.Send{TargetSpec: to, Priority: "next", Ciphertext: "bmV4dA=="})
	low := testkit.Send(t, sender, protocol.Send{TargetSpec: to, Priority: "low", Ciphertext: "bG93"})
	now := testkit.Send(t, sender, protocol.Send{TargetSpec: to, Priority: "now", Ciphertext: "bm93"})
	if p := testkit.ExpectPush(t, rcv, 5*time.Second); p.MessageID != now.MessageID {
		t.Fatalf("working session got %s first, want the now message %s", p.MessageID, now.MessageID)
	}
	noPush(t, rcv, 500*time.Millisecond)
	if st := messageStatus(t, sender, next.MessageID); st.Recipients[0].State != protocol.StateHeld {
		t.Fatalf("next message state %+v, want held", st)
	}

	// A hook turns it idle: the held messages follow in send order.
	testkit.Hook(t, n.HookURL(), `{"cwd":"/work/proj","pid":4242,"status":"idle"}`, http.StatusOK)
	p1 := testkit.ExpectPush(t, rcv, 5*time.Second)
	p2 := testkit.ExpectPush(t, rcv, 5*time.Second)
	if p1.MessageID != next.MessageID || p2.MessageID != low.MessageID {
		t.Fatalf("released %s, %s; want %s, %s", p1.MessageID, p2.MessageID, next.MessageID, low.MessageID)
	}

	// dnd: only now; a hook cannot clear it; set_status can.
	testkit.Write(t, rcv, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusDND})
	testkit.Eventually(t, 5*time.Second, "status dnd", func() bool { return testkit.LiveStatus(n, mesh.Members[1].MemberID) == protocol.StatusDND })
	held := testkit.Send(t, sender, protocol.Send{TargetSpec: to, Priority: "next", Ciphertext: "ZG5k"})
	testkit.Hook(t, n.HookURL(), `{"cwd":"/work/proj","pid":4242,"status":"idle"}`, http.StatusOK)
	noPush(t, rcv, 500*time.Millisecond)
	if s := testkit.LiveStatus(n, mesh.Members[1].MemberID); s != protocol.StatusDND {
		t.Fatalf("a hook changed dnd to %s", s)
	}
	testkit.Write(t, rcv, protocol.SetStatus{Type: protocol.TypeSetStatus, Status: protocol.StatusIdle})
	if p := testkit.ExpectPush(t, rcv, 5*time.Second); p.MessageID != held.MessageID {
		t.Fatalf("got %s, want %s after set_status idle", p.MessageID, held.MessageID)
	}
}

// client_message_id makes a retried send idempotent.
func TestIdempotentSend(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	rcv := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	first := testkit.Send(t, sender, protocol.Send{ID: "1", TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "eA==", ClientMessageID: "k-1"})
	second := testkit.Send(t, sender, protocol.Send{ID: "2", TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "eA==", ClientMessageID: "k-1"})
	if !second.Duplicate || second.MessageID != first.MessageID || !second.Queued {
		t.Fatalf("retry ack %+v, want duplicate of %s", second, first.MessageID)
	}
	p := testkit.ExpectPush(t, rcv, 5*time.Second)
	if p.ClientMessageID != "k-1" {
		t.Fatalf("push lost client_message_id: %+v", p)
	}
	noPush(t, rcv, 500*time.Millisecond)
}

// Per (sender → recipient) pair, pushes arrive in send order, whether the
// recipient was online (fast path) or connected later (claimed backlog).
func TestPairOrdering(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	s1 := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	s2 := testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{})
	const each = 300
	to := mesh.Members[1].Pubkey()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Half sent while the recipient is offline, half while it is online.
	for i := 0; i < each/2; i++ {
		for k, c := range []*client.Conn{s1, s2} {
			testkit.Write(t, c, protocol.Send{Type: protocol.TypeSend, TargetSpec: to, Nonce: "n", Ciphertext: fmt.Sprintf("%d-%d", k, i)})
		}
	}
	rcv := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	for i := each / 2; i < each; i++ {
		for k, c := range []*client.Conn{s1, s2} {
			testkit.Write(t, c, protocol.Send{Type: protocol.TypeSend, TargetSpec: to, Nonce: "n", Ciphertext: fmt.Sprintf("%d-%d", k, i)})
		}
	}
	next := map[string]int{}
	for got := 0; got < 2*each; {
		f, err := rcv.Next(ctx)
		if err != nil {
			t.Fatalf("after %d pushes: %v", got, err)
		}
		var p protocol.Push
		if f.Type != protocol.TypePush || f.Decode(&p) != nil || p.Subtype != "" {
			continue
		}
		var k, i int
		fmt.Sscanf(p.Ciphertext, "%d-%d", &k, &i)
		if i != next[p.SenderPubkey] {
			t.Fatalf("from sender %d got #%d, want #%d", k, i, next[p.SenderPubkey])
		}
		next[p.SenderPubkey]++
		got++
	}
}

// Sends to unknown recipients, empty groups, bad specs and oversized
// payloads are rejected with the documented codes.
func TestSendRejections(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MaxMessageBytes = 2048 }})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	cases := []struct {
		s    protocol.Send
		code string
	}{
		{protocol.Send{ID: "a", TargetSpec: fmt.Sprintf("%064x", 7), Ciphertext: "x"}, protocol.CodeUnknownRecipient},
		{protocol.Send{ID: "b", TargetSpec: "*", Ciphertext: "x"}, protocol.CodeNoRecipients},
		{protocol.Send{ID: "c", TargetSpec: "@nobody", Ciphertext: "x"}, protocol.CodeNoRecipients},
		{protocol.Send{ID: "d", TargetSpec: "#general", Ciphertext: "x"}, protocol.CodeMalformed},
		{protocol.Send{ID: "e", TargetSpec: "tag:x", Ciphertext: "x"}, protocol.CodeMalformed},
		{protocol.Send{ID: "f", TargetSpec: "*", Priority: "urgent", Ciphertext: "x"}, protocol.CodeMalformed},
		{protocol.Send{ID: "g", TargetSpec: "*", Ciphertext: string(bytes.Repeat([]byte("A"), 1900))}, protocol.CodeTooLarge},
	}
	for _, tc := range cases {
		before := n.Counter("broker_messages_rejected_total", "reason", tc.code)
		ack := testkit.Send(t, c, tc.s)
		if ack.Queued || ack.Error != tc.code || ack.ID != tc.s.ID || ack.MessageID != "" {
			t.Errorf("%s: ack %+v, want error %s", tc.s.TargetSpec, ack, tc.code)
		}
		if got := n.Counter("broker_messages_rejected_total", "reason", tc.code); got != before+1 {
			t.Errorf("%s: counter %v, want %v", tc.code, got, before+1)
		}
	}
}

// @group reaches members currently in the group, joined by hello or
// join_group, and not those who left it.
func TestGroupTarget(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 4)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	viaHello := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{Groups: []string{"backend"}})
	viaJoin := testkit.Connect(t, n.URL(), mesh.Members[2], client.HelloOptions{})
	leaver := testkit.Connect(t, n.URL(), mesh.Members[3], client.HelloOptions{Groups: []string{"backend"}})
	testkit.Write(t, viaJoin, protocol.GroupOp{Type: protocol.TypeJoinGroup, Name: "backend"})
	testkit.Write(t, leaver, protocol.GroupOp{Type: protocol.TypeLeaveGroup, Name: "backend"})
	want := []string{mesh.Members[1].MemberID, mesh.Members[2].MemberID}
	slices.Sort(want)
	testkit.Eventually(t, 5*time.Second, "group membership", func() bool {
		return slices.Equal(n.Replica().GroupMembers(mesh.MeshID, "backend"), want)
	})
	ack := testkit.Send(t, sender, protocol.Send{TargetSpec: "@backend", Ciphertext: "Z3JvdXA="})
	for _, c := range []*client.Conn{viaHello, viaJoin} {
		if p := testkit.ExpectPush(t, c, 5*time.Second); p.MessageID != ack.MessageID {
			t.Fatalf("got %+v", p)
		}
	}
	noPush(t, leaver, 500*time.Millisecond)
	st := messageStatus(t, sender, ack.MessageID)
	if len(st.Recipients) != 2 {
		t.Fatalf("message_status lists %d recipients, want 2", len(st.Recipients))
	}
}

// Undelivered rows past MESSAGE_TTL expire, are counted, and are not
// delivered when the member connects.
func TestMessageExpiry(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.MessageTTL = time.Second }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	sender := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	ack := testkit.Send(t, sender, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "b2xk"})
	testkit.Eventually(t, 15*time.Second, "expiry", func() bool {
		return messageStatus(t, sender, ack.MessageID).Recipients[0].State == protocol.StateExpired
	})
	if _, ok := n.Engine().TestSignals.Expired.Wait(15 * time.Second); !ok {
		t.Fatal("no expiry pass expired the row")
	}
	if got := n.Counter("broker_messages_expired_total"); got != 1 {
		t.Fatalf("broker_messages_expired_total = %v, want 1", got)
	}
	rcv := testkit.Connect(t, n.URL(), mesh.Members[1], client.HelloOptions{})
	noPush(t, rcv, 700*time.Millisecond)
	id, _ := strconv.ParseInt(ack.MessageID, 10, 64)
	if id <= 0 {
		t.Fatalf("bad id %q", ack.MessageID)
	}
}
