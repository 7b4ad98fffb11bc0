package store_test

import (
	"slices"
	"testing"

	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// A row's state: settled rows say so; a row to deliver is "held" while
// the recipient has live receiving sessions of which none accepts the
// priority, else "queued". Only rows to deliver look up sessions.
func TestRecipientRowState(t *testing.T) {
	sessions := map[string][]presence.Entry{
		"busy":     {{MemberID: "busy", State: presence.Live, Status: protocol.StatusWorking}},
		"idle":     {{MemberID: "idle", State: presence.Live, Status: protocol.StatusWorking}, {MemberID: "idle", State: presence.Live, Status: protocol.StatusIdle}},
		"grace":    {{MemberID: "grace", State: presence.Grace, Status: protocol.StatusWorking}},
		"sendonly": {{MemberID: "sendonly", State: presence.Live, Status: protocol.StatusWorking, SendOnly: true}},
	}
	var asked []string
	lookup := func(id string) []presence.Entry {
		asked = append(asked, id)
		return sessions[id]
	}
	next, _ := protocol.PriorityRank(protocol.PriorityNext)
	now, _ := protocol.PriorityRank(protocol.PriorityNow)
	cases := []struct {
		row      store.RecipientRow
		priority int
		want     string
	}{
		{store.RecipientRow{MemberID: "busy", Delivered: true}, next, protocol.StateDelivered},
		{store.RecipientRow{MemberID: "busy", Expired: true}, next, protocol.StateExpired},
		{store.RecipientRow{MemberID: "busy", Leased: true}, next, protocol.StateLeased},
		{store.RecipientRow{MemberID: "busy"}, next, protocol.StateHeld},
		{store.RecipientRow{MemberID: "busy"}, now, protocol.StateQueued},
		{store.RecipientRow{MemberID: "idle"}, next, protocol.StateQueued},
		{store.RecipientRow{MemberID: "grace"}, next, protocol.StateQueued},
		{store.RecipientRow{MemberID: "sendonly"}, next, protocol.StateQueued},
		{store.RecipientRow{MemberID: "offline"}, next, protocol.StateQueued},
	}
	for i, c := range cases {
		if got := c.row.State(int16(c.priority), lookup); got != c.want {
			t.Errorf("case %d (%+v, priority %d): %s, want %s", i, c.row, c.priority, got, c.want)
		}
	}
	if want := []string{"busy", "busy", "idle", "grace", "sendonly", "offline"}; !slices.Equal(asked, want) {
		t.Fatalf("sessions looked up for %v, want %v (settled rows need none)", asked, want)
	}
}

// The sender sees every recipient; a recipient its own row; anyone else
// nothing, and not found.
func TestMessageInfoStates(t *testing.T) {
	info := store.MessageInfo{ID: 1, SenderMemberID: "s", Recipients: []store.RecipientRow{
		{MemberID: "a", DisplayName: "A", Delivered: true},
		{MemberID: "b", DisplayName: "B"},
	}}
	none := func(string) []presence.Entry { return nil }
	got, found := info.States("s", none)
	want := []protocol.RecipientState{{MemberID: "a", DisplayName: "A", State: protocol.StateDelivered},
		{MemberID: "b", DisplayName: "B", State: protocol.StateQueued}}
	if !found || !slices.Equal(got, want) {
		t.Fatalf("sender: %v %v", got, found)
	}
	got, found = info.States("b", none)
	if !found || !slices.Equal(got, want[1:]) {
		t.Fatalf("recipient: %v %v", got, found)
	}
	got, found = info.States("x", none)
	if found || got == nil || len(got) != 0 {
		t.Fatalf("stranger: %v %v (recipients must be [] on the wire)", got, found)
	}
	// A sender of a message without rows still finds it.
	if got, found := (store.MessageInfo{SenderMemberID: "s"}).States("s", none); !found || len(got) != 0 || got == nil {
		t.Fatalf("sender, no rows: %v %v", got, found)
	}
}
