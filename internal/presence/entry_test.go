package presence_test

import (
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/presence"
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
