package client_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/e2e"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// recorder collects what a client receives.
type recorder struct {
	mu     sync.Mutex
	msgs   []client.Message
	events []client.Event
	signal chan struct{}
}

func newRecorder() *recorder { return &recorder{signal: make(chan struct{}, 1)} }

func (r *recorder) onMessage(m client.Message) {
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	r.mu.Unlock()
	select {
	case r.signal <- struct{}{}:
	default:
	}
}

func (r *recorder) onEvent(e client.Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
	select {
	case r.signal <- struct{}{}:
	default:
	}
}

func (r *recorder) messages() []client.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]client.Message(nil), r.msgs...)
}

// waitMessages waits until n messages arrived.
func (r *recorder) waitMessages(t *testing.T, n int, timeout time.Duration) []client.Message {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		if got := r.messages(); len(got) >= n {
			return got
		}
		select {
		case <-r.signal:
		case <-deadline.C:
			t.Fatalf("timed out with %d of %d messages", len(r.messages()), n)
		}
	}
}

func meshKey(t *testing.T, st *store.Store, meshID string) *[32]byte {
	t.Helper()
	m, err := st.GetMesh(context.Background(), meshID)
	if err != nil {
		t.Fatal(err)
	}
	k, err := e2e.ParseMeshKeyHex(m.RootKey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newClient(t *testing.T, o client.Options) *client.Client {
	t.Helper()
	if o.Backoff.Min == 0 {
		o.Backoff = client.Backoff{Min: 20 * time.Millisecond, Max: 200 * time.Millisecond}
	}
	o.Logger = testkit.Logger(t)
	c, err := client.New(o)
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.WaitReady(ctx); err != nil {
		t.Fatalf("connect: %v", err)
	}
	return c
}

// Direct, broadcast and group messages are sealed, delivered, opened and
// acknowledged; the sender sees the broker's messageId.
func TestSendReceiveKinds(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 3)
	key := meshKey(t, n.Store(), mesh.MeshID)
	a, b, c := mesh.Members[0], mesh.Members[1], mesh.Members[2]

	rb, rc := newRecorder(), newRecorder()
	ca := newClient(t, client.Options{Identity: a, URLs: []string{n.URL()}, MeshKey: key})
	newClient(t, client.Options{Identity: b, URLs: []string{n.URL()}, MeshKey: key, Groups: []string{"backend"}, OnMessage: rb.onMessage})
	newClient(t, client.Options{Identity: c, URLs: []string{n.URL()}, MeshKey: key, OnMessage: rc.onMessage})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := ca.Send(ctx, b.Pubkey(), "hello b", protocol.PriorityNow)
	if err != nil || res.MessageID == "" {
		t.Fatalf("direct send: %+v %v", res, err)
	}
	if _, err := ca.Send(ctx, "*", "hello all", ""); err != nil {
		t.Fatalf("broadcast: %v", err)
	}
	if _, err := ca.Send(ctx, "@backend", "hello backend", protocol.PriorityLow); err != nil {
		t.Fatalf("group: %v", err)
	}

	got := rb.waitMessages(t, 3, 10*time.Second)
	want := []struct{ text, kind, prio string }{
		{"hello b", client.KindDirect, protocol.PriorityNow},
		{"hello all", client.KindBroadcast, protocol.PriorityNext},
		{"hello backend", client.KindGroup, protocol.PriorityLow},
	}
	for i, w := range want {
		m := got[i]
		if m.Text != w.text || m.Kind != w.kind || m.Priority != w.prio || m.From != a.Pubkey() || m.FromName != "p0" || m.DecryptError != "" {
			t.Errorf("message %d = %+v, want %+v", i, m, w)
		}
	}
	if got[0].ID != res.MessageID {
		t.Errorf("messageId %s, ack said %s", got[0].ID, res.MessageID)
	}
	gc := rc.waitMessages(t, 1, 10*time.Second)
	if gc[0].Text != "hello all" {
		t.Errorf("c got %+v", gc[0])
	}

	// Acknowledged: the delivery rows are marked delivered.
	testkit.Eventually(t, 10*time.Second, "deliveries acknowledged", func() bool {
		st, err := ca.MessageStatus(ctx, res.MessageID)
		return err == nil && len(st.Recipients) == 1 && st.Recipients[0].State == protocol.StateDelivered
	})
}

// A tampered envelope is recorded with a decrypt error, not as text, and is
// acknowledged so it is not redelivered forever.
func TestTamperedMessageRejected(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	a, b := mesh.Members[0], mesh.Members[1]
	rb := newRecorder()
	newClient(t, client.Options{Identity: b, URLs: []string{n.URL()}, OnMessage: rb.onMessage})

	nonce, ct, err := e2e.SealDirect([]byte("secret"), b.PublicKey(), a.Priv)
	if err != nil {
		t.Fatal(err)
	}
	raw := []byte(ct)
	raw[len(raw)-3] ^= 1 // flip a bit of the base64 text
	if raw[len(raw)-3] == '=' {
		raw[len(raw)-3] = 'A'
	}
	conn := testkit.Connect(t, n.URL(), a, client.HelloOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := conn.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, ID: "x", TargetSpec: b.Pubkey(), Nonce: nonce, Ciphertext: string(raw)}); err != nil {
		t.Fatal(err)
	}
	var ack protocol.Ack
	if err := testkit.Expect(t, conn, protocol.TypeAck, 5*time.Second).Decode(&ack); err != nil || !ack.Queued {
		t.Fatalf("ack %+v %v", ack, err)
	}
	m := rb.waitMessages(t, 1, 10*time.Second)[0]
	if m.Text != "" || m.DecryptError == "" {
		t.Fatalf("tampered message opened: %+v", m)
	}
}

// A message whose send was committed but whose ack was lost (the client
// crashed) is resent from the outbox with the same client_message_id: the
// broker answers duplicate and the recipient gets it once.
func TestOutboxResendIsIdempotent(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	a, b := mesh.Members[0], mesh.Members[1]

	// The first attempt: committed by the broker, ack never processed.
	nonce, ct, err := e2e.SealDirect([]byte("only once"), b.PublicKey(), a.Priv)
	if err != nil {
		t.Fatal(err)
	}
	entry := client.OutboxEntry{ClientMessageID: "cm-crash-1", TargetSpec: b.Pubkey(), Priority: "next", Nonce: nonce, Ciphertext: ct, CreatedAt: time.Now()}
	conn := testkit.Connect(t, n.URL(), a, client.HelloOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := conn.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, ID: "1", TargetSpec: entry.TargetSpec, Nonce: nonce, Ciphertext: ct, ClientMessageID: entry.ClientMessageID}); err != nil {
		t.Fatal(err)
	}
	var first protocol.Ack
	if err := testkit.Expect(t, conn, protocol.TypeAck, 5*time.Second).Decode(&first); err != nil || !first.Queued {
		t.Fatalf("first ack %+v %v", first, err)
	}
	_ = conn.CloseNow()

	// The restarted client finds the entry in its outbox and resends it.
	out := client.NewMemoryOutbox()
	if err := out.Add(entry); err != nil {
		t.Fatal(err)
	}
	newClient(t, client.Options{Identity: a, URLs: []string{n.URL()}, Outbox: out})
	testkit.Eventually(t, 10*time.Second, "outbox drained", func() bool {
		p, _ := out.Pending()
		return len(p) == 0
	})

	rb := newRecorder()
	newClient(t, client.Options{Identity: b, URLs: []string{n.URL()}, OnMessage: rb.onMessage})
	got := rb.waitMessages(t, 1, 10*time.Second)
	if got[0].Text != "only once" || got[0].ID != first.MessageID {
		t.Fatalf("got %+v", got[0])
	}
	if c := countMessages(t, db, a.MemberID); c != 1 {
		t.Fatalf("%d message rows for the sender, want 1", c)
	}
}

func countMessages(t *testing.T, db, sender string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM message WHERE sender_member_id = $1", sender).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// The broker node both clients are on is killed while the sender sends.
// Both reconnect to the second node of their URL list; every message the
// sender accepted arrives exactly once, and the broker stored each once.
func TestReconnectAcrossNodesLosesNothing(t *testing.T) {
	db := pgtest.NewDB(t)
	n1 := testkit.StartNode(t, db, testkit.Options{})
	n2 := testkit.StartNode(t, db, testkit.Options{Join: []*testkit.Node{n1}})
	testkit.Eventually(t, 10*time.Second, "cluster of two", func() bool {
		return n1.Cluster().NumMembers() == 2 && n2.Cluster().NumMembers() == 2
	})
	mesh := testkit.NewMesh(t, n1.Store(), 2)
	a, b := mesh.Members[0], mesh.Members[1]
	urls := []string{n1.URL(), n2.URL()}

	rb := newRecorder()
	inbox := &countingInbox{Inbox: client.NewMemoryInbox()}
	var mu sync.Mutex
	connects := map[string][]string{}
	onConnect := func(who string) func(client.ConnInfo) {
		return func(ci client.ConnInfo) {
			mu.Lock()
			connects[who] = append(connects[who], ci.Node)
			mu.Unlock()
		}
	}
	cb := newClient(t, client.Options{Identity: b, URLs: urls, Inbox: inbox, OnMessage: rb.onMessage, OnConnect: onConnect("b")})
	ca := newClient(t, client.Options{Identity: a, URLs: urls, OnConnect: onConnect("a")})
	for _, c := range []*client.Client{ca, cb} {
		if info, _ := c.Info(); info.Node != n1.Name() {
			t.Fatalf("client started on %s, want %s", info.Node, n1.Name())
		}
	}

	const total = 120
	pending := make([]*client.Pending, 0, total)
	for i := range total {
		p, err := ca.Enqueue(b.Pubkey(), fmt.Sprintf("m%03d", i), "")
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, p)
		if i == total/3 {
			// Kill the node once some messages are through and others
			// are queued or in flight.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if _, err := pending[i/2].Wait(ctx); err != nil {
				t.Fatal(err)
			}
			cancel()
			n1.Kill()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i, p := range pending {
		if _, err := p.Wait(ctx); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}

	got := rb.waitMessages(t, total, 30*time.Second)
	seen := map[string]bool{}
	for _, m := range got {
		if seen[m.Text] {
			t.Fatalf("duplicate %q", m.Text)
		}
		seen[m.Text] = true
	}
	for i := range total {
		if !seen[fmt.Sprintf("m%03d", i)] {
			t.Fatalf("m%03d lost", i)
		}
	}
	if c := countMessages(t, db, a.MemberID); c != total {
		t.Fatalf("%d message rows, want %d", c, total)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, who := range []string{"a", "b"} {
		nodes := connects[who]
		if len(nodes) < 2 || nodes[len(nodes)-1] != n2.Name() {
			t.Errorf("%s connected to %v, want to end on %s", who, nodes, n2.Name())
		}
	}
	// Nothing further arrives (no late duplicate).
	if len(rb.messages()) != total {
		t.Fatalf("%d messages, want %d", len(rb.messages()), total)
	}
	t.Logf("pushes recorded %d, redeliveries deduped %d", inbox.calls.Load(), inbox.calls.Load()-total)
}

// countingInbox counts Record calls, redeliveries included.
type countingInbox struct {
	client.Inbox
	calls atomic.Int64
}

func (c *countingInbox) Record(m client.Message) (bool, error) {
	c.calls.Add(1)
	return c.Inbox.Record(m)
}

// A client that cannot reach any broker gives up after GiveUpAfter attempts
// with an error naming every URL.
func TestUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "ws://" + ln.Addr().String() + "/ws"
	ln.Close()
	pub, priv, _ := e2e.GenerateKey()
	_ = pub
	c, err := client.New(client.Options{
		Identity: client.Identity{MeshID: "m", MemberID: "x", Priv: priv}, URLs: []string{dead},
		GiveUpAfter: 2, Backoff: client.Backoff{Min: time.Millisecond, Max: time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = c.WaitReady(ctx)
	var ue *client.UnreachableError
	if !errors.As(err, &ue) || len(ue.Attempts) != 2 {
		t.Fatalf("err = %v", err)
	}
}

// A rejected hello (not a member) stops the client with a HelloError
// instead of retrying forever.
func TestHelloRejectedIsPermanent(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	_, stranger, _ := e2e.GenerateKey()
	id := client.Identity{MeshID: mesh.MeshID, MemberID: mesh.Members[0].MemberID, Priv: stranger}
	c, err := client.New(client.Options{Identity: id, URLs: []string{n.URL()}})
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = c.WaitReady(ctx)
	var he *client.HelloError
	if !errors.As(err, &he) || he.Code != protocol.ReasonUnauthorized {
		t.Fatalf("err = %v", err)
	}
}

// Status and summary reach peers_list; a rejected send reports the code and
// leaves nothing in the outbox.
func TestStatusSummaryAndRejection(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	a, b := mesh.Members[0], mesh.Members[1]
	out := client.NewMemoryOutbox()
	ca := newClient(t, client.Options{Identity: a, URLs: []string{n.URL()}, Outbox: out})
	rb := newRecorder()
	cb := newClient(t, client.Options{Identity: b, URLs: []string{n.URL()}, OnEvent: rb.onEvent})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if err := ca.SetStatus(ctx, protocol.StatusDND, ""); err != nil {
		t.Fatal(err)
	}
	if err := ca.SetSummary(ctx, "refactoring the parser"); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "status visible", func() bool {
		peers, err := cb.ListPeers(ctx)
		if err != nil {
			return false
		}
		for _, p := range peers {
			if p.Pubkey == a.Pubkey() {
				return p.Status == protocol.StatusDND && p.StatusSource == protocol.SourceManual && p.Summary == "refactoring the parser"
			}
		}
		return false
	})
	testkit.Eventually(t, 10*time.Second, "peer_status event", func() bool {
		rb.mu.Lock()
		defer rb.mu.Unlock()
		for _, e := range rb.events {
			if e.Name == protocol.EventPeerStatus && e.Peer.Pubkey == a.Pubkey() && e.Peer.Status == protocol.StatusDND {
				return true
			}
		}
		return false
	})

	_, outsider, _ := e2e.GenerateKey()
	_, err := ca.Send(ctx, client.Identity{Priv: outsider}.Pubkey(), "hi", "")
	var se *client.SendError
	if !errors.As(err, &se) || se.Code != protocol.CodeUnknownRecipient {
		t.Fatalf("err = %v", err)
	}
	if p, _ := out.Pending(); len(p) != 0 {
		t.Fatalf("outbox still holds %d entries", len(p))
	}
	if _, err := ca.Send(ctx, "*", "x", ""); !errors.Is(err, client.ErrNoMeshKey) {
		t.Fatalf("broadcast without mesh key: %v", err)
	}
}

// gatedOutbox holds the first Pending call after arm until release, and
// reads the shared outbox only then.
type gatedOutbox struct {
	client.Outbox
	mu      sync.Mutex
	armed   bool
	entered chan struct{}
	release chan struct{}
}

func (g *gatedOutbox) arm() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.armed = true
	g.entered, g.release = make(chan struct{}), make(chan struct{})
}

func (g *gatedOutbox) Pending() ([]client.OutboxEntry, error) {
	g.mu.Lock()
	armed, entered, release := g.armed, g.entered, g.release
	g.armed = false
	g.mu.Unlock()
	if armed {
		close(entered)
		<-release
	}
	return g.Outbox.Pending()
}

// Two processes share one outbox (bob's `listen` and his `claudemesh send`):
// when the other one sends and removes an entry before this client reads
// the outbox, this client's waiter still gets the broker's answer, and the
// message is delivered once.
func TestOwnSendTakenByAnotherClient(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	a, b := mesh.Members[0], mesh.Members[1]
	shared := client.NewMemoryOutbox()
	gated := &gatedOutbox{Outbox: shared}
	mine := newClient(t, client.Options{Identity: a, URLs: []string{n.URL()}, Outbox: gated})
	other := newClient(t, client.Options{Identity: a, URLs: []string{n.URL()}, Outbox: shared})
	rb := newRecorder()
	newClient(t, client.Options{Identity: b, URLs: []string{n.URL()}, OnMessage: rb.onMessage})

	gated.arm()
	p, err := mine.Enqueue(b.Pubkey(), "sent by the other", "")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-gated.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the client never read its outbox")
	}
	other.Flush()
	testkit.Eventually(t, 10*time.Second, "the other client sent and removed the entry", func() bool {
		left, _ := shared.Pending()
		return len(left) == 0
	})
	close(gated.release)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := p.Wait(ctx)
	if err != nil || res.MessageID == "" {
		t.Fatalf("the waiter got %+v, %v", res, err)
	}
	got := rb.waitMessages(t, 1, 10*time.Second)
	if got[0].ID != res.MessageID || got[0].Text != "sent by the other" {
		t.Fatalf("b got %+v, the sender was told %s", got[0], res.MessageID)
	}
	if c := countMessages(t, db, a.MemberID); c != 1 {
		t.Fatalf("%d message rows for the sender, want 1", c)
	}
}
