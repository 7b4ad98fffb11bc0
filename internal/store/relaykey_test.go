package store_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/store"
)

// Nodes starting together on one database agree on one relay key, and
// envelopes the insert seals with it (non-ASCII text included) verify on
// the receiving side.
func TestRelayKeySealsEnvelopes(t *testing.T) {
	ctx := context.Background()
	url := pgtest.NewDB(t)
	stores := make([]*store.Store, 4)
	for i := range stores {
		s, err := store.Open(ctx, url, 4)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		stores[i] = s
	}
	keys := make([][]byte, len(stores))
	var wg sync.WaitGroup
	for i, s := range stores {
		wg.Go(func() {
			k, err := s.RelayKey(ctx)
			if err != nil {
				t.Error(err)
			}
			keys[i] = k
		})
	}
	wg.Wait()
	for _, k := range keys[1:] {
		if len(k) < 32 || !bytes.Equal(k, keys[0]) {
			t.Fatalf("nodes got different relay keys: %x", keys)
		}
	}

	s := stores[0]
	key, err := relay.NewEnvelopeKey(keys[0])
	if err != nil {
		t.Fatal(err)
	}
	s.SetEnvelopeKey(key.Pads())
	f := seed(t, s, 2)
	lc, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close(context.Background()) })
	if _, err := lc.Exec(ctx, "LISTEN ch"); err != nil {
		t.Fatal(err)
	}
	m := msg(f, 0, 1, 1, "")
	m.Recipients[0].LeaseConn, m.Recipients[0].LeaseNode = "c1", "x#1"
	prefix := relay.EnvelopePrefix(time.Now())
	pending, ok := relay.NewPending("ch", prefix, &relay.Envelope{Node: "x#1", Presence: "p", Conn: "c1", MeshID: f.mesh.ID,
		MemberID: f.members[1].ID, Priority: 1, SenderName: "Zoë <ops> & \"co\" 日本", Ciphertext: "c"})
	if !ok {
		t.Fatal("envelope does not fit")
	}
	res, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "self#1", Lease: 30 * time.Second, Messages: []delivery.NewMessage{m}, Envelopes: []delivery.EnvelopeNotify{{Ord: 0, Pending: pending}}})
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	n, err := lc.WaitForNotification(wctx)
	if err != nil {
		t.Fatal(err)
	}
	// The format has one home: what Postgres completed is what the Go
	// twin (for queues that are not Postgres) completes.
	if want := relay.CompleteEnvelope(pending, res[0].ID, res[0].CreatedAt, key); n.Payload != want {
		t.Fatalf("Postgres notified\n%s\nrelay.CompleteEnvelope makes\n%s", n.Payload, want)
	}
	_, e, err := relay.DecodeEnvelope(n.Payload, key)
	if err != nil {
		t.Fatalf("the insert's envelope does not verify: %v\n%s", err, n.Payload)
	}
	if e.MessageID != res[0].ID || !e.CreatedAt.Equal(res[0].CreatedAt) || e.SenderName != "Zoë <ops> & \"co\" 日本" {
		t.Fatalf("decoded %+v, inserted %+v", e, res[0])
	}
	other, _ := relay.NewEnvelopeKey(relay.DeriveEnvelopeKey("some other cluster secret"))
	if _, _, err := relay.DecodeEnvelope(n.Payload, other); err == nil {
		t.Fatal("the envelope verifies under another key")
	}
}
