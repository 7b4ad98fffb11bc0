package presence

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/protocol"
)

// counts records the cluster's drop callbacks by reason.
type counts map[string]int

func testCluster(t *testing.T, self string, inc int64) (*Replica, *delegate, counts) {
	t.Helper()
	got := counts{}
	r := NewReplica(self, inc, time.Minute)
	r.SetLimits(32, func(reason string) { got[reason]++ })
	c := New(Options{Name: self, Incarnation: inc,
		OnInvalid:        func() { got["message"]++ },
		OnDropped:        func(reason string) { got[reason]++ },
		OnCommandDropped: func() { got["command"]++ },
		OnState: func(_ int, warn bool) {
			if warn {
				got["state_warning"]++
			}
		},
	}, r)
	return r, &delegate{c}, got
}

func delta(from string, inc int64, entries ...Entry) []byte {
	b, _ := Marshal(deltaMsg{From: from, Inc: inc, Entries: entries})
	return append([]byte{msgDeltas}, b...)
}

func remote(id, owner string, inc int64, v uint64, member string) Entry {
	return Entry{PresenceID: id, Owner: owner, OwnerInc: inc, Epoch: v, Version: v, MeshID: "m1", MemberID: member,
		SessionID: "s-" + id, Status: protocol.StatusIdle, StatusSource: protocol.SourceJSONL}
}

// maximalEntry has every field a hello and set_summary allow at its limit,
// in characters JSON escapes.
func maximalEntry(i int) Entry {
	groups := make([]string, protocol.MaxGroups)
	for g := range groups {
		groups[g] = fmt.Sprintf("%02d", g) + strings.Repeat(`"`, protocol.MaxGroupNameLen-2)
	}
	return Entry{
		PresenceID: fmt.Sprintf("01presence%016d", i), ConnID: fmt.Sprintf("node-with-a-long-name/01conn%020d", i),
		MeshID: strings.Repeat("m", protocol.MaxIDLen), MemberID: strings.Repeat("b", protocol.MaxIDLen),
		Pubkey: strings.Repeat("ab", 32), DisplayName: strings.Repeat(`"`, protocol.MaxDisplayName),
		SessionID: strings.Repeat(`\`, protocol.MaxIDLen), PID: 1 << 40, Cwd: strings.Repeat(`"`, protocol.MaxCwdLen),
		Hostname: strings.Repeat(`<"`, protocol.MaxHostnameLen/2), Status: protocol.StatusWorking,
		StatusSource: protocol.SourceManual, StatusUpdatedAt: 1 << 42, Summary: strings.Repeat(`"`, protocol.MaxSummaryLen),
		Groups: groups, ConnectedAt: 1 << 42, Ephemeral: true,
	}
}

// The largest entry a session can make fits MaxEntryBytes once its owner
// has bounded it, and every other node accepts it.
func TestMaximalEntrySize(t *testing.T) {
	r, _, _ := testCluster(t, strings.Repeat("n", 128), 1<<62)
	e := r.Create(maximalEntry(1))
	b, err := Marshal(wireEntry(e))
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > MaxEntryBytes {
		t.Fatalf("a maximal entry encodes to %d bytes, cap %d", len(b), MaxEntryBytes)
	}
	if err := checkEntry(&e); err != nil {
		t.Fatalf("a bounded own entry is refused by its peers: %v", err)
	}
	if strings.Contains(string(b), `\u003c`) {
		t.Fatal("gossip JSON escapes HTML")
	}
	t.Logf("maximal entry: %d bytes on the wire", len(b))
	_, peer, got := testCluster(t, "peer", 1)
	peer.NotifyMsg(delta(e.Owner, e.OwnerInc, e))
	if _, ok := peer.c.replica.Get(e.PresenceID); !ok || len(got) != 0 {
		t.Fatalf("peer did not store a maximal entry: %v", got)
	}
}

func TestJSONLen(t *testing.T) {
	for _, s := range []string{"", "plain", `"\<>&`, "tab\tnl\ncr\r\b\f\x01\x1f\x7f", "é日本\u2028\u2029", "bad\xffutf8\xc3", strings.Repeat("<", 100)} {
		b, _ := Marshal(s)
		if JSONLen(s) != len(b)-2 {
			t.Errorf("JSONLen(%q) = %d, encoded %d", s, JSONLen(s), len(b)-2)
		}
		for n := 0; n <= len(b); n++ {
			c := TruncateJSON(s, n)
			if !strings.HasPrefix(s, c) || JSONLen(c) > n {
				t.Fatalf("TruncateJSON(%q, %d) = %q (%d)", s, n, c, JSONLen(c))
			}
		}
	}
}

// A node speaks only for its own sessions: entries it sends of any other
// owner (another node's, this node's, or an incarnation it does not have)
// are dropped and counted, in deltas and in push-pull states alike, while
// its own are applied, one bad entry costing only itself.
func TestGossipAcceptsOnlyTheOwner(t *testing.T) {
	r, d, got := testCluster(t, "a", 1)
	r.NodeAlive("b", 2)
	r.NodeAlive("c", 3)
	mine := r.Create(Entry{PresenceID: "mine", ConnID: "a/1", MeshID: "m1", MemberID: "x", SessionID: "s"})
	d.NotifyMsg(delta("b", 2,
		remote("b1", "b", 2, 5, "y"),
		remote("c1", "c", 3, 5, "y"),    // another node's
		remote("mine", "a", 1, 99, "x"), // a takeover claimed for us
		remote("b-old", "b", 1, 5, "y"), // an incarnation b does not have
		Entry{PresenceID: "bad", Owner: "b", OwnerInc: 2, MeshID: "m1", MemberID: "y", Cwd: "a\x00b"},
		Entry{PresenceID: "big", Owner: "b", OwnerInc: 2, MeshID: "m1", MemberID: "y", Cwd: strings.Repeat("<", MaxEntryCwd+1)},
		remote("b2", "b", 2, 6, "y"),
	))
	for _, id := range []string{"b1", "b2"} {
		if _, ok := r.Get(id); !ok {
			t.Errorf("b's own entry %s was not applied", id)
		}
	}
	for _, id := range []string{"c1", "b-old", "bad", "big"} {
		if _, ok := r.Get(id); ok {
			t.Errorf("entry %s was applied", id)
		}
	}
	if e, _ := r.Get("mine"); e.Owner != "a" || e.Version != mine.Version {
		t.Errorf("our entry was changed by b: %+v", e)
	}
	if got[dropNotOwner] != 3 || got[dropInvalid] != 1 || got[dropTooLarge] != 1 {
		t.Errorf("drops %v", got)
	}
	// A message claiming to come from this node, or from nobody, is void.
	d.NotifyMsg(delta("a", 1, remote("forged", "a", 1, 7, "x")))
	d.NotifyMsg(delta("", 0, remote("anon", "", 0, 7, "x")))
	if _, ok := r.Get("forged"); ok || got["message"] != 2 {
		t.Errorf("forged sender: stored=%v, invalid messages %d", ok, got["message"])
	}

	// Push-pull: c's state lists one of b's entries too; only c's count.
	state := func(from string, inc int64, clock uint64, entries ...Entry) []byte {
		b, _ := Marshal(stateMsg{From: from, Inc: inc, Clock: clock, Entries: entries})
		return b
	}
	d.MergeRemoteState(state("c", 3, 10, remote("c2", "c", 3, 10, "z"), remote("b1", "b", 2, 9, "y")), false)
	if _, ok := r.Get("c2"); !ok {
		t.Error("c's own entry from its state was not applied")
	}
	if e, _ := r.Get("b1"); e.Version != 5 {
		t.Errorf("c rewrote b's entry: %+v", e)
	}
	// b's state no longer lists b1: deleted there; b2 stays.
	d.MergeRemoteState(state("b", 2, 20, remote("b2", "b", 2, 6, "y")), false)
	if _, ok := r.Get("b1"); ok {
		t.Error("an entry b no longer lists survived b's state")
	}
	if _, ok := r.Get("b2"); !ok {
		t.Error("an entry b lists was deleted")
	}
	// A state with a refused entry deletes nothing it does not list.
	d.MergeRemoteState(state("b", 2, 30, remote("c9", "c", 3, 30, "y")), false)
	if _, ok := r.Get("b2"); !ok {
		t.Error("a state with a refused entry deleted b2")
	}

	// What this node sends in a push-pull is its own entries only.
	var out stateMsg
	if err := json.Unmarshal(d.LocalState(false), &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Entries) != 1 || out.Entries[0].PresenceID != "mine" || out.From != "a" || out.Partial {
		t.Fatalf("local state %+v", out)
	}
}

// A node may hold at most MAX_SESSIONS_PER_MEMBER entries of one member;
// more from it are dropped. Replacing one of its entries is not an extra.
func TestGossipPerMemberCap(t *testing.T) {
	r, d, got := testCluster(t, "a", 1)
	r.SetLimits(3, func(reason string) { got[reason]++ })
	r.NodeAlive("b", 2)
	var batch []Entry
	for i := range 5 {
		batch = append(batch, remote(fmt.Sprint("e", i), "b", 2, uint64(i+1), "y"))
	}
	batch = append(batch, remote("other", "b", 2, 9, "z"))
	d.NotifyMsg(delta("b", 2, batch...))
	if n := r.MemberSessions("y"); n != 3 || got[dropOverCap] != 2 {
		t.Fatalf("member y has %d entries (drops %v), want 3 and 2 dropped", n, got)
	}
	if _, ok := r.Get("other"); !ok {
		t.Fatal("another member's entry was dropped")
	}
	e := remote("e0", "b", 2, 20, "y")
	e.Status = protocol.StatusWorking
	d.NotifyMsg(delta("b", 2, e))
	if x, _ := r.Get("e0"); x.Status != protocol.StatusWorking || got[dropOverCap] != 2 {
		t.Fatalf("an update of a held entry was refused: %+v %v", x, got)
	}
}

// Tombstones keep only what a merge needs; observers still see the session
// that left, whole, whether it left here or on another node. An
// ephemeral session leaves at once instead of waiting in grace.
func TestTombstonesAreSmall(t *testing.T) {
	r, _, _ := testCluster(t, "a", 1)
	var seen []Change
	r.SetObservers(func(c []Change) { seen = append(seen, c...) }, nil)
	r.NodeAlive("b", 2)
	e := r.Create(maximalEntry(1))
	if _, ok := r.Disconnect(e.PresenceID, e.ConnID); !ok {
		t.Fatal("disconnect")
	}
	r.mu.RLock()
	stored := *r.entries[e.PresenceID]
	r.mu.RUnlock()
	if stored.State != Gone {
		t.Fatalf("a disconnected ephemeral session is %s, want gone", stored.State)
	}
	if stored.Cwd != "" || stored.Groups != nil || stored.Summary != "" || stored.Pubkey != "" || stored.SessionID != "" {
		t.Fatalf("tombstone keeps text: %+v", stored)
	}
	last := seen[len(seen)-1].Cur
	if last.State != Gone || !last.Ephemeral || last.Cwd == "" || last.Pubkey == "" {
		t.Fatalf("observers got %+v for the session that left", *last)
	}
	if b, _ := Marshal(wireEntry(*last)); len(b) > 100+len(e.PresenceID)+len(e.Owner)+len(e.MeshID)+len(e.MemberID) {
		t.Fatalf("a tombstone travels as %d bytes: %s", len(b), b)
	}

	full := maximalEntry(2)
	full.Owner, full.OwnerInc, full.Epoch, full.Version, full.Ephemeral = "b", 2, 5, 5, false
	r.Apply([]Entry{full})
	gone := tombstone(full)
	gone.Version = 6
	r.Apply([]Entry{gone})
	last = seen[len(seen)-1].Cur
	if last.PresenceID != full.PresenceID || last.State != Gone || last.Pubkey != full.Pubkey || last.DisplayName != full.DisplayName || last.Version != 6 {
		t.Fatalf("observers got %+v for a remote session that left", *last)
	}
	if seen[len(seen)-1].Prev == nil {
		t.Fatal("no previous entry for a remote leave")
	}
}

// A state too large for memberlist is sent partial, under the limit, and a
// node receiving it deletes nothing it does not list; above 60 % of the
// limit the node warns.
func TestLocalStateStaysUnderMemberlistLimit(t *testing.T) {
	r, d, got := testCluster(t, "a", 1)
	n := stateMaxBytes/14000 + 50
	for i := range n {
		e := maximalEntry(i)
		e.MemberID = fmt.Sprint("member-", i) // one member may not hold them all
		r.Create(e)
	}
	state := d.LocalState(false)
	if len(state) > stateMaxBytes {
		t.Fatalf("state of %d bytes, limit %d", len(state), stateMaxBytes)
	}
	var m stateMsg
	if err := json.Unmarshal(state, &m); err != nil {
		t.Fatal(err)
	}
	if !m.Partial || len(m.Entries) == 0 || len(m.Entries) >= n || got["state_warning"] != 1 {
		t.Fatalf("partial=%v with %d of %d entries, warnings %d", m.Partial, len(m.Entries), n, got["state_warning"])
	}
	t.Logf("%d maximal entries: state of %d bytes lists %d", n, len(state), len(m.Entries))

	pr, peer, _ := testCluster(t, "p", 1)
	pr.NodeAlive("a", 1)
	var missing Entry
	listed := map[string]bool{}
	for _, e := range m.Entries {
		listed[e.PresenceID] = true
	}
	for _, e := range r.Own() {
		if !listed[e.PresenceID] {
			missing = e
			break
		}
	}
	peer.NotifyMsg(delta("a", 1, missing))
	peer.MergeRemoteState(state, false)
	if _, ok := pr.Get(missing.PresenceID); !ok {
		t.Fatal("a partial state deleted an entry it did not list")
	}
	if pr.Len() != len(m.Entries)+1 {
		t.Fatalf("peer holds %d entries, want %d", pr.Len(), len(m.Entries)+1)
	}
}

// A hook command is run only with a valid status, no other source, from
// another node, for a presence this node owns.
func TestCommandsAreValidated(t *testing.T) {
	r, d, got := testCluster(t, "a", 1)
	r.NodeAlive("b", 2)
	own := r.Create(Entry{PresenceID: "own", ConnID: "a/1", MeshID: "m1", MemberID: "x", SessionID: "s"})
	r.Apply([]Entry{remote("theirs", "b", 2, 3, "y")})
	cmd := func(c Command) []byte {
		b, _ := Marshal(c)
		return append([]byte{msgCommand}, b...)
	}
	for _, c := range []Command{
		{Kind: "hook", PresenceID: "theirs", Status: "idle", From: "b"},
		{Kind: "hook", PresenceID: "nobody", Status: "idle", From: "b"},
		{Kind: "hook", PresenceID: own.PresenceID, Status: "asleep", From: "b"},
		{Kind: "hook", PresenceID: own.PresenceID, Status: "idle", Source: "manual", From: "b"},
		{Kind: "hook", PresenceID: own.PresenceID, Status: "idle", From: "a"},
		{Kind: "hook", PresenceID: own.PresenceID, Status: "idle"},
		{Kind: "exec", PresenceID: own.PresenceID, Status: "idle", From: "b"},
		{Kind: "hook", PresenceID: strings.Repeat("p", 300), Status: "idle", From: "b"},
	} {
		d.NotifyMsg(cmd(c))
	}
	if len(d.c.cmds) != 0 || got["command"] != 8 {
		t.Fatalf("%d invalid commands queued, %d counted", len(d.c.cmds), got["command"])
	}
	d.NotifyMsg(cmd(Command{Kind: "hook", PresenceID: own.PresenceID, Status: "dnd", Source: "hook", From: "b"}))
	if len(d.c.cmds) != 1 {
		t.Fatal("a valid command was not queued")
	}
}

// When a node dies its sessions wait in grace to reattach elsewhere,
// except ephemeral ones (nobody reattaches to a one-shot command), which
// leave at once and free their member's places.
func TestDeadNodesEphemeralSessionsLeaveAtOnce(t *testing.T) {
	r, _, _ := testCluster(t, "a", 1)
	r.NodeAlive("b", 2)
	eph := remote("eph", "b", 2, 1, "y")
	eph.Ephemeral = true
	r.Apply([]Entry{eph, remote("win", "b", 2, 2, "y")})
	r.NodeDead("b")
	r.Expire()
	if _, ok := r.Get("eph"); ok {
		t.Fatal("a dead node's ephemeral session waits in grace")
	}
	if e, ok := r.Get("win"); !ok || !e.InGrace() {
		t.Fatal("a dead node's session did not wait in grace")
	}
	if n := r.MemberSessions("y"); n != 1 {
		t.Fatalf("member holds %d places, want 1", n)
	}
}

// JSONLen is exactly what Marshal writes for any string, and TruncateJSON
// cuts at a character boundary within the budget: the caps on gossip and
// peers_list text are measured with them.
func FuzzJSONLen(f *testing.F) {
	for _, s := range []string{"", "plain", `"\<>&`, "\x00\x01\x1f\x7f\t\n", "é日本\u2028", "bad\xffutf8\xc3"} {
		f.Add(s, 3)
	}
	f.Fuzz(func(t *testing.T, s string, n int) {
		b, err := Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if JSONLen(s) != len(b)-2 {
			t.Fatalf("JSONLen(%q) = %d, Marshal wrote %d", s, JSONLen(s), len(b)-2)
		}
		n = max(0, n%(len(b)+1))
		c := TruncateJSON(s, n)
		if !strings.HasPrefix(s, c) || JSONLen(c) > n {
			t.Fatalf("TruncateJSON(%q, %d) = %q", s, n, c)
		}
		if rest := s[len(c):]; rest != "" && JSONLen(c)+JSONLen(rest[:1]) <= n && rest[0] < 0x80 {
			t.Fatalf("TruncateJSON(%q, %d) = %q stopped early", s, n, c)
		}
	})
}
