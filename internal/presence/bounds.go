package presence

import (
	"errors"
	"fmt"

	"github.com/claudemesh/broker/internal/protocol"
)

// Caps on an entry's text, in bytes of its JSON encoding (JSONLen), so
// that what an entry weighs in gossip is what was checked. The owner trims
// its entries to them (bound); other nodes refuse entries above them
// (checkEntry). Text valid in a hello fits unchanged unless it is full of
// characters JSON escapes.
const (
	MaxEntryIDLen    = 256  // presence, connection, owner, mesh and member ids
	MaxEntryPubkey   = 128  // 64 hex digits in practice
	MaxEntryName     = 256  // display name (128 bytes in the member table)
	MaxEntrySession  = 256  // session id (128 bytes in a hello)
	MaxEntryCwd      = 4096 // a hello's cwd limit: hook matching needs it whole
	MaxEntryHostname = 512
	MaxEntrySummary  = 1024 // 512 bytes in set_summary
	MaxEntryGroups   = protocol.MaxGroups
	MaxEntryGroup    = 2 * protocol.MaxGroupNameLen
	// MaxEntryBytes bounds one encoded entry. The caps above add up to
	// about 15 KiB (TestMaximalEntrySize); the rest is field names.
	MaxEntryBytes = 16 << 10
)

// bound trims an entry this node owns to the caps, so every node accepts
// it. Identifiers come from the hello's checks and the member table.
func bound(e *Entry) {
	e.DisplayName = TruncateJSON(e.DisplayName, MaxEntryName)
	e.SessionID = TruncateJSON(e.SessionID, MaxEntrySession)
	e.Cwd = TruncateJSON(e.Cwd, MaxEntryCwd)
	e.Hostname = TruncateJSON(e.Hostname, MaxEntryHostname)
	e.Summary = TruncateJSON(e.Summary, MaxEntrySummary)
	if len(e.Groups) > MaxEntryGroups {
		e.Groups = e.Groups[:MaxEntryGroups:MaxEntryGroups]
	}
	for _, g := range e.Groups {
		if JSONLen(g) > MaxEntryGroup {
			kept := make([]string, 0, len(e.Groups))
			for _, g := range e.Groups {
				if JSONLen(g) <= MaxEntryGroup {
					kept = append(kept, g)
				}
			}
			e.Groups = kept
			break
		}
	}
}

// tombstone is what a deleted entry keeps: its identity and order, which
// is all a merge needs to refuse stale copies. The text of a session that
// left is not worth carrying for ten minutes.
func tombstone(e Entry) Entry {
	return Entry{PresenceID: e.PresenceID, Owner: e.Owner, OwnerInc: e.OwnerInc, Epoch: e.Epoch, Version: e.Version,
		MeshID: e.MeshID, MemberID: e.MemberID, State: Gone}
}

// Reasons an entry from another node is dropped.
const (
	dropNotOwner = "not_owner" // sent by a node other than its owner
	dropInvalid  = "invalid"   // missing ids, bad state, status or text
	dropTooLarge = "too_large" // a field or the whole entry above its cap
	dropOverCap  = "over_cap"  // its owner already holds MAX_SESSIONS_PER_MEMBER of the member
)

var errTooLarge = errors.New("too large")

// checkEntry reports why an entry from another node cannot be stored:
// errTooLarge for a field above its cap, another error for anything else
// invalid.
func checkEntry(e *Entry) error {
	if e.PresenceID == "" || e.Owner == "" || e.MeshID == "" || e.MemberID == "" {
		return errors.New("entry without id, owner, mesh or member")
	}
	if e.Epoch > maxLamport || e.Version > maxLamport {
		return fmt.Errorf("entry version %d/%d beyond any clock", e.Epoch, e.Version)
	}
	if e.State > Gone {
		return fmt.Errorf("entry state %d", e.State)
	}
	for _, f := range []struct {
		s   string
		max int
	}{
		{e.PresenceID, MaxEntryIDLen}, {e.Owner, MaxEntryIDLen}, {e.ConnID, MaxEntryIDLen}, {e.MeshID, MaxEntryIDLen},
		{e.MemberID, MaxEntryIDLen}, {e.Pubkey, MaxEntryPubkey}, {e.DisplayName, MaxEntryName},
		{e.SessionID, MaxEntrySession}, {e.Cwd, MaxEntryCwd}, {e.Hostname, MaxEntryHostname},
		{e.Summary, MaxEntrySummary},
	} {
		if err := protocol.CheckText(f.s, 0); err != nil {
			return err
		}
		if JSONLen(f.s) > f.max {
			return errTooLarge
		}
	}
	if len(e.Groups) > MaxEntryGroups {
		return errTooLarge
	}
	for _, g := range e.Groups {
		if err := protocol.CheckText(g, 0); err != nil || g == "" {
			return errors.New("entry with an empty or invalid group")
		}
		if JSONLen(g) > MaxEntryGroup {
			return errTooLarge
		}
	}
	if (e.Status != "" && !protocol.ValidStatus(e.Status)) || (e.StatusSource != "" && !protocol.ValidSource(e.StatusSource)) {
		return fmt.Errorf("entry status %q source %q", e.Status, e.StatusSource)
	}
	return nil
}

// dropReason maps checkEntry's error to a metric label.
func dropReason(err error) string {
	if errors.Is(err, errTooLarge) {
		return dropTooLarge
	}
	return dropInvalid
}
