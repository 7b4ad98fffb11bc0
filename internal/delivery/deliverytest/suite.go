package deliverytest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/relay"
)

// Harness is one Queue under test and what the suite needs around it.
type Harness struct {
	Queue delivery.Queue
	// Key is the key the queue seals envelopes with.
	Key *relay.EnvelopeKey
	// Members enrols n members of a new mesh.
	Members func(t *testing.T, n int) (mesh string, members []string)
	// Listen subscribes to a notification channel; it is subscribed when
	// Listen returns, and stops when the test ends.
	Listen func(t *testing.T, channel string) <-chan string
}

// RunQueueSuite runs the cases every delivery.Queue must pass: the rules
// the engine relies on, the same for Postgres and for memory.
func RunQueueSuite(t *testing.T, newHarness func(t *testing.T) *Harness) {
	cases := []struct {
		name string
		run  func(t *testing.T, h *Harness)
	}{
		{"ClaimOrderPriorityLimit", claimOrderPriorityLimit},
		{"Idempotency", idempotency},
		{"RefusedRowsFailAlone", refusedRowsFailAlone},
		{"LocalLeaseAndRelease", localLeaseAndRelease},
		{"RemoteLease", remoteLease},
		{"ExpiredLease", expiredLease},
		{"MarkDelivered", markDelivered},
		{"RefusedKeys", refusedKeys},
		{"NodeLeases", nodeLeases},
		{"TakeOverFencing", takeOverFencing},
		{"Expiry", expiry},
		{"Notifications", notifications},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.run(t, newHarness(t)) })
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func newMessage(mesh, from, to string, prio int16, body, cmid string) delivery.NewMessage {
	return delivery.NewMessage{MeshID: mesh, SenderMemberID: from, SenderPubkey: "pk-" + from, SenderName: "name " + from,
		TargetSpec: "spec-" + to, Priority: prio, Nonce: "nonce", Ciphertext: body, ClientMessageID: cmid,
		Recipients: []delivery.NewRecipient{{MemberID: to}}}
}

func insert(t *testing.T, q delivery.Queue, p *delivery.InsertParams) []delivery.Inserted {
	t.Helper()
	if p.TTL == 0 {
		p.TTL = time.Hour
	}
	if p.LeaseNode == "" {
		p.LeaseNode = "n#1"
	}
	if p.Lease == 0 {
		p.Lease = time.Hour
	}
	res, err := q.InsertMessages(ctxT(t), p)
	if err != nil {
		t.Fatalf("insert: %v", err)
	}
	if len(res) != len(p.Messages) {
		t.Fatalf("%d results for %d messages", len(res), len(p.Messages))
	}
	return res
}

func claim(t *testing.T, q delivery.Queue, node string, reqs ...delivery.ClaimRequest) []delivery.Delivery {
	t.Helper()
	for i := range reqs {
		if reqs[i].Limit == 0 {
			reqs[i].Limit = 100
		}
	}
	rows, err := q.Claim(ctxT(t), &delivery.ClaimParams{Node: node, Lease: time.Hour, Requests: reqs})
	if err != nil {
		t.Fatalf("claim: %v", err)
	}
	return rows
}

func ids(rows []delivery.Delivery) []int64 {
	out := make([]int64, len(rows))
	for i, r := range rows {
		out[i] = r.MessageID
	}
	return out
}

// Rows come back by recipient then message id, in batch order, with their
// envelope; a claim takes only priorities up to its bound, at most its
// limit, and leases what it took.
func claimOrderPriorityLimit(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 3)
	prios := []int16{1, 2, 1, 0, 1}
	var msgs []delivery.NewMessage
	for i, p := range prios {
		msgs = append(msgs, newMessage(mesh, m[0], m[1], p, fmt.Sprint("body", i), ""))
	}
	msgs = append(msgs, newMessage(mesh, m[0], m[2], 1, "to c", "cm-c"))
	res := insert(t, q, &delivery.InsertParams{Messages: msgs})
	for i := 1; i < len(res); i++ {
		if res[i].ID <= res[i-1].ID || res[i].Err != nil {
			t.Fatalf("ids not in batch order: %+v", res)
		}
	}
	if got := ids(claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c", MaxPriority: 0})); !slices.Equal(got, []int64{res[3].ID}) {
		t.Fatalf("priority 0 claim got %v, want only %d", got, res[3].ID)
	}
	first := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c1", MaxPriority: 1, Limit: 2})
	if got := ids(first); !slices.Equal(got, []int64{res[0].ID, res[2].ID}) {
		t.Fatalf("limited claim got %v", got)
	}
	rows := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[2], Conn: "c2", MaxPriority: 2}, delivery.ClaimRequest{MemberID: m[1], Conn: "c1", MaxPriority: 2})
	want := []int64{res[1].ID, res[4].ID, res[5].ID}
	if m[2] < m[1] {
		want = []int64{res[5].ID, res[1].ID, res[4].ID}
	}
	if got := ids(rows); !slices.Equal(got, want) {
		t.Fatalf("claim got %v, want %v (by recipient, then id)", got, want)
	}
	for _, d := range rows {
		if d.MemberID == m[2] {
			if d.Conn != "c2" || d.Attempts != 1 || d.PrevConn != "" || d.MeshID != mesh || d.SenderMemberID != m[0] ||
				d.SenderPubkey != "pk-"+m[0] || d.SenderName != "name "+m[0] || d.TargetSpec != "spec-"+m[2] ||
				d.Priority != 1 || d.Nonce != "nonce" || d.Ciphertext != "to c" || d.ClientMessageID != "cm-c" ||
				!d.CreatedAt.Equal(res[5].CreatedAt) {
				t.Fatalf("claimed row %+v does not carry what was inserted (%+v)", d, res[5])
			}
		}
	}
	if again := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c3", MaxPriority: 2}); len(again) != 0 {
		t.Fatalf("leased rows claimed again: %v", ids(again))
	}
}

// A client_message_id is committed once per sender: sent again, in a later
// batch or the same one, it is a duplicate of the first.
func idempotency(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	res := insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{
		newMessage(mesh, m[0], m[1], 1, "a", "k"), newMessage(mesh, m[0], m[1], 1, "a again", "k"),
		newMessage(mesh, m[1], m[0], 1, "other sender", "k")}})
	if res[0].Duplicate || !res[1].Duplicate || res[1].ID != res[0].ID || res[2].Duplicate {
		t.Fatalf("same batch: %+v", res)
	}
	again := insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{newMessage(mesh, m[0], m[1], 1, "later", "k")}})
	if !again[0].Duplicate || again[0].ID != res[0].ID || !again[0].CreatedAt.Equal(res[0].CreatedAt) {
		t.Fatalf("later batch: %+v, first %+v", again[0], res[0])
	}
	rows := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c", MaxPriority: 2})
	if len(rows) != 1 || rows[0].Ciphertext != "a" {
		t.Fatalf("rows for the duplicates: %+v", rows)
	}
}

const (
	nul     = "bad\x00row"
	badUTF8 = "bad\xffrow"
)

// Messages the queue refuses fail alone, as bad values; the batch's others
// commit.
func refusedRowsFailAlone(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	msgs := []delivery.NewMessage{newMessage(mesh, m[0], m[1], 1, "ok0", ""), newMessage(mesh, m[0], m[1], 1, nul, ""),
		newMessage(mesh, m[0], m[1], 1, "ok2", ""), newMessage(mesh, m[0], m[1], 1, "ok3", "")}
	msgs[2].Nonce = badUTF8
	res := insert(t, q, &delivery.InsertParams{Messages: msgs})
	for _, i := range []int{1, 2} {
		if !errors.Is(res[i].Err, delivery.ErrBadValue) || !errors.Is(res[i].Err, delivery.ErrRefused) || errors.Is(res[i].Err, delivery.ErrUnavailable) {
			t.Fatalf("poisoned message %d: %+v, want a bad value", i, res[i])
		}
	}
	if res[0].Err != nil || res[3].Err != nil || res[3].ID <= res[0].ID {
		t.Fatalf("good messages: %+v %+v", res[0], res[3])
	}
	if got := ids(claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c", MaxPriority: 2})); !slices.Equal(got, []int64{res[0].ID, res[3].ID}) {
		t.Fatalf("claimed %v", got)
	}
}

// A local fast-path row is leased to its connection (attempts 1): no claim
// takes it until the connection releases it; only its holder can.
func localLeaseAndRelease(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	msg := newMessage(mesh, m[0], m[1], 1, "fast", "")
	msg.Recipients[0].LeaseConn = "c1"
	res := insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{msg}, LeaseNode: "n#1"})
	if rows := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c2", MaxPriority: 2}); len(rows) != 0 {
		t.Fatalf("a leased fast-path row was claimed: %+v", rows)
	}
	k := delivery.Key{MessageID: res[0].ID, MemberID: m[1]}
	ctx := ctxT(t)
	if n, err := q.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "c2", Keys: []delivery.Key{k}}); err != nil || n != 0 {
		t.Fatalf("another connection released the lease: %d %v", n, err)
	}
	if n, err := q.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "c1", Keys: []delivery.Key{k, k}}); err != nil || n != 1 {
		t.Fatalf("release by the holder: %d %v", n, err)
	}
	rows := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c2", MaxPriority: 2})
	if len(rows) != 1 || rows[0].Attempts != 2 || rows[0].PrevConn != "" || rows[0].Conn != "c2" {
		t.Fatalf("released row claimed as %+v", rows)
	}
}

// A remote fast-path row (leased to a session on node r#1, attempts 0) is
// claimable by that node only, once.
func remoteLease(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	msg := newMessage(mesh, m[0], m[1], 1, "remote", "")
	msg.Recipients[0].LeaseConn, msg.Recipients[0].LeaseNode = "rc", "r#1"
	res := insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{msg}})
	if rows := claim(t, q, "x#1", delivery.ClaimRequest{MemberID: m[1], Conn: "xc", MaxPriority: 2}); len(rows) != 0 {
		t.Fatalf("another node claimed a remote fast-path row: %+v", rows)
	}
	rows := claim(t, q, "r#1", delivery.ClaimRequest{MemberID: m[1], Conn: "rc2", MaxPriority: 2})
	if len(rows) != 1 || rows[0].MessageID != res[0].ID || rows[0].PrevConn != "rc" || rows[0].Attempts != 1 {
		t.Fatalf("the lease's node claimed %+v", rows)
	}
	if rows := claim(t, q, "r#1", delivery.ClaimRequest{MemberID: m[1], Conn: "rc3", MaxPriority: 2}); len(rows) != 0 {
		t.Fatalf("claimed twice: %+v", rows)
	}
}

// A lease that has run out makes its row claimable again.
func expiredLease(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	msg := newMessage(mesh, m[0], m[1], 1, "stale", "")
	msg.Recipients[0].LeaseConn = "gone"
	insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{msg}, Lease: -time.Minute})
	rows := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c", MaxPriority: 2})
	if len(rows) != 1 || rows[0].PrevConn != "gone" || rows[0].Attempts != 2 {
		t.Fatalf("row of an expired lease: %+v", rows)
	}
}

// Marking returns what it newly marked, once per row; delivered rows are
// neither claimed nor released.
func markDelivered(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	res := insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{newMessage(mesh, m[0], m[1], 1, "x", ""), newMessage(mesh, m[0], m[1], 1, "y", "")}})
	claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c", MaxPriority: 2})
	k := delivery.Key{MessageID: res[0].ID, MemberID: m[1]}
	ctx := ctxT(t)
	done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Keys: []delivery.Key{k, k, {MessageID: res[0].ID + 1000, MemberID: m[1]}}})
	if err != nil || !slices.Equal(done, []delivery.Key{k}) {
		t.Fatalf("mark: %v %v", done, err)
	}
	if done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Keys: []delivery.Key{k}}); err != nil || len(done) != 0 {
		t.Fatalf("marked twice: %v %v", done, err)
	}
	if n, err := q.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "c", Keys: []delivery.Key{k, {MessageID: res[1].ID, MemberID: m[1]}}}); err != nil || n != 1 {
		t.Fatalf("release of a delivered and an undelivered row: %d %v, want 1", n, err)
	}
	if got := ids(claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c2", MaxPriority: 2})); !slices.Equal(got, []int64{res[1].ID}) {
		t.Fatalf("claimed %v, want only the undelivered row", got)
	}
}

// A key the queue refuses fails alone: the others are marked or released,
// and the error names it.
func refusedKeys(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	res := insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{newMessage(mesh, m[0], m[1], 1, "x", ""), newMessage(mesh, m[0], m[1], 1, "y", "")}})
	claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c", MaxPriority: 2})
	good := delivery.Key{MessageID: res[0].ID, MemberID: m[1]}
	bad := delivery.Key{MessageID: res[0].ID, MemberID: nul}
	ctx := ctxT(t)
	done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Keys: []delivery.Key{good, bad}})
	var re *delivery.RowsError
	if !errors.As(err, &re) || re.Errs[0] != nil || !errors.Is(re.Errs[1], delivery.ErrRefused) || re.Refused() != 1 || !slices.Equal(done, []delivery.Key{good}) {
		t.Fatalf("mark with a bad key: %v %v", done, err)
	}
	other := delivery.Key{MessageID: res[1].ID, MemberID: m[1]}
	n, err := q.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "c", Keys: []delivery.Key{{MessageID: 1, MemberID: badUTF8}, other}})
	if !errors.As(err, &re) || re.Errs[1] != nil || !errors.Is(re.Errs[0], delivery.ErrRefused) || n != 1 {
		t.Fatalf("release with a bad key: %d %v", n, err)
	}
}

// The leases of departed node incarnations go back at once: those
// matching the pattern, but the one kept; LIKE wildcards in a name are
// escaped.
func nodeLeases(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 4)
	var msgs []delivery.NewMessage
	nodes := []string{"n_1#1", "n_1#2", "nx1#1"}
	for i, node := range nodes {
		msg := newMessage(mesh, m[0], m[i+1], 1, node, "")
		msg.Recipients[0].LeaseConn, msg.Recipients[0].LeaseNode = "c", node
		msgs = append(msgs, msg)
	}
	insert(t, q, &delivery.InsertParams{Messages: msgs})
	refs, err := q.ReleaseNodeLeases(ctxT(t), &delivery.ReleaseNodeParams{Pattern: delivery.EscapeLike("n_1#") + "%", Keep: "n_1#2"})
	if err != nil || len(refs) != 1 || refs[0] != (delivery.MemberRef{MeshID: mesh, MemberID: m[1]}) {
		t.Fatalf("released %+v %v, want only %s's", refs, err, m[1])
	}
	req := func(i int) delivery.ClaimRequest {
		return delivery.ClaimRequest{MemberID: m[i], Conn: "new", MaxPriority: 2}
	}
	if rows := claim(t, q, "other#1", req(1), req(2), req(3)); len(rows) != 1 || rows[0].MemberID != m[1] {
		t.Fatalf("claimable after the release: %+v", rows)
	}
}

func takeOver(t *testing.T, q delivery.Queue, node string, keep, conns []string, reqs ...delivery.ClaimRequest) []delivery.Delivery {
	t.Helper()
	for i := range reqs {
		if reqs[i].Limit == 0 {
			reqs[i].Limit = 100
		}
	}
	rows, err := q.TakeOver(ctxT(t), &delivery.TakeOverParams{
		ClaimParams: delivery.ClaimParams{Node: node, Lease: time.Hour, Requests: reqs}, Keep: keep, Conns: conns})
	if err != nil {
		t.Fatalf("take over: %v", err)
	}
	return rows
}

// A takeover leases what a claim would, plus the rows under live leases of
// node incarnations not kept and of connections given up, never the
// claimer's own; in order, up to the limit and priority. The old holders
// are fenced out: they can no longer claim, release or mark those rows,
// while the new holder can; a taker that is not kept in turn is taken
// over.
func takeOverFencing(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	type lease struct{ conn, node string }
	leases := []lease{
		{"dead", "d#1"},  // 0: remote fast path to a node not kept: taken
		{"live", "a#1"},  // 1: a kept node's session: stays
		{"moved", "a#1"}, // 2: a kept node, but a connection given up: taken
		{},               // 3: not leased: taken, as a claim would
		{"mine", ""},     // 4: the taker's own local lease (n#1): stays
		{"dead", "d#1"},  // 5: priority 2, over the request's bound: stays
		{"dead", "d#1"},  // 6: beyond the limit: stays
	}
	var msgs []delivery.NewMessage
	for i, l := range leases {
		prio := int16(1)
		if i == 5 {
			prio = 2
		}
		msg := newMessage(mesh, m[0], m[1], prio, fmt.Sprint("row", i), "")
		msg.Recipients[0].LeaseConn, msg.Recipients[0].LeaseNode = l.conn, l.node
		msgs = append(msgs, msg)
	}
	res := insert(t, q, &delivery.InsertParams{Messages: msgs, LeaseNode: "n#1"})
	key := func(i int) delivery.Key { return delivery.Key{MessageID: res[i].ID, MemberID: m[1]} }
	req := delivery.ClaimRequest{MemberID: m[1], Conn: "new", MaxPriority: 1, Limit: 3}
	if rows := claim(t, q, "n#1", req); len(rows) != 1 || rows[0].MessageID != res[3].ID {
		t.Fatalf("a plain claim took %v, want only the unleased row", ids(rows))
	}
	if n, err := q.ReleaseLeases(ctxT(t), &delivery.ReleaseParams{Conn: "new", Keys: []delivery.Key{key(3)}}); err != nil || n != 1 {
		t.Fatalf("release: %d %v", n, err)
	}
	got := takeOver(t, q, "n#1", []string{"a#1", "n#1"}, []string{"moved"}, req)
	if !slices.Equal(ids(got), []int64{res[0].ID, res[2].ID, res[3].ID}) {
		t.Fatalf("took over %v, want rows 0, 2, 3 (%d, %d, %d)", ids(got), res[0].ID, res[2].ID, res[3].ID)
	}
	wantPrev := []string{"dead", "moved", ""}
	wantTries := []int32{1, 1, 2}
	for i, d := range got {
		if d.Conn != "new" || d.PrevConn != wantPrev[i] || d.Attempts != wantTries[i] || d.Ciphertext != fmt.Sprint("row", []int{0, 2, 3}[i]) {
			t.Fatalf("taken row %d: %+v", i, d)
		}
	}
	if rows := takeOver(t, q, "n#1", []string{"a#1", "n#1"}, []string{"moved"}, req); len(rows) != 1 || rows[0].MessageID != res[6].ID {
		t.Fatalf("second takeover took %v, want only row 6 (the limit's)", ids(rows))
	}
	// The old holders are fenced out.
	ctx := ctxT(t)
	if rows := claim(t, q, "d#1", delivery.ClaimRequest{MemberID: m[1], Conn: "dead", MaxPriority: 2}); len(rows) != 1 || rows[0].MessageID != res[5].ID {
		t.Fatalf("the old node claimed %v, want only row 5 (never taken)", ids(rows))
	}
	if n, err := q.ReleaseLeases(ctx, &delivery.ReleaseParams{Conn: "dead", Keys: []delivery.Key{key(0)}}); err != nil || n != 0 {
		t.Fatalf("the old connection released a taken row: %d %v", n, err)
	}
	if done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Node: "d#1", Keys: []delivery.Key{key(0), key(6)}}); err != nil || len(done) != 0 {
		t.Fatalf("the old node marked taken rows: %v %v", done, err)
	}
	if done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Node: "a#1", Keys: []delivery.Key{key(2), key(1)}}); err != nil || !slices.Equal(done, []delivery.Key{key(1)}) {
		t.Fatalf("a#1 marked %v, want only its own row 1", done)
	}
	if done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Node: "n#1", Keys: []delivery.Key{key(0)}}); err != nil || !slices.Equal(done, []delivery.Key{key(0)}) {
		t.Fatalf("the new holder marked %v %v", done, err)
	}
	// n#1 in turn not kept: b#1 takes what n#1 holds (not its marked row).
	again := takeOver(t, q, "b#1", []string{"a#1"}, nil, delivery.ClaimRequest{MemberID: m[1], Conn: "b", MaxPriority: 1})
	if !slices.Equal(ids(again), []int64{res[2].ID, res[3].ID, res[4].ID, res[6].ID}) {
		t.Fatalf("b#1 took %v, want rows 2, 3, 4, 6", ids(again))
	}
	if done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Node: "n#1", Keys: []delivery.Key{key(3)}}); err != nil || len(done) != 0 {
		t.Fatalf("n#1 marked a row b#1 took: %v %v", done, err)
	}
	if done, err := q.MarkDelivered(ctx, &delivery.MarkParams{Keys: []delivery.Key{key(3)}}); err != nil || len(done) != 1 {
		t.Fatalf("an unfenced mark: %v %v", done, err)
	}
}

// Rows past their message's TTL are expired once, with their mesh, and
// are no longer claimable.
func expiry(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	res := insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{newMessage(mesh, m[0], m[1], 1, "old", "")}, TTL: -time.Second})
	insert(t, q, &delivery.InsertParams{Messages: []delivery.NewMessage{newMessage(mesh, m[0], m[1], 1, "fresh", "")}})
	ctx := ctxT(t)
	exp, err := q.ExpireDue(ctx, &delivery.ExpireParams{Limit: 100})
	want := delivery.Expired{Key: delivery.Key{MessageID: res[0].ID, MemberID: m[1]}, MeshID: mesh}
	if err != nil || len(exp) != 1 || exp[0] != want {
		t.Fatalf("expired %+v %v, want %+v", exp, err, want)
	}
	if exp, _ := q.ExpireDue(ctx, &delivery.ExpireParams{Limit: 100}); len(exp) != 0 {
		t.Fatalf("expired twice: %+v", exp)
	}
	if rows := claim(t, q, "n#1", delivery.ClaimRequest{MemberID: m[1], Conn: "c", MaxPriority: 2}); len(rows) != 1 || rows[0].Ciphertext != "fresh" {
		t.Fatalf("claimable: %+v", rows)
	}
}

// Envelopes go out completed and sealed as their rows commit, in batch
// order and before the wake-ups; a duplicate or refused message sends
// none.
func notifications(t *testing.T, h *Harness) {
	q := h.Queue
	mesh, m := h.Members(t, 2)
	const ch = "cm_test_notify"
	got := h.Listen(t, ch)
	prefix := relay.EnvelopePrefix(time.Now())
	var msgs []delivery.NewMessage
	var envs []delivery.EnvelopeNotify
	for i, body := range []string{"first", "dup", nul, "last"} {
		msg := newMessage(mesh, m[0], m[1], 1, body, "")
		if body == "dup" {
			msg.ClientMessageID = "same"
		}
		msg.Recipients[0].LeaseConn, msg.Recipients[0].LeaseNode = "rc", "r#1"
		p, ok := relay.NewPending(ch, prefix, &relay.Envelope{Node: "r#1", Presence: "p", Conn: "rc", MeshID: mesh,
			MemberID: m[1], Priority: 1, SenderMemberID: m[0], SenderName: "Zoë <ops> & \"co\"", Ciphertext: body})
		if !ok {
			t.Fatal("envelope does not fit")
		}
		msgs = append(msgs, msg)
		envs = append(envs, delivery.EnvelopeNotify{Ord: i, Pending: p})
	}
	insert(t, q, &delivery.InsertParams{Messages: msgs[1:2], Envelopes: []delivery.EnvelopeNotify{{Ord: 0, Pending: envs[1].Pending}}})
	next := func() string {
		t.Helper()
		select {
		case p := <-got:
			return p
		case <-time.After(10 * time.Second):
			t.Fatal("no notification")
			return ""
		}
	}
	next() // the first "dup"
	for i := range envs {
		envs[i].Ord = i
	}
	res := insert(t, q, &delivery.InsertParams{Messages: msgs, Envelopes: envs, WakeChannels: []string{ch}, WakePayloads: []string{"wake"}})
	if !res[1].Duplicate || res[2].Err == nil {
		t.Fatalf("results %+v", res)
	}
	for _, i := range []int{0, 3} {
		p := next()
		if want := relay.CompleteEnvelope(envs[i].Pending, res[i].ID, res[i].CreatedAt, h.Key); p != want {
			t.Fatalf("envelope %d:\n%s\nwant\n%s", i, p, want)
		}
		_, e, err := relay.DecodeEnvelope(p, h.Key)
		if err != nil || e.MessageID != res[i].ID || e.Ciphertext != msgs[i].Ciphertext || !e.CreatedAt.Equal(res[i].CreatedAt) {
			t.Fatalf("envelope %d decodes to %+v, %v", i, e, err)
		}
	}
	if p := next(); p != "wake" {
		t.Fatalf("after the envelopes: %q, want the wake-up", p)
	}
}
