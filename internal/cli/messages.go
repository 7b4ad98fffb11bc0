package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/localstore"
	"github.com/claudemesh/broker/internal/peer"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/sanitize"
)

// maxStdinMessage bounds a message read from stdin.
const maxStdinMessage = 60 << 10

type sendCmd struct {
	To       string        `arg:"" help:"Recipient: a display name, a 64-hex pubkey, * (every member) or @group."`
	Message  []string      `arg:"" optional:"" help:"The message; read from stdin when omitted or -."`
	Priority string        `short:"p" default:"next" enum:"now,next,low" help:"now: delivered even to busy peers; next: when the peer is idle; low."`
	Wait     time.Duration `default:"15s" help:"How long to wait for the broker's ack."`
	JSON     bool          `name:"json" help:"Print JSON."`
}

func (s *sendCmd) text(a *app) (string, error) {
	text := strings.Join(s.Message, " ")
	if len(s.Message) == 0 || text == "-" {
		data, err := io.ReadAll(io.LimitReader(a.env.Stdin, maxStdinMessage+1))
		if err != nil {
			return "", fmt.Errorf("read the message from stdin: %w", err)
		}
		if len(data) > maxStdinMessage {
			return "", fmt.Errorf("message longer than %d bytes", maxStdinMessage)
		}
		text = strings.TrimRight(string(data), "\n")
	}
	if strings.TrimSpace(text) == "" {
		return "", errors.New("empty message")
	}
	return text, nil
}

func (s *sendCmd) Run(a *app) error {
	text, err := s.text(a)
	if err != nil {
		return err
	}
	sel, err := a.selectMesh()
	if err != nil {
		return err
	}
	sess, err := a.openSession(sel, sessionOptions{sendOnly: true})
	if err != nil {
		return err
	}
	defer sess.Close()
	ctx, cancel := context.WithTimeout(a.ctx, s.Wait)
	defer cancel()
	waitErr := sess.WaitReady(ctx)
	if isPermanent(waitErr) {
		return waitErr
	}
	pending, target, err := sess.Enqueue(ctx, s.To, text, s.Priority)
	if err != nil {
		if waitErr != nil {
			return fmt.Errorf("%w (and the broker is unreachable: %v)", err, waitErr)
		}
		return err
	}
	if waitErr != nil {
		return fmt.Errorf("%w\nthe message is saved in the outbox (%s) and will be sent by the next claudemesh command that reaches the broker; do not send it again",
			waitErr, pending.ClientMessageID)
	}
	res, err := pending.Wait(ctx)
	if errors.Is(err, client.ErrNotAcked) {
		return fmt.Errorf("the broker did not ack within %s; the message is saved in the outbox (%s) and will be resent (without duplicates) by the next claudemesh command",
			s.Wait, pending.ClientMessageID)
	}
	if err != nil {
		return err
	}
	held := heldFor(ctx, sess, res.MessageID, s.Priority)
	if s.JSON {
		if held == nil {
			held = []string{}
		}
		return a.printJSON(map[string]any{"messageId": res.MessageID, "clientMessageId": res.ClientMessageID,
			"target": target, "duplicate": res.Duplicate, "heldFor": held})
	}
	a.printf("sent to %s (message %s)\n", describeTarget(s.To, target), res.MessageID)
	if len(held) > 0 {
		who := strings.Join(held, ", ")
		if len(held) > 5 {
			who = strings.Join(held[:5], ", ") + fmt.Sprintf(" and %d more", len(held)-5)
		}
		verb := "are"
		if len(held) == 1 {
			verb = "is"
		}
		a.printf("held: %s %s busy (working or dnd); the message is delivered when a session turns idle (-p now reaches a busy session)\n", who, verb)
	}
	return nil
}

// heldFor names the recipients for whom the broker holds the message
// because every session of theirs is busy. Best effort: nothing when the
// broker cannot say.
func heldFor(ctx context.Context, sess *peer.Session, messageID, priority string) []string {
	if priority == protocol.PriorityNow || messageID == "" {
		return nil // now is never held
	}
	st, err := sess.MessageStatus(ctx, messageID)
	if err != nil {
		return nil
	}
	var out []string
	for _, r := range st.Recipients {
		if r.State == protocol.StateHeld {
			out = append(out, sanitize.Clip(r.DisplayName, sanitize.MaxNameRunes))
		}
	}
	return out
}

// describeTarget shows what a message went to: a member as "name
// (fingerprint)", a group or * as it is.
func describeTarget(to, target string) string {
	kind, _ := protocol.ParseTarget(target)
	if kind != protocol.TargetPubkey {
		return sanitize.Line(target)
	}
	if to == "" || strings.EqualFold(to, target) {
		return short(target, 12)
	}
	name := to
	if open := strings.LastIndex(to, " ("); open > 0 && strings.HasSuffix(to, ")") {
		name = to[:open] // already shown with a fingerprint
	}
	return sanitize.Name(name, target)
}

type inboxCmd struct {
	Wait    time.Duration `default:"1s" help:"Keep fetching until no message arrived for this long."`
	All     bool          `help:"Show read messages too."`
	Peek    bool          `help:"Do not mark messages read."`
	Limit   int           `default:"100" help:"At most this many messages."`
	Offline bool          `help:"Do not contact the broker; show what was received already."`
	JSON    bool          `name:"json" help:"Print JSON."`
}

func (c *inboxCmd) Run(a *app) error {
	sel, err := a.selectMesh()
	if err != nil {
		return err
	}
	var local *localstore.Mesh
	if c.Offline {
		st, err := sel.p.OpenState()
		if err != nil {
			return err
		}
		local = st.Mesh(sel.mesh.MeshID)
	} else {
		var err error
		if local, err = a.fetchInbox(sel, c.Wait); err != nil {
			return err
		}
	}
	var msgs []client.Message
	if c.All || c.Peek {
		stored, err := local.Messages(c.All, c.Limit)
		if err != nil {
			return err
		}
		for _, s := range stored {
			msgs = append(msgs, s.Message)
		}
	} else if msgs, err = local.TakeUnread(c.Limit); err != nil {
		return err
	}
	if c.JSON {
		if msgs == nil {
			msgs = []client.Message{}
		}
		return a.printJSON(msgs)
	}
	if len(msgs) == 0 {
		a.printf("no new messages\n")
		return nil
	}
	for _, m := range msgs {
		printMessage(a.env.Stdout, m)
	}
	return nil
}

// fetchInbox fetches waiting messages into the local inbox — unless
// another session of this identity is online: the broker delivers to that
// one (a message held while it works is its to get), so a command must not
// take it. Then only what this machine received is shown.
func (a *app) fetchInbox(sel *selected, quiet time.Duration) (*localstore.Mesh, error) {
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	look, err := a.openSession(sel, sessionOptions{sendOnly: true})
	if err != nil {
		return nil, err
	}
	err = look.WaitReady(ctx)
	var mine []peer.Peer
	if err == nil {
		peers, perr := look.Peers(ctx)
		for _, p := range peers {
			if p.Me && !p.Self {
				mine = append(mine, p)
			}
		}
		err = perr
	}
	_ = look.Close()
	switch {
	case isPermanent(err):
		return nil, err
	case err != nil:
		a.warnf("%v\nshowing the messages received before", err)
		return look.Local(), nil
	case len(mine) > 0:
		where := make([]string, 0, len(mine))
		for _, p := range mine {
			where = append(where, sanitize.Clip(p.Cwd, 60)+" on "+sanitize.Clip(p.Hostname, 40))
		}
		a.warnf("your session in %s receives your messages (held ones too, while it is busy); showing those received on this machine", strings.Join(where, ", "))
		return look.Local(), nil
	}
	sess, err := a.openSession(sel, sessionOptions{})
	if err != nil {
		return nil, err
	}
	defer sess.Close()
	if err := sess.WaitReady(ctx); err != nil {
		if isPermanent(err) {
			return nil, err
		}
		a.warnf("%v\nshowing the messages received before", err)
		return sess.Local(), nil
	}
	drain(a.ctx, sess.NewMessages(), quiet)
	return sess.Local(), nil
}

// drain waits until no new message arrived for quiet (at most 10×quiet):
// the broker pushes what waited for us right after the hello, and the
// protocol has no marker for the end of that backlog.
func drain(ctx context.Context, news <-chan struct{}, quiet time.Duration) {
	if quiet <= 0 {
		return
	}
	limit := time.NewTimer(10 * quiet)
	defer limit.Stop()
	t := time.NewTimer(quiet)
	defer t.Stop()
	for {
		select {
		case <-news:
			t.Reset(quiet)
		case <-t.C:
			return
		case <-limit.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// printMessage shows a message: a header line that only the CLI writes,
// then the body, sanitized and indented, so no line of a body can pass for
// a header (or reach the terminal as an escape sequence).
func printMessage(w io.Writer, m client.Message) {
	where := ""
	if m.Kind != client.KindDirect {
		where = " → " + sanitize.Line(m.Target)
	}
	prio := ""
	if m.Priority != protocol.PriorityNext {
		prio = " [" + sanitize.Line(m.Priority) + "]"
	}
	body := m.Text
	if m.DecryptError != "" {
		body = "[could not decrypt: " + m.DecryptError + "]"
	}
	fmt.Fprintf(w, "%s  %s%s%s\n", sanitize.Line(m.CreatedAt), sanitize.Name(m.FromName, m.From), where, prio)
	for _, line := range strings.Split(sanitize.Text(body), "\n") {
		fmt.Fprintf(w, "    %s\n", line)
	}
}

type listenCmd struct {
	Count   int           `help:"Exit after this many messages (0: until interrupted)."`
	Timeout time.Duration `help:"Exit after this long (0: until interrupted)."`
	Events  bool          `default:"true" negatable:"" help:"Show peers joining, leaving and changing status."`
	Group   []string      `placeholder:"NAME" help:"Join this group (messages to @NAME reach the session); repeatable."`
	JSON    bool          `name:"json" help:"Print one JSON object per line."`
}

func (l *listenCmd) Run(a *app) error {
	sel, err := a.selectMesh()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	if l.Timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, l.Timeout)
		defer cancel()
	}
	var mu sync.Mutex // one writer for events and messages
	onEvent := func(e client.Event) {
		if !l.Events {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if l.JSON {
			_ = a.printJSONLine(map[string]any{"type": "event", "event": e.Name, "peer": e.Peer, "at": e.At})
			return
		}
		who := sanitize.Name(e.Peer.DisplayName, e.Peer.Pubkey)
		switch e.Name {
		case protocol.EventPeerJoined:
			a.printf("* %s joined (%s)\n", who, sanitize.Line(e.Peer.Status))
		case protocol.EventPeerLeft:
			a.printf("* %s left\n", who)
		case protocol.EventPeerStatus:
			a.printf("* %s is %s\n", who, sanitize.Line(e.Peer.Status))
		}
	}
	if err := validGroups(l.Group); err != nil {
		return err
	}
	sess, err := a.openSession(sel, sessionOptions{persistent: true, groups: l.Group, onEvent: onEvent, logger: a.serviceLogger()})
	if err != nil {
		return err
	}
	defer sess.Close()
	p, err := a.profile()
	if err != nil {
		return err
	}
	stop, err := sess.ServeControl(p.RunDir(), "listen")
	if err != nil {
		return err
	}
	defer stop()
	// A listening terminal has no transcript: its status is what it says
	// (idle, or what `claudemesh status` sets), not the broker's default
	// "idle from the transcript".
	if err := sess.SetStatus(ctx, protocol.StatusIdle); err != nil {
		return err
	}
	announced := make(chan struct{})
	go func() {
		defer close(announced)
		if sess.WaitReady(ctx) == nil {
			fmt.Fprintf(a.env.Stderr, "listening on mesh %s as %s (Ctrl-C to stop)\n", sanitize.Line(sel.mesh.Slug), sanitize.Name(sel.mesh.DisplayName, sel.mesh.Pubkey))
		}
	}()
	defer func() {
		cancel()
		<-announced
	}()
	printed := 0
	for {
		batch := 100
		if l.Count > 0 {
			batch = l.Count - printed
		}
		msgs, err := sess.TakeMessages(batch)
		if err != nil {
			return err
		}
		mu.Lock()
		for _, m := range msgs {
			if l.JSON {
				_ = a.printJSONLine(struct {
					Type string `json:"type"`
					client.Message
				}{"message", m})
			} else {
				printMessage(a.env.Stdout, m)
			}
		}
		mu.Unlock()
		printed += len(msgs)
		if l.Count > 0 && printed >= l.Count {
			return nil
		}
		if len(msgs) == batch {
			continue // more may be waiting
		}
		select {
		case <-sess.NewMessages():
		case <-ctx.Done():
			if l.Timeout > 0 && errors.Is(ctx.Err(), context.DeadlineExceeded) && a.ctx.Err() == nil {
				if l.Count > 0 {
					return fmt.Errorf("timed out after %s with %d of %d messages", l.Timeout, printed, l.Count)
				}
				return nil
			}
			return nil
		case <-sess.Client().Done():
			return sess.WaitReady(ctx)
		}
	}
}

type peersCmd struct {
	All  bool          `help:"Include the short-lived connections of claudemesh commands (this one too)."`
	Wait time.Duration `default:"10s" help:"How long to wait for the broker."`
	JSON bool          `name:"json" help:"Print JSON."`
}

func (c *peersCmd) Run(a *app) error {
	sel, err := a.selectMesh()
	if err != nil {
		return err
	}
	sess, err := a.openSession(sel, sessionOptions{sendOnly: true})
	if err != nil {
		return err
	}
	defer sess.Close()
	ctx, cancel := context.WithTimeout(a.ctx, c.Wait)
	defer cancel()
	if err := sess.WaitReady(ctx); err != nil {
		return err
	}
	list := sess.Peers
	if c.All {
		list = sess.AllPeers
	}
	all, err := list(ctx)
	if err != nil {
		return err
	}
	peers := make([]peer.Peer, 0, len(all))
	for _, p := range all {
		if c.All || !p.Self {
			peers = append(peers, p)
		}
	}
	if c.JSON {
		return a.printJSON(peers)
	}
	if len(peers) == 0 {
		a.printf("no peer is online in mesh %s (`claudemesh members` lists everyone, online or not)\n", sanitize.Line(sel.mesh.Slug))
		return nil
	}
	tw := tabwriter.NewWriter(a.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATUS\tSUMMARY\tGROUPS\tCWD\tHOST\tNODE")
	for _, p := range peers {
		name := sanitize.Name(p.DisplayName, p.Pubkey)
		if p.Me {
			name += " (you)"
		}
		groups := make([]string, len(p.Groups))
		for i, g := range p.Groups {
			groups[i] = "@" + sanitize.Clip(g, 32)
		}
		fmt.Fprintf(tw, "%s\t%s (%s)\t%s\t%s\t%s\t%s\t%s\n", name, sanitize.Line(p.Status), sanitize.Line(p.StatusSource),
			sanitize.Clip(p.Summary, 40), strings.Join(groups, ","), sanitize.Clip(p.Cwd, 60), sanitize.Clip(p.Hostname, 40), sanitize.Clip(p.Node, 40))
	}
	return tw.Flush()
}

type membersCmd struct {
	Wait time.Duration `default:"10s" help:"How long to wait for the broker."`
	JSON bool          `name:"json" help:"Print JSON."`
}

func (c *membersCmd) Run(a *app) error {
	sel, err := a.selectMesh()
	if err != nil {
		return err
	}
	sess, err := a.openSession(sel, sessionOptions{sendOnly: true})
	if err != nil {
		return err
	}
	defer sess.Close()
	ctx, cancel := context.WithTimeout(a.ctx, c.Wait)
	defer cancel()
	if err := sess.WaitReady(ctx); err != nil {
		return err
	}
	members, err := sess.Members(ctx)
	if errors.Is(err, client.ErrUnsupported) {
		return errors.New("this broker does not list members (an older version); `claudemesh peers` lists who is online")
	}
	if err != nil {
		return err
	}
	if c.JSON {
		return a.printJSON(members)
	}
	tw := tabwriter.NewWriter(a.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tONLINE\tROLE\tJOINED\tPUBKEY")
	for _, m := range members {
		name := sanitize.Name(m.DisplayName, m.Pubkey)
		if m.Me {
			name += " (you)"
		}
		online := "no"
		if m.Online {
			online = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", name, online, sanitize.Line(m.Role), sanitize.Line(m.JoinedAt), short(sanitize.Line(m.Pubkey), 16))
	}
	return tw.Flush()
}

func validGroups(groups []string) error {
	for _, g := range groups {
		if err := protocol.ValidateGroupName(g); err != nil {
			return fmt.Errorf("--group %q: %w", g, err)
		}
	}
	return nil
}

type outboxCmd struct {
	ClearFailed bool `help:"Forget the sends the broker rejected."`
	JSON        bool `name:"json" help:"Print JSON."`
}

func (c *outboxCmd) Run(a *app) error {
	sel, err := a.selectMesh()
	if err != nil {
		return err
	}
	st, err := sel.p.OpenState()
	if err != nil {
		return err
	}
	m := st.Mesh(sel.mesh.MeshID)
	if c.ClearFailed {
		return m.ClearFailed()
	}
	pending, err := m.Pending()
	if err != nil {
		return err
	}
	failed, err := m.FailedSends()
	if err != nil {
		return err
	}
	if c.JSON {
		if pending == nil {
			pending = []client.OutboxEntry{}
		}
		if failed == nil {
			failed = []localstore.Failed{}
		}
		for i := range pending {
			pending[i].Nonce, pending[i].Ciphertext = "", ""
		}
		for i := range failed {
			failed[i].Nonce, failed[i].Ciphertext = "", ""
		}
		return a.printJSON(map[string]any{"pending": pending, "failed": failed})
	}
	if len(pending) == 0 && len(failed) == 0 {
		a.printf("the outbox is empty\n")
		return nil
	}
	tw := tabwriter.NewWriter(a.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STATE\tQUEUED\tTO\tTEXT\tID")
	for _, e := range pending {
		fmt.Fprintf(tw, "pending\t%s\t%s\t%s\t%s\n", e.CreatedAt.Format(time.RFC3339), describeTarget(e.To, e.TargetSpec), sanitize.Clip(e.Text, 40), e.ClientMessageID)
	}
	for _, f := range failed {
		fmt.Fprintf(tw, "rejected: %s\t%s\t%s\t%s\t%s\n", sanitize.Line(f.Code), f.CreatedAt.Format(time.RFC3339), describeTarget(f.To, f.TargetSpec), sanitize.Clip(f.Text, 40), f.ClientMessageID)
	}
	return tw.Flush()
}
