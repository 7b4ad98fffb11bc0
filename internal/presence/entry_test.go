package presence_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
)

// The seed's status rules: changed status wins; same status from an equal
// or higher source upgrades; from a lower one it keeps a fresh source and
// downgrades a stale one; a hook never clears dnd.
func TestApplyStatus(t *testing.T) {
	t0 := time.UnixMilli(1_000_000)
	fresh := 30 * time.Second
	cases := []struct {
		name                string
		status, source      string
		age                 time.Duration
		inStatus, inSource  string
		wantStatus, wantSrc string
		wantChanged         bool
	}{
		{"changed status wins", "working", "idle", 0, "working", "jsonl", "working", "jsonl", true},
		{"same status, higher source upgrades", "working", "jsonl", 0, "working", "hook", "working", "hook", true},
		{"same status, equal source", "working", "manual", time.Second, "working", "manual", "working", "manual", false},
		{"lower source keeps a fresh one", "working", "hook", 10 * time.Second, "working", "jsonl", "working", "hook", false},
		{"lower source downgrades a stale one", "working", "hook", 31 * time.Second, "working", "jsonl", "working", "jsonl", true},
		{"hook cannot clear dnd", "dnd", "manual", 0, "idle", "hook", "dnd", "manual", false},
		{"manual clears dnd", "dnd", "manual", 0, "idle", "manual", "idle", "manual", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := presence.Entry{Status: tc.status, StatusSource: tc.source, StatusUpdatedAt: t0.UnixMilli()}
			now := t0.Add(tc.age)
			changed := presence.ApplyStatus(&e, tc.inStatus, tc.inSource, now, fresh)
			if e.Status != tc.wantStatus || e.StatusSource != tc.wantSrc || changed != tc.wantChanged {
				t.Fatalf("got %s/%s changed=%v, want %s/%s changed=%v", e.Status, e.StatusSource, changed, tc.wantStatus, tc.wantSrc, tc.wantChanged)
			}
			if tc.name != "hook cannot clear dnd" && e.StatusUpdatedAt != now.UnixMilli() {
				t.Fatalf("timestamp not refreshed")
			}
		})
	}
}

// Joining and leaving groups copies the entry's groups (other copies of
// the entry share them), reports no change for a group it is (not) in,
// and stops at protocol.MaxGroups.
func TestJoinLeaveGroup(t *testing.T) {
	shared := []string{"a", "b"}
	e := presence.Entry{Groups: shared}
	if changed, full := e.JoinGroup("a"); changed || full {
		t.Fatalf("joining a group it is in: changed %v, full %v", changed, full)
	}
	if changed, full := e.JoinGroup("c"); !changed || full || !slices.Equal(e.Groups, []string{"a", "b", "c"}) {
		t.Fatalf("join: changed %v, full %v, groups %v", changed, full, e.Groups)
	}
	if e.LeaveGroup("x") {
		t.Fatal("left a group it was not in")
	}
	if !e.LeaveGroup("a") || !slices.Equal(e.Groups, []string{"b", "c"}) {
		t.Fatalf("leave: groups %v", e.Groups)
	}
	if !slices.Equal(shared, []string{"a", "b"}) {
		t.Fatalf("the shared groups changed: %v", shared)
	}
	e.Groups = nil
	for i := range protocol.MaxGroups {
		if changed, _ := e.JoinGroup(fmt.Sprint("g", i)); !changed {
			t.Fatalf("group %d refused", i)
		}
	}
	if changed, full := e.JoinGroup("one-more"); changed || !full || len(e.Groups) != protocol.MaxGroups {
		t.Fatalf("past MaxGroups: changed %v, full %v, %d groups", changed, full, len(e.Groups))
	}
}

// A system push names the event and the mesh, comes from the system
// sender with an empty ciphertext, and carries the entry as eventData.
func TestSystemPush(t *testing.T) {
	e := presence.Entry{PresenceID: "p1", Owner: "node-a", MeshID: "mesh", MemberID: "m1", Pubkey: "ab",
		DisplayName: "<me>", SessionID: "s1", Status: protocol.StatusWorking, StatusSource: protocol.SourceHook, Summary: "x&y"}
	at := time.UnixMilli(1_700_000_000_000)
	frame := e.SystemPush(protocol.EventPeerJoined, at)
	if strings.Contains(string(frame), `\u003c`) {
		t.Fatalf("HTML-escaped: %s", frame)
	}
	var p protocol.Push
	if err := json.Unmarshal(frame, &p); err != nil {
		t.Fatal(err)
	}
	if p.Type != protocol.TypePush || p.Subtype != protocol.SubtypeSystem || p.Event != protocol.EventPeerJoined ||
		p.MeshID != "mesh" || p.SenderPubkey != protocol.SystemSender || p.CreatedAt != protocol.FormatTime(at) ||
		!strings.Contains(string(frame), `"ciphertext":""`) {
		t.Fatalf("push %s", frame)
	}
	var ev protocol.PeerEvent
	if err := json.Unmarshal(p.EventData, &ev); err != nil {
		t.Fatal(err)
	}
	if ev != e.Event() {
		t.Fatalf("eventData %+v, want %+v", ev, e.Event())
	}
}
