package store_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/store"
)

// Rows that bypass edge validation and that Postgres refuses: a NUL in
// text, invalid UTF-8, a \u0000 escape in jsonb.
const (
	nul     = "bad\x00row"
	badUTF8 = "bad\xffrow"
)

// A group commit with poisoned messages among good ones: exactly the
// poisoned ones fail, with a data error; the others commit in batch order
// with their delivery rows and their envelope notification, and the
// batch's wake-ups are still sent.
func TestInsertMessagesIsolatesBadRows(t *testing.T) {
	ctx := context.Background()
	url := pgtest.NewDB(t)
	s, err := store.Open(ctx, url, 8)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	f := seed(t, s, 3)
	lc, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close(context.Background()) })
	if _, err := lc.Exec(ctx, "LISTEN ch"); err != nil {
		t.Fatal(err)
	}

	const n = 40
	bad := map[int]func(*delivery.NewMessage){
		3:  func(m *delivery.NewMessage) { m.Ciphertext = nul },
		17: func(m *delivery.NewMessage) { m.Nonce = badUTF8 },
		18: func(m *delivery.NewMessage) { m.ClientMessageID = nul },
		39: func(m *delivery.NewMessage) { m.Recipients[0].MemberID = nul },
	}
	var batch []delivery.NewMessage
	for i := 0; i < n; i++ {
		m := msg(f, 0, 1+i%2, 1, fmt.Sprint("k", i))
		if poison, ok := bad[i]; ok {
			poison(&m)
		}
		batch = append(batch, m)
	}
	batch[20].Recipients = []delivery.NewRecipient{{MemberID: f.members[1].ID, LeaseConn: "c1", LeaseNode: "x#1"}}
	envs := []delivery.EnvelopeNotify{{Ord: 20, Pending: relay.Pending{Channel: "ch", Prefix: "E ", Suffix: "|env"}}}
	res, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "self#1", Lease: 30 * time.Second, Messages: batch, WakeChannels: []string{"ch"}, WakePayloads: []string{"wake"}, Envelopes: envs})
	if err != nil {
		t.Fatalf("a batch with refused rows failed whole: %v", err)
	}
	var last int64
	for i, r := range res {
		if _, isBad := bad[i]; isBad {
			if !store.IsDataError(r.Err) || r.ID != 0 {
				t.Fatalf("poisoned message %d: %+v, want a data error", i, r)
			}
			continue
		}
		if r.Err != nil || r.ID <= last || r.Duplicate {
			t.Fatalf("message %d: %+v, want committed after id %d", i, r, last)
		}
		last = r.ID
	}
	var messages, deliveries int
	if err := s.Pool().QueryRow(ctx, `SELECT (SELECT count(*) FROM message), (SELECT count(*) FROM delivery)`).Scan(&messages, &deliveries); err != nil {
		t.Fatal(err)
	}
	if messages != n-len(bad) || deliveries != n-len(bad) {
		t.Fatalf("%d messages and %d delivery rows, want %d each", messages, deliveries, n-len(bad))
	}
	want := []string{fmt.Sprintf("E %d %d|env", res[20].ID, res[20].CreatedAt.UnixMicro()), "wake"}
	for i, w := range want {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		got, err := lc.WaitForNotification(wctx)
		cancel()
		if err != nil || got.Payload != w {
			t.Fatalf("notification %d = %v %v, want %q", i, got, err, w)
		}
	}
	// The committed ones are idempotent as before: sent again, each is a
	// duplicate of itself.
	again, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "self#1", Lease: 30 * time.Second, Messages: batch[:5]})
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range again {
		if i == 3 {
			if !store.IsDataError(r.Err) {
				t.Fatalf("poisoned message again: %+v", r)
			}
			continue
		}
		if !r.Duplicate || r.ID != res[i].ID || r.Err != nil {
			t.Fatalf("resent message %d: %+v, want duplicate of %d", i, r, res[i].ID)
		}
	}
}

// Delivery marks with a poisoned key: the other rows are marked, and the
// error names exactly the poisoned key.
func TestMarkDeliveredIsolatesBadKey(t *testing.T) {
	s := open(t)
	f := seed(t, s, 2)
	ctx := context.Background()
	var batch []delivery.NewMessage
	for i := 0; i < 9; i++ {
		batch = append(batch, msg(f, 0, 1, 1, ""))
	}
	res, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: 30 * time.Second, Messages: batch})
	if err != nil {
		t.Fatal(err)
	}
	rec := f.members[1].ID
	var keys []delivery.Key
	for i, r := range res {
		keys = append(keys, delivery.Key{MessageID: r.ID, MemberID: rec})
		if i == 4 {
			keys = append(keys, delivery.Key{MessageID: r.ID, MemberID: nul})
		}
	}
	done, err := s.MarkDelivered(ctx, &delivery.MarkParams{Keys: keys})
	var re *store.RowsError
	if !errors.As(err, &re) || re.Refused() != 1 {
		t.Fatalf("mark with a poisoned key: %v, want a RowsError with one refused key", err)
	}
	for i, e := range re.Errs {
		if (e != nil) != (i == 5) {
			t.Fatalf("key %d error %v; only key 5 is poisoned", i, e)
		}
	}
	if len(done) != len(res) {
		t.Fatalf("%d rows marked, want %d", len(done), len(res))
	}
	depth, _ := s.QueueDepth(ctx)
	if depth != 0 {
		t.Fatalf("queue depth %d after marking every good row", depth)
	}
	// Releasing leases isolates the same way.
	if _, err := s.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "c", Keys: []delivery.Key{{MessageID: 1, MemberID: rec}, {MessageID: 1, MemberID: badUTF8}}}); !errors.As(err, &re) || re.Errs[0] != nil || re.Errs[1] == nil {
		t.Fatalf("release with a poisoned key: %v", err)
	}
}

// An audit batch with poisoned events (NUL in a text column, \u0000 in the
// jsonb metadata, invalid UTF-8): the honest events are written.
func TestInsertAuditIsolatesBadEvents(t *testing.T) {
	s := open(t)
	ctx := context.Background()
	var events []store.AuditEvent
	for i := 0; i < 50; i++ {
		events = append(events, store.AuditEvent{Type: store.EventPeerConnected, Actor: fmt.Sprint("honest-", i)})
	}
	events[7] = store.AuditEvent{MeshID: nul, Type: store.EventHelloRejected}
	events[8] = store.AuditEvent{Type: store.EventHelloRejected, Metadata: map[string]any{"reason": nul}}
	events[33] = store.AuditEvent{Type: store.EventHelloRejected, Actor: badUTF8}
	err := s.InsertAudit(ctx, events)
	var re *store.RowsError
	if !errors.As(err, &re) || re.Refused() != 3 || re.Errs[7] == nil || re.Errs[8] == nil || re.Errs[33] == nil {
		t.Fatalf("audit with poisoned events: %v, want events 7, 8 and 33 refused", err)
	}
	got, err := s.ListAudit(ctx, "", store.EventPeerConnected, 100)
	if err != nil || len(got) != 47 {
		t.Fatalf("%d honest events written (%v), want 47", len(got), err)
	}
	if bad, _ := s.ListAudit(ctx, "", store.EventHelloRejected, 100); len(bad) != 0 {
		t.Fatalf("poisoned events written: %+v", bad)
	}
}

// A hello batch with a poisoned cwd: the other hellos are recorded and
// take their pending hook statuses; the poisoned one fails alone.
func TestAcceptHellosIsolatesBadRow(t *testing.T) {
	s := open(t)
	ctx := context.Background()
	if err := s.AddPendingStatus(ctx, 42, "/w", "working", "", ""); err != nil {
		t.Fatal(err)
	}
	checks := []store.HelloCheck{
		{SigHash: []byte("s0"), PID: 1, Cwd: "/a"},
		{SigHash: []byte("s1"), PID: 2, Cwd: nul},
		{SigHash: []byte("s2"), PID: 42, Cwd: "/w"},
		{SigHash: []byte("s3"), PID: 3, Cwd: "/b", MeshID: badUTF8},
		{SigHash: []byte("s4"), PID: 4, Cwd: "/c"},
	}
	res, err := s.AcceptHellos(ctx, time.Minute, 10*time.Second, checks)
	if err != nil {
		t.Fatalf("a hello batch with a refused row failed whole: %v", err)
	}
	if !store.IsDataError(res[1].Err) || !store.IsDataError(res[3].Err) {
		t.Fatalf("poisoned hellos: %+v %+v", res[1], res[3])
	}
	for _, i := range []int{0, 2, 4} {
		if res[i].Err != nil || !res[i].Fresh {
			t.Fatalf("hello %d: %+v, want fresh", i, res[i])
		}
	}
	if res[2].Pending != "working" {
		t.Fatalf("pending status lost: %+v", res[2])
	}
	// They were recorded: the same signatures again are replays.
	again, err := s.AcceptHellos(ctx, time.Minute, 10*time.Second, []store.HelloCheck{checks[0], checks[2], checks[4]})
	if err != nil || again[0].Fresh || again[1].Fresh || again[2].Fresh {
		t.Fatalf("replays: %+v %v", again, err)
	}
}

// A batch that fails because Postgres is away is not split: the error is
// returned whole (nothing committed) and the caller reports it as
// unavailable.
func TestBatchUnavailableNotSplit(t *testing.T) {
	s := open(t)
	f := seed(t, s, 2)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	batch := []delivery.NewMessage{msg(f, 0, 1, 1, ""), msg(f, 0, 1, 1, "")}
	batch[1].Ciphertext = nul
	if _, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: time.Second, Messages: batch}); err == nil || store.IsDataError(err) || !store.IsUnavailable(err) {
		t.Fatalf("insert with a cancelled context: %v, want an unavailable error", err)
	}
	if err := s.InsertAudit(ctx, []store.AuditEvent{{Type: "a"}, {Type: "b", Actor: nul}}); err == nil || !store.IsUnavailable(err) {
		t.Fatalf("audit with a cancelled context: %v", err)
	}
	var re *store.RowsError
	if _, err := s.MarkDelivered(ctx, &delivery.MarkParams{Keys: []delivery.Key{{MessageID: 1, MemberID: nul}}}); errors.As(err, &re) || !store.IsUnavailable(err) {
		t.Fatalf("mark with a cancelled context: %v", err)
	}
}
