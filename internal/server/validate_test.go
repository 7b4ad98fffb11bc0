package server_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// pipeline writes every frame, then reads one answer of type typ per
// frame (skipping others), within the deadline of ctx.
func pipeline(ctx context.Context, c *client.Conn, frames []any, typ string) ([]client.Frame, error) {
	for _, f := range frames {
		if err := c.WriteJSON(ctx, f); err != nil {
			return nil, err
		}
	}
	var out []client.Frame
	for len(out) < len(frames) {
		f, err := c.Next(ctx)
		if err != nil {
			return out, fmt.Errorf("answer %d of %d: %w", len(out)+1, len(frames), err)
		}
		if f.Type == typ {
			out = append(out, f)
		}
	}
	return out, nil
}

// One member sends frames with NUL in ciphertext, nonce and
// client_message_id, interleaved with 300 concurrent honest sends of ten
// other members to one recipient. Every honest send is acked queued:true
// and delivered; every poisoned one gets malformed, alone. On the old code
// the NUL reached the group commit and failed the honest sends sharing its
// batch with "internal".
func TestNULSendsDoNotHarmHonestSends(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	const honest, perSender = 10, 30
	mesh := testkit.NewMesh(t, n.Store(), honest+2)
	recvID, attackerID := mesh.Members[honest], mesh.Members[honest+1]
	recv := testkit.Connect(t, n.URL(), recvID, client.HelloOptions{})
	attacker := testkit.Connect(t, n.URL(), attackerID, client.HelloOptions{})
	senders := make([]*client.Conn, honest)
	for i := range senders {
		senders[i] = testkit.Connect(t, n.URL(), mesh.Members[i], client.HelloOptions{})
	}
	malformedBefore := n.Counter("broker_messages_rejected_total", "reason", protocol.CodeMalformed)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, honest+1)
	acked := make(chan string, honest*perSender)
	for i, c := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var frames []any
			for j := 0; j < perSender; j++ {
				frames = append(frames, protocol.Send{Type: protocol.TypeSend, ID: fmt.Sprintf("h%d-%d", i, j),
					TargetSpec: recvID.Pubkey(), Nonce: "bm9uY2U=", Ciphertext: fmt.Sprintf("aG9uZXN0-%d-%d", i, j),
					ClientMessageID: fmt.Sprintf("honest-%d-%d", i, j)})
			}
			<-start
			answers, err := pipeline(ctx, c, frames, protocol.TypeAck)
			if err != nil {
				errs <- fmt.Errorf("sender %d: %w", i, err)
				return
			}
			for _, f := range answers {
				var a protocol.Ack
				if err := f.Decode(&a); err != nil || !a.Queued || a.Error != "" {
					errs <- fmt.Errorf("honest send of sender %d answered %s", i, f.Raw)
					return
				}
				acked <- a.MessageID
			}
		}()
	}
	const bad = 45
	wg.Add(1)
	go func() {
		defer wg.Done()
		var frames []any
		for j := 0; j < bad; j++ {
			s := protocol.Send{Type: protocol.TypeSend, ID: fmt.Sprint("bad-", j), TargetSpec: recvID.Pubkey(),
				Nonce: "bm9uY2U=", Ciphertext: "YmFk", ClientMessageID: fmt.Sprint("bad-", j)}
			switch j % 3 {
			case 0:
				s.Ciphertext = "YmFk\x00YmFk"
			case 1:
				s.Nonce = "\x00"
			case 2:
				s.ClientMessageID = "bad\x00" + fmt.Sprint(j)
			}
			frames = append(frames, s)
		}
		<-start
		answers, err := pipeline(ctx, attacker, frames, protocol.TypeAck)
		if err != nil {
			errs <- fmt.Errorf("attacker: %w", err)
			return
		}
		for _, f := range answers {
			var a protocol.Ack
			if err := f.Decode(&a); err != nil || a.Queued || a.Error != protocol.CodeMalformed || !strings.HasPrefix(a.ID, "bad-") {
				errs <- fmt.Errorf("poisoned send answered %s, want malformed", f.Raw)
				return
			}
		}
	}()
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	close(acked)
	want := map[string]bool{}
	for id := range acked {
		want[id] = true
	}
	if len(want) != honest*perSender {
		t.Fatalf("%d distinct honest message ids, want %d", len(want), honest*perSender)
	}
	for len(want) > 0 {
		p := testkit.ExpectPush(t, recv, 20*time.Second)
		if !want[p.MessageID] || strings.Contains(p.Ciphertext, "YmFk") {
			t.Fatalf("recipient got %+v, not an outstanding honest message (%d left)", p, len(want))
		}
		delete(want, p.MessageID)
	}
	if d := n.Counter("broker_messages_rejected_total", "reason", protocol.CodeMalformed) - malformedBefore; d != bad {
		t.Fatalf("broker_messages_rejected_total{reason=malformed} grew by %v, want %d", d, bad)
	}
	if d := n.Counter("broker_batch_rows_failed_total"); d != 0 {
		t.Fatalf("%v rows reached Postgres and were refused: the edge let them through", d)
	}
}

// A member's hellos with NUL in cwd, concurrent with 40 honest hellos of
// other members: every honest one is accepted, every poisoned one is
// malformed. On the old code the NUL failed the hello batch it joined and
// the honest hellos in it were rejected unavailable.
func TestNULCwdHellosDoNotHarmHonestHellos(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	const honest, bad = 40, 20
	mesh := testkit.NewMesh(t, n.Store(), honest+1)
	attacker := mesh.Members[honest]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Dialled first, so that the hellos themselves run together.
	dialN := func(k int) []*client.Conn {
		var cs []*client.Conn
		for i := 0; i < k; i++ {
			c, err := client.Dial(ctx, n.URL(), nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = c.CloseNow() })
			cs = append(cs, c)
		}
		return cs
	}
	honestConns, badConns := dialN(honest), dialN(bad)
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, honest+bad)
	for i, c := range honestConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if _, err := c.Hello(ctx, mesh.Members[i], client.HelloOptions{Cwd: fmt.Sprint("/honest/", i), PID: int64(1000 + i)}); err != nil {
				errs <- fmt.Errorf("honest hello %d: %w", i, err)
			}
		}()
	}
	base := time.Now()
	for i, c := range badConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			// Distinct timestamps: distinct signatures, none a replay.
			_, err := c.Hello(ctx, attacker, client.HelloOptions{Cwd: "/tmp/\x00" + fmt.Sprint(i), PID: int64(i + 1),
				SessionID: fmt.Sprint("bad-", i), Timestamp: base.Add(time.Duration(i) * time.Millisecond)})
			var he *client.HelloError
			if !errors.As(err, &he) || he.Code != protocol.ReasonMalformed {
				errs <- fmt.Errorf("hello with NUL in cwd: %v, want malformed", err)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := n.Counter("broker_connections_active"); got != honest {
		t.Fatalf("%v sessions live, want the %d honest ones", got, honest)
	}
}

// An unauthenticated client sends hellos with NUL in meshId (one signed
// with its own key and a fresh timestamp, one with a stale timestamp)
// while honest peers connect: every honest peer_connected audit event is
// written. On the old code the NUL reached the audit COPY through the
// rejection's row and every event of its batch was lost.
func TestNULMeshIDHellosKeepAuditTrail(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	const honest = 20
	mesh := testkit.NewMesh(t, n.Store(), honest)
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	nulMesh := client.Identity{MeshID: mesh.MeshID + "\x00", MemberID: "nobody", Priv: stranger}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	stop := make(chan struct{})
	attackDone := make(chan error, 1)
	go func() {
		defer close(attackDone)
		for i := 0; i < 2000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			o := client.HelloOptions{SessionID: fmt.Sprint("x", i)}
			if i%2 == 1 {
				o.Timestamp = time.Now().Add(-10 * time.Minute)
			}
			if err := floodHello(n.URL(), client.NewHello(nulMesh, o)); err != nil {
				attackDone <- err
				return
			}
		}
	}()
	for i := 0; i < honest; i++ {
		c := testkit.Connect(t, n.URL(), mesh.Members[i], client.HelloOptions{})
		c.Close()
	}
	close(stop)
	if err := <-attackDone; err != nil {
		t.Fatal(err)
	}
	rejected := n.Counter("broker_connections_rejected_total")
	if rejected < 2 {
		t.Fatalf("%v hellos rejected: the attack did not run alongside", rejected)
	}
	testkit.Eventually(t, 10*time.Second, "every honest peer_connected event in the audit log", func() bool {
		ev, err := n.Store().ListAudit(ctx, mesh.MeshID, store.EventPeerConnected, 1000)
		return err == nil && len(ev) == honest
	})
	if got := n.Counter("broker_audit_dropped_total"); got != 0 {
		t.Fatalf("%v audit events dropped", got)
	}
	// Refused at the shape check, whatever the timestamp.
	if m := n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonMalformed); m != rejected {
		t.Fatalf("%v of %v poisoned hellos rejected malformed", m, rejected)
	}
	t.Logf("RESULT %d honest connects during %v hellos with NUL in meshId: all %d peer_connected events written",
		honest, rejected, honest)
}

// auditBytes is the text stored by audit rows of one type.
func auditBytes(t *testing.T, st *store.Store, eventType string) (rows, bytes int) {
	t.Helper()
	err := st.Pool().QueryRow(context.Background(), `
		SELECT count(*), coalesce(sum(octet_length(coalesce(mesh_id, '')) + octet_length(coalesce(actor, ''))
		       + octet_length(coalesce(target, '')) + octet_length(metadata::text)), 0)
		FROM audit_log WHERE event_type = $1`, eventType).Scan(&rows, &bytes)
	if err != nil {
		t.Fatal(err)
	}
	return rows, bytes
}

// 20 rejected hellos with a 60,000-character pubkey (fresh and stale
// timestamps, and one with a long meshId too): each is malformed, and the
// audit rows they leave stay small. On the old code each stored the whole
// pubkey (2.3 MB in all).
func TestRejectedHelloAuditBounded(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	// Honest traffic meanwhile: a member stays connected and sends to
	// another (offline: its messages are queued).
	c := testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
	const attempts = 20
	huge := strings.Repeat("a", 60000)
	reasons := map[string]int{}
	for i := 0; i < attempts; i++ {
		h := client.NewHello(mesh.Members[0], client.HelloOptions{SessionID: fmt.Sprint("big-", i)})
		h.Pubkey = huge
		if i%2 == 1 {
			h.Timestamp = json.Number(fmt.Sprint(time.Now().Add(-time.Hour).UnixMilli()))
		}
		if i == 7 {
			h.MeshID = strings.Repeat("m", 3000)
		}
		d := testkit.Dial(t, n.URL())
		testkit.Write(t, d, h)
		wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := d.WaitHelloAck(wctx)
		cancel()
		var he *client.HelloError
		if !errors.As(err, &he) {
			t.Fatalf("hello with a 60,000-character pubkey: %v", err)
		}
		reasons[he.Code]++
		if ack := testkit.Send(t, c, protocol.Send{TargetSpec: mesh.Members[1].Pubkey(), Ciphertext: "aGk="}); !ack.Queued {
			t.Fatalf("honest send during the attack: %+v", ack)
		}
	}
	var rows, size int
	testkit.Eventually(t, 10*time.Second, "the rejections audited", func() bool {
		rows, size = auditBytes(t, n.Store(), store.EventHelloRejected)
		return rows == attempts
	})
	const perRow = 512
	t.Logf("RESULT %d rejected hellos with a 60,000-character pubkey stored %d bytes of audit text", attempts, size)
	if size > attempts*perRow {
		t.Fatalf("%d rejected hellos stored %d bytes of audit text, want at most %d", attempts, size, attempts*perRow)
	}
	// Junk of that size is malformed at the shape check, before the
	// timestamp is looked at.
	if reasons[protocol.ReasonMalformed] != attempts {
		t.Fatalf("rejections %v, want all %d malformed", reasons, attempts)
	}
}

// Hellos over the per-address rate are counted (rate_limited), not each
// written to the audit log; the hellos under the rate are, and honest
// hellos from another address are served and audited meanwhile.
func TestRateLimitedHellosNotAudited(t *testing.T) {
	db := pgtest.NewDB(t)
	const rate = 1
	n := testkit.StartNode(t, db, testkit.Options{Configure: func(c *config.Config) { c.HelloRatePerSec = rate }})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	_, forger, _ := ed25519.GenerateKey(rand.Reader)
	forged := client.Identity{MeshID: mesh.MeshID, MemberID: mesh.Members[0].MemberID, Priv: forger}
	limitedBefore := n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonRateLimited)
	const flood = 60
	for i := 0; i < flood; i++ {
		// Signed by a key that is not the member's: unauthorized when
		// it gets through the limit.
		if err := floodHello(n.URL(), client.NewHello(forged, client.HelloOptions{SessionID: fmt.Sprint("f", i)})); err != nil {
			t.Fatal(err)
		}
	}
	limited := n.Counter("broker_connections_rejected_total", "reason", protocol.ReasonRateLimited) - limitedBefore
	if limited < flood-10 {
		t.Fatalf("%v of %d hellos rate limited; the flood did not exceed the rate", limited, flood)
	}
	// An honest hello from another address, after the flood: once its
	// event is written, every rejection before it has been too.
	other, err := client.Dial(context.Background(), n.URL(), &client.DialOptions{HTTPClient: fromAddr("127.0.0.2")})
	if err != nil {
		t.Fatal(err)
	}
	defer other.CloseNow()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := other.Hello(ctx, mesh.Members[1], client.HelloOptions{}); err != nil {
		t.Fatalf("honest hello from another address: %v", err)
	}
	testkit.Eventually(t, 10*time.Second, "the honest hello audited", func() bool {
		ev, err := n.Store().ListAudit(ctx, mesh.MeshID, store.EventPeerConnected, 10)
		return err == nil && len(ev) == 1
	})
	ev, err := n.Store().ListAudit(ctx, "", store.EventHelloRejected, 1000)
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[string]int{}
	for _, e := range ev {
		r, _ := e.Metadata["reason"].(string)
		reasons[r]++
	}
	t.Logf("RESULT %d hellos from one address at %d/s: %v rate limited (counted), audit rows by reason %v", flood, rate, limited, reasons)
	if reasons[protocol.ReasonRateLimited] != 0 {
		t.Fatalf("%d rate-limited rejections written to the audit log", reasons[protocol.ReasonRateLimited])
	}
	if reasons[protocol.ReasonUnauthorized] != flood-int(limited) || len(ev) != flood-int(limited) {
		t.Fatalf("audit rows %v, want one unauthorized row per hello under the rate (%d)", reasons, flood-int(limited))
	}
}

// The handshake order holds for realistic keys: a stale timestamp is
// reported before a mistyped pubkey or signature, and a mistyped one with
// a fresh timestamp is malformed at step 2. Only junk over twice a key's
// length is malformed first.
func TestHelloOrderKeptForRealisticKeys(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, testkit.Options{})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	stale := time.Now().Add(-10 * time.Minute)
	for _, c := range []struct {
		name      string
		pubkey    string // "" keeps the real one
		signature string
		stale     bool
		want      string
	}{
		{"real key, stale", "", "", true, protocol.ReasonTimestampSkew},
		{"short hex pubkey, stale", "abcd", "", true, protocol.ReasonTimestampSkew},
		{"65-char pubkey, stale", strings.Repeat("a", 65), "", true, protocol.ReasonTimestampSkew},
		{"128-char garbled pubkey, stale", strings.Repeat("z", 128), "", true, protocol.ReasonTimestampSkew},
		{"256-char signature, stale", "", strings.Repeat("f", 256), true, protocol.ReasonTimestampSkew},
		{"short hex pubkey, fresh", "abcd", "", false, protocol.ReasonMalformed},
		{"garbled signature, fresh", "", "xyz", false, protocol.ReasonMalformed},
		{"129-char pubkey, stale", strings.Repeat("a", 129), "", true, protocol.ReasonMalformed},
		{"257-char signature, stale", "", strings.Repeat("f", 257), true, protocol.ReasonMalformed},
	} {
		o := client.HelloOptions{}
		if c.stale {
			o.Timestamp = stale
		}
		h := client.NewHello(mesh.Members[0], o)
		if c.pubkey != "" {
			h.Pubkey = c.pubkey
		}
		if c.signature != "" {
			h.Signature = c.signature
		}
		d := testkit.Dial(t, n.URL())
		testkit.Write(t, d, h)
		t.Run(c.name, func(t *testing.T) { expectRejection(t, d, c.want) })
	}
	testkit.Connect(t, n.URL(), mesh.Members[0], client.HelloOptions{})
}
