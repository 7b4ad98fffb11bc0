package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/profile"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/sanitize"
)

type keygenCmd struct {
	Force bool `help:"Replace an existing identity (meshes joined with it stop working)."`
	Print bool `help:"Print a new key pair without saving it."`
	JSON  bool `name:"json" help:"Print JSON."`
}

func (k *keygenCmd) Run(a *app) error {
	if k.Print {
		id, err := profile.NewIdentity()
		if err != nil {
			return err
		}
		if k.JSON {
			return a.printJSON(map[string]string{"pubkey": id.Pubkey, "secretKey": id.SecretKey})
		}
		a.printf("pubkey:    %s\nsecretKey: %s\n", id.Pubkey, id.SecretKey)
		return nil
	}
	p, err := a.profile()
	if err != nil {
		return err
	}
	id, err := p.CreateIdentity(k.Force)
	if err != nil {
		return err
	}
	if k.JSON {
		return a.printJSON(map[string]string{"pubkey": id.Pubkey, "path": p.IdentityPath()})
	}
	a.printf("identity created\npubkey: %s\nsaved:  %s (keep it secret)\n", id.Pubkey, p.IdentityPath())
	return nil
}

type joinCmd struct {
	Invite string        `arg:"" help:"Invite token (cm1.…) or a link ending in one."`
	Name   string        `help:"Your display name in the mesh (default: user@host)."`
	Wait   time.Duration `default:"20s" help:"How long to wait for the broker."`
	JSON   bool          `name:"json" help:"Print JSON."`
}

func (j *joinCmd) Run(a *app) error {
	p, err := a.profile()
	if err != nil {
		return err
	}
	id, err := p.LoadIdentity()
	created := false
	if errors.Is(err, profile.ErrNoIdentity) {
		id, err = p.CreateIdentity(false)
		created = true
	}
	if err != nil {
		return err
	}
	name := strings.TrimSpace(j.Name)
	if name == "" {
		name = a.defaultDisplayName()
	}
	if len(name) > protocol.MaxDisplayName {
		return fmt.Errorf("display name is longer than %d bytes", protocol.MaxDisplayName)
	}
	brokerURL := ""
	if len(a.g.Broker) > 0 {
		brokerURL = a.g.Broker[0]
	}
	ctx, cancel := context.WithTimeout(a.ctx, j.Wait)
	defer cancel()
	priv, err := id.Key()
	if err != nil {
		return err
	}
	inv, res, err := client.Join(ctx, a.env.HTTPClient, j.Invite, brokerURL, priv, name, a.now())
	if err != nil {
		return err
	}
	urls := a.g.Broker
	if len(urls) == 0 {
		urls = []string{inv.BrokerURL}
	}
	m := profile.Mesh{
		MeshID: res.MeshID, Slug: res.MeshSlug, Name: res.MeshName, MemberID: res.MemberID, DisplayName: name,
		Role: res.Role, BrokerURLs: urls, RootKey: inv.RootKey, Pubkey: id.Pubkey, JoinedAt: a.now().UTC(),
	}
	if err := p.SaveMesh(m); err != nil {
		return err
	}
	if j.JSON {
		return a.printJSON(map[string]any{"meshId": m.MeshID, "slug": m.Slug, "name": m.Name, "memberId": m.MemberID,
			"displayName": name, "role": m.Role, "alreadyMember": res.AlreadyMember, "pubkey": id.Pubkey,
			"identityCreated": created, "brokerUrls": urls})
	}
	if created {
		a.printf("created your identity (%s), saved in %s\n", short(id.Pubkey, 12), p.IdentityPath())
	}
	verb := "joined"
	if res.AlreadyMember {
		verb = "already a member of"
	}
	a.printf("%s mesh %q (%s) as %s, role %s\n", verb, sanitize.Clip(m.Name, 64), sanitize.Line(m.Slug), sanitize.Name(name, id.Pubkey), sanitize.Line(m.Role))
	if inv.RootKey == "" {
		a.printf("note: the invite carries no mesh key, so broadcast and group messages cannot be read or sent\n")
	}
	a.printf("next: `claudemesh install` to connect Claude Code, `claudemesh peers` to see who is online\n")
	return nil
}

type meshesCmd struct {
	List meshesListCmd `cmd:"" default:"withargs" help:"List joined meshes (the default)."`
	Use  meshesUseCmd  `cmd:"" help:"Make a mesh the default."`
}

type meshesListCmd struct {
	JSON bool `name:"json" help:"Print JSON."`
}

func (l *meshesListCmd) Run(a *app) error {
	p, err := a.profile()
	if err != nil {
		return err
	}
	ms, err := p.LoadMeshes()
	if err != nil {
		return err
	}
	if l.JSON {
		type out struct {
			profile.Mesh
			Default bool `json:"default"`
		}
		list := make([]out, 0, len(ms.Meshes))
		for _, m := range ms.Meshes {
			m.RootKey = "" // secret: not for output
			list = append(list, out{Mesh: m, Default: m.MeshID == ms.Default})
		}
		return a.printJSON(list)
	}
	if len(ms.Meshes) == 0 {
		return profile.ErrNotJoined
	}
	tw := tabwriter.NewWriter(a.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\tSLUG\tNAME\tAS\tROLE\tBROKER\tMESH ID")
	for _, m := range ms.Meshes {
		mark := ""
		if m.MeshID == ms.Default {
			mark = "*"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", mark, sanitize.Line(m.Slug), sanitize.Clip(m.Name, 40), sanitize.Clip(m.DisplayName, sanitize.MaxNameRunes),
			sanitize.Line(m.Role), sanitize.Line(strings.Join(m.BrokerURLs, ",")), sanitize.Line(m.MeshID))
	}
	return tw.Flush()
}

type meshesUseCmd struct {
	Mesh string `arg:"" help:"Slug, name or id of the mesh."`
}

func (u *meshesUseCmd) Run(a *app) error {
	p, err := a.profile()
	if err != nil {
		return err
	}
	m, err := p.SetDefault(u.Mesh)
	if err != nil {
		return err
	}
	a.printf("default mesh: %s (%s)\n", sanitize.Clip(m.Name, 64), sanitize.Line(m.Slug))
	return nil
}
