package devcluster

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/fsutil"
	"github.com/claudemesh/broker/internal/store"
)

// demoVersion 2 joins people through an invite; version 1 (no version
// field) enrolled "alice" and "bob" with keys the claudemesh CLI cannot use.
const demoVersion = 2

// Demo invites are for a developer's own cluster: valid long enough that
// restarts never meet an expired one, with uses to spare for scratch homes.
// They are re-issued when less than demoInviteMinLeft remains.
const (
	demoInviteTTL     = 365 * 24 * time.Hour
	demoInviteUses    = 1000
	demoInviteMinLeft = 30 * 24 * time.Hour
)

// DemoNames are the people the banner prints a join line for.
var DemoNames = []string{"alice", "bob"}

// keyedNames are the members --keys enrols with keys kept in demo.json, for
// clients that speak the protocol themselves; distinct from DemoNames so
// that a name in the mesh is one person.
var keyedNames = []string{"carol", "dave"}

// Demo is the seeded demo mesh, saved in the data folder (demo.json) so
// that restarts reuse the same mesh and invite.
type Demo struct {
	Version        int          `json:"version"`
	MeshID         string       `json:"meshId"`
	Slug           string       `json:"slug"`
	OwnerPubkey    string       `json:"ownerPubkey"`
	OwnerSecretKey string       `json:"ownerSecretKey"`
	Invite         DemoInvite   `json:"invite"`
	Keyed          []DemoMember `json:"keyed,omitempty"`
	// Members is version 1's keyed alice and bob; read to recognise an old
	// file, never written.
	Members []DemoMember `json:"members,omitempty"`
}

// DemoInvite is the multi-use invite the banner's join lines carry.
type DemoInvite struct {
	Token     string    `json:"token"`
	InviteID  string    `json:"inviteId"`
	BrokerURL string    `json:"brokerUrl"`
	ExpiresAt time.Time `json:"expiresAt"`
	MaxUses   int       `json:"maxUses"`
}

// DemoMember is an identity enrolled with its key (--keys).
type DemoMember struct {
	Name      string `json:"name"`
	MemberID  string `json:"memberId"`
	Pubkey    string `json:"pubkey"`
	SecretKey string `json:"secretKey"`
}

// seeding says what seed changed, for the banner.
type seeding struct {
	newMesh     bool
	replacedOld bool   // a version-1 demo mesh was deleted
	newInvite   string // why the invite was (re-)issued; "" when reused
}

// seed loads the demo mesh from path, or creates it; makes sure its invite
// is live and points at publicURL (re-issuing it otherwise); and, with
// keyed, enrols the keyed members.
func seed(ctx context.Context, st *store.Store, path, publicURL string, keyed bool) (Demo, seeding, error) {
	var d Demo
	var what seeding
	if data, err := os.ReadFile(path); err == nil {
		if json.Unmarshal(data, &d) != nil {
			d = Demo{}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return d, what, err
	}
	if d.MeshID != "" {
		_, err := st.GetMesh(ctx, d.MeshID)
		switch {
		case errors.Is(err, store.ErrNotFound):
			d = Demo{} // another database, or the mesh was deleted
		case err != nil:
			return d, what, err
		case d.Version < demoVersion:
			if err := admin.DeleteMesh(ctx, st, d.MeshID); err != nil {
				return d, what, fmt.Errorf("replace the demo mesh of an older broker dev: %w", err)
			}
			d, what.replacedOld = Demo{}, true
		}
	}
	if d.MeshID == "" {
		mc, err := admin.CreateMesh(ctx, st, "demo", "")
		if err != nil {
			return d, what, err
		}
		d = Demo{Version: demoVersion, MeshID: mc.MeshID, Slug: mc.Slug, OwnerPubkey: mc.OwnerPubkey, OwnerSecretKey: mc.OwnerSecretKey}
		what.newMesh = true
	}
	why, err := inviteProblem(ctx, st, d.Invite, publicURL)
	if err != nil {
		return d, what, err
	}
	if why != "" {
		inv, err := admin.CreateInvite(ctx, st, d.MeshID, demoInviteUses, demoInviteTTL, "member", publicURL)
		if err != nil {
			return d, what, fmt.Errorf("demo invite: %w", err)
		}
		d.Invite = DemoInvite{Token: inv.Token, InviteID: inv.InviteID, BrokerURL: publicURL, ExpiresAt: inv.ExpiresAt, MaxUses: inv.MaxUses}
		what.newInvite = why
	}
	if keyed && len(d.Keyed) == 0 {
		for _, name := range keyedNames {
			pub, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return d, what, err
			}
			m, err := admin.AddMember(ctx, st, d.MeshID, hex.EncodeToString(pub), name, "member")
			if err != nil {
				return d, what, err
			}
			d.Keyed = append(d.Keyed, DemoMember{Name: name, MemberID: m.ID, Pubkey: m.Pubkey, SecretKey: hex.EncodeToString(priv)})
		}
	}
	d.Members = nil
	data, _ := json.MarshalIndent(d, "", "  ")
	if err := fsutil.WriteFileAtomic(path, append(data, '\n'), 0o600); err != nil {
		return d, what, err
	}
	return d, what, nil
}

// inviteProblem says why inv cannot be printed again ("" when it can): it
// must exist, point at publicURL, and have time and uses left.
func inviteProblem(ctx context.Context, st *store.Store, inv DemoInvite, publicURL string) (string, error) {
	if inv.Token == "" {
		return "first start", nil
	}
	if inv.BrokerURL != publicURL {
		return fmt.Sprintf("the cluster's URL changed from %s", inv.BrokerURL), nil
	}
	row, err := st.InviteByToken(ctx, auth.InviteTokenKey(inv.Token))
	switch {
	case errors.Is(err, store.ErrNotFound):
		return "the database does not know the old one", nil
	case err != nil:
		return "", err
	case row.RevokedAt != nil:
		return "the old one was revoked", nil
	case time.Until(row.ExpiresAt) < demoInviteMinLeft:
		return "the old one expires " + row.ExpiresAt.UTC().Format("2006-01-02"), nil
	case row.UsedCount >= row.MaxUses:
		return "the old one has no uses left", nil
	}
	return "", nil
}
