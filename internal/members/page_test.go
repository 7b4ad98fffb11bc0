package members

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// Page lists the members after the cursor in id order, limit at a time,
// with Next naming the last one listed when more follow, without
// reordering the shared list it is given.
func TestPage(t *testing.T) {
	joined := time.UnixMilli(1_700_000_000_000).UTC()
	all := []store.Member{
		{ID: "m3", Pubkey: "p3", DisplayName: "three", Role: "member", JoinedAt: joined},
		{ID: "m1", Pubkey: "p1", DisplayName: "one", Role: "admin", JoinedAt: joined},
		{ID: "m4", Pubkey: "p4", DisplayName: "four", Role: "member", JoinedAt: joined},
		{ID: "m2", Pubkey: "p2", DisplayName: "two", Role: "member", JoinedAt: joined},
	}
	online := func(id string) bool { return id == "m2" }
	p := Page(all, "", 3, online)
	if p.Type != protocol.TypeMembersList || p.Next != "m3" || len(p.Members) != 3 {
		t.Fatalf("first page: %+v", p)
	}
	for i, want := range []string{"m1", "m2", "m3"} {
		if m := p.Members[i]; m.MemberID != want || m.Online != (want == "m2") || m.JoinedAt != protocol.FormatTime(joined) {
			t.Fatalf("first page member %d: %+v, want %s", i, m, want)
		}
	}
	if p.Members[0].Role != "admin" || p.Members[0].DisplayName != "one" || p.Members[0].Pubkey != "p1" {
		t.Fatalf("member fields: %+v", p.Members[0])
	}
	if all[0].ID != "m3" || all[3].ID != "m2" {
		t.Fatal("Page reordered the list it was given")
	}
	p = Page(all, p.Next, 3, online)
	if p.Next != "" || len(p.Members) != 1 || p.Members[0].MemberID != "m4" {
		t.Fatalf("second page: %+v", p)
	}
	p = Page(all, "m4", 3, online)
	if p.Next != "" || p.Members == nil || len(p.Members) != 0 {
		t.Fatalf("past the end: %+v (members must be [] on the wire, not null)", p)
	}
	// Exactly limit left: no Next.
	if p = Page(all, "m2", 2, online); p.Next != "" || len(p.Members) != 2 {
		t.Fatalf("last full page: %+v", p)
	}
}

// Stored fields longer than the wire allows are clipped on a rune
// boundary.
func TestPageClips(t *testing.T) {
	long := store.Member{ID: "m1", Pubkey: strings.Repeat("a", 80), DisplayName: strings.Repeat("é", 100),
		Role: strings.Repeat("r", 20)}
	p := Page([]store.Member{long}, "", 10, func(string) bool { return false })
	m := p.Members[0]
	if len(m.Pubkey) != 64 || len(m.Role) != maxRole {
		t.Fatalf("pubkey %d bytes, role %d", len(m.Pubkey), len(m.Role))
	}
	if len(m.DisplayName) > protocol.MaxDisplayName || !utf8.ValidString(m.DisplayName) || len(m.DisplayName) != protocol.MaxDisplayName {
		t.Fatalf("display name of %d bytes, valid UTF-8 %v", len(m.DisplayName), utf8.ValidString(m.DisplayName))
	}
	if got := clipBytes("aé", 2); got != "a" {
		t.Fatalf("clipBytes split a rune: %q", got)
	}
	if got := clipBytes("abc", 5); got != "abc" {
		t.Fatalf("clipBytes of a short string: %q", got)
	}
}
