// Package admin implements the operator actions behind `broker admin`:
// meshes, members, invites and the audit log. `broker dev` and the load
// generator seed through the same functions, so there is one path that
// writes meshes and members.
package admin

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

// MeshCreated is the result of CreateMesh. The owner secret key signs
// invites; keep it safe.
type MeshCreated struct {
	MeshID         string `json:"meshId"`
	Name           string `json:"name"`
	Slug           string `json:"slug"`
	OwnerPubkey    string `json:"ownerPubkey"`
	OwnerSecretKey string `json:"ownerSecretKey"`
}

var slugRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// Slugify derives a slug from a name.
func Slugify(name string) string {
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(name) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
			dash = false
		case !dash && b.Len() > 0:
			b.WriteByte('-')
			dash = true
		}
	}
	s := strings.Trim(b.String(), "-")
	if len(s) > 48 {
		s = s[:48]
	}
	return s
}

// CreateMesh creates a mesh with a fresh owner key pair and group key. An
// empty slug is derived from the name (with a random suffix if taken).
func CreateMesh(ctx context.Context, st *store.Store, name, slug string) (MeshCreated, error) {
	name = strings.TrimSpace(name)
	if name == "" || len(name) > 128 {
		return MeshCreated{}, errors.New("mesh name must be 1..128 characters")
	}
	derived := slug == ""
	if derived {
		slug = Slugify(name)
		if slug == "" {
			slug = "mesh"
		}
	}
	if !slugRe.MatchString(slug) {
		return MeshCreated{}, fmt.Errorf("slug %q must be lowercase letters, digits and dashes (1..63)", slug)
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return MeshCreated{}, err
	}
	root := make([]byte, 32)
	if _, err := rand.Read(root); err != nil {
		return MeshCreated{}, err
	}
	m := store.Mesh{Name: name, Slug: slug, OwnerPubkey: hex.EncodeToString(pub),
		OwnerSecretKey: hex.EncodeToString(priv), RootKey: hex.EncodeToString(root)}
	created, err := st.CreateMesh(ctx, m)
	if errors.Is(err, store.ErrConflict) && derived {
		m.Slug = slug + "-" + store.NewID()[20:]
		created, err = st.CreateMesh(ctx, m)
	}
	if err != nil {
		return MeshCreated{}, err
	}
	_ = st.InsertAudit(ctx, []store.AuditEvent{{MeshID: created.ID, Type: store.EventMeshCreated, Actor: "admin",
		Metadata: map[string]any{"name": name, "slug": created.Slug}}})
	return MeshCreated{MeshID: created.ID, Name: created.Name, Slug: created.Slug,
		OwnerPubkey: created.OwnerPubkey, OwnerSecretKey: m.OwnerSecretKey}, nil
}

// AddMember enrols a pubkey directly (without an invite).
func AddMember(ctx context.Context, st *store.Store, meshID, pubkey, name, role string) (store.Member, error) {
	pubkey = strings.ToLower(strings.TrimSpace(pubkey))
	if !protocol.IsPubkeyHex(pubkey) {
		return store.Member{}, errors.New("pubkey must be 64 hex characters")
	}
	if !auth.ValidPubkey(pubkey) {
		// A small-order key verifies forged signatures: nobody may enrol one.
		return store.Member{}, errors.New("pubkey is not a valid ed25519 public key")
	}
	name = strings.TrimSpace(name)
	if name == "" || len(name) > protocol.MaxDisplayName {
		return store.Member{}, errors.New("name must be 1..128 characters")
	}
	if role == "" {
		role = "member"
	}
	if role != "admin" && role != "member" {
		return store.Member{}, errors.New("role must be admin or member")
	}
	m, err := st.AddMember(ctx, store.Member{MeshID: meshID, Pubkey: pubkey, DisplayName: name, Role: role})
	if err != nil {
		return store.Member{}, err
	}
	_ = st.InsertAudit(ctx, []store.AuditEvent{{MeshID: meshID, Type: store.EventMemberAdded, Actor: "admin", Target: m.ID,
		Metadata: map[string]any{"display_name": name, "role": role}}})
	return m, nil
}

// RevokeMember revokes a member; every node closes its sessions.
func RevokeMember(ctx context.Context, st *store.Store, meshID, pubkey string) (store.Member, error) {
	m, err := st.RevokeMember(ctx, meshID, strings.ToLower(strings.TrimSpace(pubkey)))
	if err != nil {
		return store.Member{}, err
	}
	_ = st.InsertAudit(ctx, []store.AuditEvent{{MeshID: meshID, Type: store.EventMemberRevoked, Actor: "admin", Target: m.ID}})
	return m, nil
}

// InviteCreated is the result of CreateInvite.
type InviteCreated struct {
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expiresAt"`
	InviteID  string    `json:"inviteId"`
	MaxUses   int       `json:"maxUses"`
	Role      string    `json:"role"`
	BrokerURL string    `json:"brokerUrl"`
}

// CreateInvite signs an invite with the mesh owner's key and records it.
func CreateInvite(ctx context.Context, st *store.Store, meshID string, maxUses int, ttl time.Duration, role, brokerURL string) (InviteCreated, error) {
	if maxUses < 1 {
		return InviteCreated{}, errors.New("max uses must be at least 1")
	}
	if ttl <= 0 {
		return InviteCreated{}, errors.New("ttl must be positive")
	}
	if role == "" {
		role = "member"
	}
	if role != "admin" && role != "member" {
		return InviteCreated{}, errors.New("role must be admin or member")
	}
	mesh, err := st.GetMesh(ctx, meshID)
	if err != nil {
		return InviteCreated{}, err
	}
	if mesh.OwnerSecretKey == "" {
		return InviteCreated{}, errors.New("this mesh's owner key is not stored on the broker; sign invites with the owner key")
	}
	raw, err := hex.DecodeString(mesh.OwnerSecretKey)
	if err != nil || len(raw) != ed25519.PrivateKeySize {
		return InviteCreated{}, errors.New("stored owner key is corrupt")
	}
	expires := time.Now().Add(ttl).Truncate(time.Millisecond)
	inv := auth.Invite{V: 1, InviteID: store.NewID(), MeshID: mesh.ID, MeshSlug: mesh.Slug, MeshName: mesh.Name,
		BrokerURL: brokerURL, ExpiresAt: expires.UnixMilli(), RootKey: mesh.RootKey, Role: role}
	inv.Sign(ed25519.PrivateKey(raw))
	token := inv.Token()
	if _, err := st.CreateInvite(ctx, store.Invite{ID: inv.InviteID, MeshID: mesh.ID, Token: auth.InviteTokenKey(token),
		Payload: inv.Canonical(), Signature: inv.Signature, Role: role, MaxUses: maxUses, ExpiresAt: expires}); err != nil {
		return InviteCreated{}, err
	}
	_ = st.InsertAudit(ctx, []store.AuditEvent{{MeshID: mesh.ID, Type: store.EventInviteCreated, Actor: "admin", Target: inv.InviteID,
		Metadata: map[string]any{"max_uses": maxUses, "expires_at": expires, "role": role}}})
	return InviteCreated{Token: token, ExpiresAt: expires, InviteID: inv.InviteID, MaxUses: maxUses, Role: role, BrokerURL: brokerURL}, nil
}

// ResolveMesh finds a mesh by id or, failing that, by slug, so that an
// operator can write `--mesh demo`.
func ResolveMesh(ctx context.Context, st *store.Store, ref string) (store.Mesh, error) {
	ref = strings.TrimSpace(ref)
	if ref == "" {
		return store.Mesh{}, errors.New("no mesh given")
	}
	m, err := st.GetMesh(ctx, ref)
	if !errors.Is(err, store.ErrNotFound) {
		return m, err
	}
	m, err = st.MeshBySlug(ctx, ref)
	if errors.Is(err, store.ErrNotFound) {
		return store.Mesh{}, fmt.Errorf("mesh %q: no mesh has this id or slug (`broker admin mesh list` lists them)", ref)
	}
	return m, err
}

// WriteAuditTable prints events as a table, each member id followed by the
// member's display name.
func WriteAuditTable(w io.Writer, events []store.AuditEvent) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TIME\tEVENT\tACTOR\tTARGET\tMETADATA")
	named := func(id, name string) string {
		if name == "" {
			return id
		}
		return id + " (" + name + ")"
	}
	for _, e := range events {
		meta, _ := json.Marshal(e.Metadata)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.CreatedAt.Format(time.RFC3339Nano), e.Type,
			named(e.Actor, e.ActorName), named(e.Target, e.TargetName), meta)
	}
	return tw.Flush()
}

// DeleteMesh deletes a mesh with its members, messages and audit events.
func DeleteMesh(ctx context.Context, st *store.Store, meshID string) error {
	return st.DeleteMesh(ctx, meshID)
}
