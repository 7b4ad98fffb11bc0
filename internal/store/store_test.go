package store_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/relay"
	"github.com/claudemesh/broker/internal/store"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func open(t *testing.T) *store.Store {
	t.Helper()
	s, err := store.Open(context.Background(), pgtest.NewDB(t), 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

type fixture struct {
	mesh    store.Mesh
	members []store.Member
}

func seed(t *testing.T, s *store.Store, n int) fixture {
	t.Helper()
	ctx := context.Background()
	m, err := s.CreateMesh(ctx, store.Mesh{Name: "m", Slug: fmt.Sprintf("m-%d", time.Now().UnixNano()), OwnerPubkey: fmt.Sprintf("%064x", 1)})
	if err != nil {
		t.Fatal(err)
	}
	f := fixture{mesh: m}
	for i := 0; i < n; i++ {
		mem, err := s.AddMember(ctx, store.Member{MeshID: m.ID, Pubkey: fmt.Sprintf("%064x", i+10), DisplayName: fmt.Sprintf("p%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		f.members = append(f.members, mem)
	}
	return f
}

func msg(f fixture, from, to int, prio int16, cmid string) delivery.NewMessage {
	return delivery.NewMessage{
		MeshID: f.mesh.ID, SenderMemberID: f.members[from].ID, SenderPubkey: f.members[from].Pubkey,
		SenderName: f.members[from].DisplayName, TargetSpec: f.members[to].Pubkey, Priority: prio,
		Nonce: "n", Ciphertext: "c", ClientMessageID: cmid,
		Recipients: []delivery.NewRecipient{{MemberID: f.members[to].ID}},
	}
}

func TestInsertOrderAndIdempotency(t *testing.T) {
	s := open(t)
	f := seed(t, s, 2)
	ctx := context.Background()
	batch := []delivery.NewMessage{msg(f, 0, 1, 1, ""), msg(f, 0, 1, 1, "k1"), msg(f, 0, 1, 1, "")}
	res, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: 30 * time.Second, Messages: batch})
	if err != nil {
		t.Fatal(err)
	}
	if !(res[0].ID < res[1].ID && res[1].ID < res[2].ID) {
		t.Fatalf("ids not in batch order: %+v", res)
	}
	again, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: 30 * time.Second, Messages: []delivery.NewMessage{msg(f, 0, 1, 1, "k1")}})
	if err != nil {
		t.Fatal(err)
	}
	if !again[0].Duplicate || again[0].ID != res[1].ID {
		t.Fatalf("duplicate client_message_id: got %+v, want id %d duplicate", again[0], res[1].ID)
	}
	got, err := s.Claim(ctx, &delivery.ClaimParams{Node: "n#1", Lease: 30 * time.Second, Requests: []delivery.ClaimRequest{{MemberID: f.members[1].ID, Conn: "c1", MaxPriority: 2, Limit: 100}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("claimed %d rows, want 3 (the duplicate must not be queued twice)", len(got))
	}
	for i := 1; i < len(got); i++ {
		if got[i-1].MessageID >= got[i].MessageID {
			t.Fatalf("claim not ordered by message id")
		}
	}
}

// Eight claimers race over 1,000 rows: every row is claimed exactly once.
func TestConcurrentClaimersDisjoint(t *testing.T) {
	s := open(t)
	f := seed(t, s, 2)
	ctx := context.Background()
	const total = 1000
	batch := make([]delivery.NewMessage, 0, 100)
	for i := 0; i < total; i++ {
		batch = append(batch, msg(f, 0, 1, 0, ""))
		if len(batch) == 100 {
			if _, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: 30 * time.Second, Messages: batch}); err != nil {
				t.Fatal(err)
			}
			batch = batch[:0]
		}
	}
	var mu sync.Mutex
	seen := map[int64]int{}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for {
				got, err := s.Claim(ctx, &delivery.ClaimParams{Node: "n#1", Lease: time.Minute, Requests: []delivery.ClaimRequest{{MemberID: f.members[1].ID, Conn: fmt.Sprintf("w%d", w), MaxPriority: 2, Limit: 7}}})
				if err != nil {
					errs <- err
					return
				}
				if len(got) == 0 {
					return
				}
				mu.Lock()
				for _, d := range got {
					seen[d.MessageID]++
				}
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if len(seen) != total {
		t.Fatalf("claimed %d distinct rows, want %d", len(seen), total)
	}
	for id, n := range seen {
		if n != 1 {
			t.Fatalf("message %d claimed %d times", id, n)
		}
	}
}

func TestLeaseReleaseDeliverExpire(t *testing.T) {
	s := open(t)
	f := seed(t, s, 2)
	ctx := context.Background()
	res, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: 30 * time.Second, Messages: []delivery.NewMessage{msg(f, 0, 1, 2, ""), msg(f, 0, 1, 0, "")}})
	if err != nil {
		t.Fatal(err)
	}
	rec := f.members[1].ID
	// A working session (max priority now) gets only the "now" message.
	got, err := s.Claim(ctx, &delivery.ClaimParams{Node: "n#1", Lease: 30 * time.Second, Requests: []delivery.ClaimRequest{{MemberID: rec, Conn: "c1", MaxPriority: 0, Limit: 10}}})
	if err != nil || len(got) != 1 || got[0].MessageID != res[1].ID {
		t.Fatalf("gated claim: %v %+v", err, got)
	}
	// Leased: nobody else can claim it until released.
	again, _ := s.Claim(ctx, &delivery.ClaimParams{Node: "n#1", Lease: 30 * time.Second, Requests: []delivery.ClaimRequest{{MemberID: rec, Conn: "c2", MaxPriority: 2, Limit: 10}}})
	if len(again) != 1 || again[0].MessageID != res[0].ID {
		t.Fatalf("second claim should get only the low message: %+v", again)
	}
	n, err := s.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "c1", Keys: []delivery.Key{{MessageID: res[1].ID, MemberID: rec}}})
	if err != nil || n != 1 {
		t.Fatalf("release: %v %d", err, n)
	}
	third, _ := s.Claim(ctx, &delivery.ClaimParams{Node: "n#1", Lease: 30 * time.Second, Requests: []delivery.ClaimRequest{{MemberID: rec, Conn: "c3", MaxPriority: 2, Limit: 10}}})
	if len(third) != 1 || third[0].MessageID != res[1].ID || third[0].Attempts != 2 {
		t.Fatalf("released row not reclaimed: %+v", third)
	}
	done, err := s.MarkDelivered(ctx, &delivery.MarkParams{Keys: []delivery.Key{{MessageID: res[1].ID, MemberID: rec}, {MessageID: res[1].ID, MemberID: rec}}})
	if err != nil || len(done) != 1 {
		t.Fatalf("mark delivered: %v %+v", err, done)
	}
	// Node-wide release frees c2's lease on the low message.
	members, err := s.ReleaseNodeLeases(ctx, &delivery.ReleaseNodeParams{Pattern: "n#%", Keep: "n#2"})
	if err != nil || len(members) != 1 || members[0].MemberID != rec || members[0].MeshID != f.mesh.ID {
		t.Fatalf("node release: %v %v", err, members)
	}
	// Expiry: a message with a zero TTL is due in any later transaction.
	short, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: 0, LeaseNode: "n#1", Lease: time.Second, Messages: []delivery.NewMessage{msg(f, 1, 0, 1, "")}})
	if err != nil {
		t.Fatal(err)
	}
	exp, err := s.ExpireDue(ctx, &delivery.ExpireParams{Limit: 100})
	if err != nil || len(exp) != 1 || exp[0].MessageID != short[0].ID {
		t.Fatalf("expire: %v %+v", err, exp)
	}
	info, err := s.MessageStatus(ctx, f.mesh.ID, res[1].ID)
	if err != nil || len(info.Recipients) != 1 || !info.Recipients[0].Delivered {
		t.Fatalf("status: %v %+v", err, info)
	}
	depth, _ := s.QueueDepth(ctx)
	if depth != 1 {
		t.Fatalf("queue depth %d, want 1", depth)
	}
	if n, err := s.Purge(ctx, 0, 100); err != nil || n != 2 {
		t.Fatalf("purge: %v %d (want the delivered and the expired message)", err, n)
	}
}

func TestHelloReplayAndPending(t *testing.T) {
	s := open(t)
	ctx := context.Background()
	if err := s.AddPendingStatus(ctx, 42, "/w", "working", "", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.AddPendingStatus(ctx, 7, "/signed", "dnd", "mesh", "other-pk"); err != nil {
		t.Fatal(err)
	}
	res, err := s.AcceptHellos(ctx, time.Minute, 10*time.Second, []store.HelloCheck{
		{SigHash: []byte("sig1"), PID: 42, Cwd: "/w", MeshID: "mesh", Pubkey: "pk"},
		{SigHash: []byte("sig2"), PID: 7, Cwd: "/signed", MeshID: "mesh", Pubkey: "pk"},
		{SigHash: []byte("sig3"), PID: 1, Cwd: "/none", MeshID: "mesh", Pubkey: "pk"},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []store.HelloResult{{Fresh: true, Pending: "working"}, {Fresh: true}, {Fresh: true}}
	if len(res) != 3 || res[0] != want[0] || res[1] != want[1] || res[2] != want[2] {
		t.Fatalf("got %+v, want %+v (a signed hook's status is only for its signer)", res, want)
	}
	res, err = s.AcceptHellos(ctx, time.Minute, 10*time.Second, []store.HelloCheck{
		{SigHash: []byte("sig1"), PID: 42, Cwd: "/w"}, {SigHash: []byte("sig4"), PID: 42, Cwd: "/w"},
	})
	if err != nil || res[0].Fresh || !res[1].Fresh || res[1].Pending != "" {
		t.Fatalf("replay batch: %+v %v", res, err)
	}
}

func TestDeleteMesh(t *testing.T) {
	s := open(t)
	f := seed(t, s, 2)
	ctx := context.Background()
	if _, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "n#1", Lease: time.Second, Messages: []delivery.NewMessage{msg(f, 0, 1, 1, "")}}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteMesh(ctx, f.mesh.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetMesh(ctx, f.mesh.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("mesh still there: %v", err)
	}
	if n, _ := s.QueueDepth(ctx); n != 0 {
		t.Fatalf("queue depth %d after delete", n)
	}
	if err := s.DeleteMesh(ctx, f.mesh.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
}

func TestPurgeAudit(t *testing.T) {
	s := open(t)
	ctx := context.Background()
	old := time.Now().Add(-48 * time.Hour)
	if err := s.InsertAudit(ctx, []store.AuditEvent{{Type: "a", CreatedAt: old}, {Type: "b", CreatedAt: old}, {Type: "c"}}); err != nil {
		t.Fatal(err)
	}
	n, err := s.PurgeAudit(ctx, 24*time.Hour, 100)
	if err != nil || n != 2 {
		t.Fatalf("purged %d, %v; want the 2 old events", n, err)
	}
	left, _ := s.ListAudit(ctx, "", "", 10)
	if len(left) != 1 || left[0].Type != "c" {
		t.Fatalf("left %+v", left)
	}
}

// The remote fast path: rows leased in the insert to another node's
// session travel whole in envelope notifications, ahead of the batch's
// wake-ups and in batch order; only that node's claims may take them
// while nobody has, and they tell the claimer who held them.
func TestRemoteLeaseEnvelopes(t *testing.T) {
	ctx := context.Background()
	url := pgtest.NewDB(t)
	s, err := store.Open(ctx, url, 8)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	f := seed(t, s, 2)

	lc, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close(context.Background()) })
	if _, err := lc.Exec(ctx, "LISTEN ch"); err != nil {
		t.Fatal(err)
	}

	remote := func(m delivery.NewMessage) delivery.NewMessage {
		m.Recipients = []delivery.NewRecipient{{MemberID: m.Recipients[0].MemberID, LeaseConn: "c1", LeaseNode: "x#1"}}
		return m
	}
	batch := []delivery.NewMessage{msg(f, 0, 1, 1, ""), remote(msg(f, 0, 1, 1, "")), remote(msg(f, 0, 1, 1, "k"))}
	envs := []delivery.EnvelopeNotify{{Ord: 1, Pending: relay.Pending{Channel: "ch", Prefix: "A ", Suffix: "|one"}}, {Ord: 2, Pending: relay.Pending{Channel: "ch", Prefix: "B ", Suffix: "|two"}}}
	res, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "self#1", Lease: 30 * time.Second, Messages: batch, WakeChannels: []string{"ch"}, WakePayloads: []string{"wake"}, Envelopes: envs})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		fmt.Sprintf("A %d %d|one", res[1].ID, res[1].CreatedAt.UnixMicro()),
		fmt.Sprintf("B %d %d|two", res[2].ID, res[2].CreatedAt.UnixMicro()),
		"wake",
	}
	for i, w := range want {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		n, err := lc.WaitForNotification(wctx)
		cancel()
		if err != nil {
			t.Fatalf("notification %d: %v", i, err)
		}
		if n.Payload != w {
			t.Fatalf("notification %d = %q, want %q", i, n.Payload, w)
		}
	}

	// A duplicate client_message_id inserts nothing and notifies nothing.
	again, err := s.InsertMessages(ctx, &delivery.InsertParams{TTL: time.Hour, LeaseNode: "self#1", Lease: 30 * time.Second, Messages: []delivery.NewMessage{remote(msg(f, 0, 1, 1, "k"))}, Envelopes: []delivery.EnvelopeNotify{{Ord: 0, Pending: relay.Pending{Channel: "ch", Prefix: "C ", Suffix: ""}}}})
	if err != nil || !again[0].Duplicate {
		t.Fatalf("duplicate: %+v %v", again, err)
	}
	if _, err := lc.Exec(ctx, "NOTIFY ch, 'marker'"); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	n, err := lc.WaitForNotification(wctx)
	cancel()
	if err != nil || n.Payload != "marker" {
		t.Fatalf("after a duplicate: %v %v", n, err)
	}

	member := f.members[1].ID
	claim := func(node, conn string) []delivery.Delivery {
		t.Helper()
		rows, err := s.Claim(ctx, &delivery.ClaimParams{Node: node, Lease: 30 * time.Second, Requests: []delivery.ClaimRequest{{MemberID: member, Conn: conn, MaxPriority: 2, Limit: 10}}})
		if err != nil {
			t.Fatal(err)
		}
		return rows
	}
	// Another node gets only the unleased row.
	if rows := claim("y#1", "cy"); len(rows) != 1 || rows[0].MessageID != res[0].ID || rows[0].PrevConn != "" {
		t.Fatalf("other node claimed %+v", rows)
	}
	// The lease's node takes the two rows nobody has pushed, for any of
	// its sessions, learning that c1 held them.
	rows := claim("x#1", "c2")
	if len(rows) != 2 || rows[0].MessageID != res[1].ID || rows[1].MessageID != res[2].ID ||
		rows[0].PrevConn != "c1" || rows[0].Conn != "c2" || rows[0].Attempts != 1 {
		t.Fatalf("lease node claimed %+v", rows)
	}
	// Once claimed, a row is leased like any other.
	if rows := claim("x#1", "c2"); len(rows) != 0 {
		t.Fatalf("claimed twice: %+v", rows)
	}
}
