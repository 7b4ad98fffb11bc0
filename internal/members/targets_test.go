package members_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/members"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// targetsStore is a mesh's member list; fail makes every read fail.
type targetsStore struct {
	all  []store.Member
	fail bool
}

func (s *targetsStore) MeshMembers(context.Context, string) ([]store.Member, error) {
	if s.fail {
		return nil, errors.New("postgres away")
	}
	return s.all, nil
}

func (s *targetsStore) MemberByPubkey(_ context.Context, _, pubkey string) (store.Member, error) {
	if s.fail {
		return store.Member{}, errors.New("postgres away")
	}
	for _, m := range s.all {
		if m.Pubkey == pubkey {
			return m, nil
		}
	}
	return store.Member{}, store.ErrNotFound
}

// A pubkey names one member (any case); a broadcast every member but the
// sender; a group its members but the sender; anything else is malformed.
func TestTargets(t *testing.T) {
	pk := func(c string) string { return strings.Repeat(c, 64) }
	st := &targetsStore{all: []store.Member{{ID: "me", Pubkey: pk("a")}, {ID: "b", Pubkey: pk("b")}, {ID: "c", Pubkey: pk("c")}}}
	c := members.New(st, nil)
	groups := map[string][]string{"dev": {"me", "c"}, "solo": {"me"}}
	group := func(mesh, name string) []string {
		if mesh != "mesh" {
			t.Fatalf("group of mesh %q", mesh)
		}
		return groups[name]
	}
	ctx := context.Background()
	cases := []struct {
		spec string
		ids  []string
		code string
	}{
		{strings.ToUpper(pk("b")), []string{"b"}, ""},
		{pk("d"), nil, protocol.CodeUnknownRecipient},
		{"*", []string{"b", "c"}, ""},
		{"@dev", []string{"c"}, ""},
		{"@solo", nil, protocol.CodeNoRecipients},
		{"@nobody", nil, protocol.CodeNoRecipients},
		{"#channel", nil, protocol.CodeMalformed},
		{"", nil, protocol.CodeMalformed},
	}
	for _, tc := range cases {
		ids, code := c.Targets(ctx, "mesh", "me", tc.spec, group)
		if !slices.Equal(ids, tc.ids) || code != tc.code {
			t.Errorf("Targets(%q) = %v %q, want %v %q", tc.spec, ids, code, tc.ids, tc.code)
		}
	}
	// A broadcast in a mesh of one reaches nobody.
	alone := members.New(&targetsStore{all: []store.Member{{ID: "me", Pubkey: pk("a")}}}, nil)
	if ids, code := alone.Targets(ctx, "mesh", "me", "*", group); ids != nil || code != protocol.CodeNoRecipients {
		t.Fatalf("broadcast alone: %v %q", ids, code)
	}
	// Postgres away, nothing cached: unavailable.
	away := members.New(&targetsStore{fail: true}, nil)
	for _, spec := range []string{pk("b"), "*"} {
		if ids, code := away.Targets(ctx, "mesh", "me", spec, group); ids != nil || code != protocol.CodeUnavailable {
			t.Fatalf("Targets(%q) with Postgres away: %v %q", spec, ids, code)
		}
	}
}
