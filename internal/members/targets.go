package members

import (
	"context"
	"errors"

	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// Targets expands a send's target spec into recipient member ids (fan-out
// on write: a broadcast reaches offline members too), or names the error
// code the send is refused with. sender is the sending member, never its
// own recipient by broadcast or group; group lists the members of a mesh
// with a live session in a group (presence.Replica.GroupMembers). A lookup
// that reaches Postgres is bounded by ctx's deadline, or by lookupTimeout
// when ctx has none.
func (c *Cache) Targets(ctx context.Context, mesh, sender, spec string, group func(mesh, name string) []string) (ids []string, code string) {
	kind, arg := protocol.ParseTarget(spec)
	switch kind {
	case protocol.TargetPubkey:
		m, err := c.RecipientByPubkey(ctx, mesh, arg)
		if errors.Is(err, store.ErrNotFound) {
			return nil, protocol.CodeUnknownRecipient
		}
		if err != nil {
			return nil, protocol.CodeUnavailable
		}
		return []string{m.ID}, ""
	case protocol.TargetBroadcast:
		all, err := c.Recipients(ctx, mesh)
		if err != nil {
			return nil, protocol.CodeUnavailable
		}
		out := make([]string, 0, len(all))
		for _, m := range all {
			if m.ID != sender {
				out = append(out, m.ID)
			}
		}
		if len(out) == 0 {
			return nil, protocol.CodeNoRecipients
		}
		return out, ""
	case protocol.TargetGroup:
		var out []string
		for _, id := range group(mesh, arg) {
			if id != sender {
				out = append(out, id)
			}
		}
		if len(out) == 0 {
			return nil, protocol.CodeNoRecipients
		}
		return out, ""
	}
	return nil, protocol.CodeMalformed
}
