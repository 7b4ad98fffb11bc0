package localstore_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/localstore"
)

func open(t *testing.T) (*localstore.Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := localstore.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	return s, path
}

func TestFileMode(t *testing.T) {
	_, path := open(t)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
}

// The outbox survives reopening (a crash), keeps order, and Done/Fail are
// idempotent; failed sends are listed with their code.
func TestOutbox(t *testing.T) {
	s, path := open(t)
	m := s.Mesh("mesh-1")
	for i := range 3 {
		if err := m.Add(client.OutboxEntry{ClientMessageID: fmt.Sprint("c", i), TargetSpec: "*", Text: fmt.Sprint("t", i)}); err != nil {
			t.Fatal(err)
		}
	}
	// Another mesh's outbox is separate.
	if p, _ := s.Mesh("mesh-2").Pending(); len(p) != 0 {
		t.Fatalf("mesh-2 pending %v", p)
	}
	reopened, err := localstore.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	m = reopened.Mesh("mesh-1")
	p, err := m.Pending()
	if err != nil || len(p) != 3 || p[0].ClientMessageID != "c0" || p[2].Text != "t2" {
		t.Fatalf("pending %+v %v", p, err)
	}
	if err := m.Done("c1"); err != nil {
		t.Fatal(err)
	}
	if err := m.Done("c1"); err != nil {
		t.Fatal("second Done:", err)
	}
	if err := m.Fail("c0", "unknown_recipient"); err != nil {
		t.Fatal(err)
	}
	if err := m.Fail("c0", "unknown_recipient"); err != nil {
		t.Fatal("second Fail:", err)
	}
	p, _ = m.Pending()
	if len(p) != 1 || p[0].ClientMessageID != "c2" {
		t.Fatalf("pending %+v", p)
	}
	f, err := m.FailedSends()
	if err != nil || len(f) != 1 || f[0].Code != "unknown_recipient" || f[0].Text != "t0" {
		t.Fatalf("failed %+v %v", f, err)
	}
	if err := m.ClearFailed(); err != nil {
		t.Fatal(err)
	}
	if f, _ := m.FailedSends(); len(f) != 0 {
		t.Fatalf("failed after clear %+v", f)
	}
}

func TestOutboxFull(t *testing.T) {
	s, _ := open(t)
	s.SetMaxOutbox(20)
	m := s.Mesh("m")
	for i := range 20 {
		if err := m.Add(client.OutboxEntry{ClientMessageID: fmt.Sprint(i)}); err != nil {
			t.Fatalf("add %d: %v", i, err)
		}
	}
	if err := m.Add(client.OutboxEntry{ClientMessageID: "one too many"}); !errors.Is(err, client.ErrOutboxFull) {
		t.Fatalf("err = %v", err)
	}
}

// Record dedupes by message id; TakeUnread hands each message out once, in
// the broker's id order (numeric, not lexical).
func TestInbox(t *testing.T) {
	s, _ := open(t)
	m := s.Mesh("m")
	for _, id := range []string{"9", "10", "9", "2"} {
		if _, err := m.Record(client.Message{ID: id, Text: "m" + id, ReceivedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	isNew, err := m.Record(client.Message{ID: "10", Text: "again"})
	if err != nil || isNew {
		t.Fatalf("redelivery recorded as new: %v %v", isNew, err)
	}
	got, err := m.TakeUnread(2)
	if err != nil || len(got) != 2 || got[0].ID != "2" || got[1].ID != "9" {
		t.Fatalf("first take %+v %v", got, err)
	}
	got, _ = m.TakeUnread(0)
	if len(got) != 1 || got[0].ID != "10" || got[0].Text != "m10" {
		t.Fatalf("second take %+v", got)
	}
	if got, _ := m.TakeUnread(0); len(got) != 0 {
		t.Fatalf("third take %+v", got)
	}
	// Read messages still dedupe.
	if isNew, _ := m.Record(client.Message{ID: "2"}); isNew {
		t.Fatal("read message recorded again")
	}
	all, _ := m.Messages(true, 0)
	if len(all) != 3 || !all[0].Read {
		t.Fatalf("all %+v", all)
	}
}

// Two handles on one file (as two processes would have) never hand out the
// same message twice.
func TestConcurrentTake(t *testing.T) {
	s1, path := open(t)
	s2, err := localstore.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	const n = 50
	for i := range n {
		if _, err := s1.Mesh("m").Record(client.Message{ID: fmt.Sprint(i + 1)}); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	seen := map[string]int{}
	var wg sync.WaitGroup
	for _, s := range []*localstore.Store{s1, s2, s1, s2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range n {
				got, err := s.Mesh("m").TakeUnread(1)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				for _, m := range got {
					seen[m.ID]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(seen) != n {
		t.Fatalf("%d distinct messages taken, want %d", len(seen), n)
	}
	for id, c := range seen {
		if c != 1 {
			t.Fatalf("message %s taken %d times", id, c)
		}
	}
}

func TestContactsAndHooks(t *testing.T) {
	s, _ := open(t)
	m := s.Mesh("m")
	if err := m.RememberPeers([]localstore.Contact{{Pubkey: "aa", Name: "alice"}, {Pubkey: "bb", Name: "bob"}, {Pubkey: "cc"}}); err != nil {
		t.Fatal(err)
	}
	if err := m.RememberPeers([]localstore.Contact{{Pubkey: "aa", Name: "alice2"}}); err != nil {
		t.Fatal(err)
	}
	cs, err := m.Contacts()
	if err != nil || len(cs) != 2 || cs[0].Name != "alice2" || cs[1].Name != "bob" {
		t.Fatalf("contacts %+v %v", cs, err)
	}

	now := time.Now()
	for i, tc := range []struct {
		status string
		at     time.Time
		want   bool
	}{
		{"working", now, true},
		{"working", now.Add(5 * time.Second), false},
		{"idle", now.Add(6 * time.Second), true},
		{"idle", now.Add(40 * time.Second), true}, // outside the window: refresh
	} {
		got, err := m.ClaimHook("k", tc.status, 20*time.Second, tc.at)
		if err != nil || got != tc.want {
			t.Fatalf("step %d: %v %v, want %v", i, got, err, tc.want)
		}
	}
	if err := m.ForgetHook("k"); err != nil {
		t.Fatal(err)
	}
	if got, _ := m.ClaimHook("k", "idle", 20*time.Second, now.Add(41*time.Second)); !got {
		t.Fatal("forgotten mark still throttles")
	}
}

// TakeUrgent hands each unread "now" message to one hook, whole when it
// fits (then it is read) or cut (then it stays unread); other priorities
// and messages already shown are left alone.
func TestTakeUrgent(t *testing.T) {
	s, _ := open(t)
	m := s.Mesh("m")
	for i, x := range []struct{ prio, text string }{
		{"now", "first"}, {"next", "not urgent"}, {"now", "second, a longer one"}, {"now", "third"},
	} {
		if _, err := m.Record(client.Message{ID: fmt.Sprint(i + 1), Priority: x.prio, Text: x.text}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := m.TakeUrgent(12)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Text != "first" || got[0].Cut || !got[1].Cut || got[1].Text != "second," {
		t.Fatalf("first hook: %+v", got)
	}
	again, err := m.TakeUrgent(100)
	if err != nil || len(again) != 1 || again[0].Text != "third" {
		t.Fatalf("second hook: %+v %v", again, err)
	}
	if more, _ := m.TakeUrgent(100); len(more) != 0 {
		t.Fatalf("shown twice: %+v", more)
	}
	unread, err := m.Messages(false, 0)
	if err != nil || len(unread) != 2 || unread[0].Text != "not urgent" || unread[1].Text != "second, a longer one" {
		t.Fatalf("unread after the hooks: %+v %v", unread, err)
	}
	if err := m.MarkRead([]string{"2", "404"}); err != nil {
		t.Fatal(err)
	}
	if unread, _ := m.Messages(false, 0); len(unread) != 1 {
		t.Fatalf("after MarkRead: %+v", unread)
	}
}
