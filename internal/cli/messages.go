package cli

import (
	"context"
	"encoding/json"
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
	sess, err := a.openSession(sel, sessionOptions{})
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
	if s.JSON {
		return a.printJSON(map[string]any{"messageId": res.MessageID, "clientMessageId": res.ClientMessageID,
			"target": target, "duplicate": res.Duplicate})
	}
	a.printf("sent to %s (message %s)\n", describeTarget(s.To, target), res.MessageID)
	return nil
}

func describeTarget(to, target string) string {
	if to == target || strings.EqualFold(to, target) {
		if kind, _ := protocol.ParseTarget(target); kind == protocol.TargetPubkey {
			return short(target, 12)
		}
		return target
	}
	return fmt.Sprintf("%s (%s)", to, short(target, 12))
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
		sess, err := a.openSession(sel, sessionOptions{})
		if err != nil {
			return err
		}
		defer sess.Close()
		local = sess.Local()
		ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
		err = sess.WaitReady(ctx)
		cancel()
		switch {
		case isPermanent(err):
			return err
		case err != nil:
			a.warnf("%v\nshowing the messages received before", err)
		default:
			drain(a.ctx, sess.NewMessages(), c.Wait)
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

func printMessage(w io.Writer, m client.Message) {
	where := ""
	if m.Kind != client.KindDirect {
		where = " → " + m.Target
	}
	prio := ""
	if m.Priority != protocol.PriorityNext {
		prio = " [" + m.Priority + "]"
	}
	body := m.Text
	if m.DecryptError != "" {
		body = "[could not decrypt: " + m.DecryptError + "]"
	}
	fmt.Fprintf(w, "%s  %s%s%s  (%s)\n", m.CreatedAt, m.FromName, where, prio, short(m.From, 12))
	for _, line := range strings.Split(body, "\n") {
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
			_ = json.NewEncoder(a.env.Stdout).Encode(map[string]any{"type": "event", "event": e.Name, "peer": e.Peer, "at": e.At})
			return
		}
		switch e.Name {
		case protocol.EventPeerJoined:
			a.printf("* %s joined (%s)\n", e.Peer.DisplayName, e.Peer.Status)
		case protocol.EventPeerLeft:
			a.printf("* %s left\n", e.Peer.DisplayName)
		case protocol.EventPeerStatus:
			a.printf("* %s is %s\n", e.Peer.DisplayName, e.Peer.Status)
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
	announced := make(chan struct{})
	go func() {
		defer close(announced)
		if sess.WaitReady(ctx) == nil {
			fmt.Fprintf(a.env.Stderr, "listening on mesh %s as %s (Ctrl-C to stop)\n", sel.mesh.Slug, sel.mesh.DisplayName)
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
				_ = json.NewEncoder(a.env.Stdout).Encode(struct {
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
	sess, err := a.openSession(sel, sessionOptions{})
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
		a.printf("no peer is online in mesh %s\n", sel.mesh.Slug)
		return nil
	}
	tw := tabwriter.NewWriter(a.env.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATUS\tSUMMARY\tGROUPS\tCWD\tHOST\tPUBKEY\tNODE")
	for _, p := range peers {
		name := p.DisplayName
		if p.Me {
			name += " (you)"
		}
		groups := make([]string, len(p.Groups))
		for i, g := range p.Groups {
			groups[i] = "@" + g
		}
		fmt.Fprintf(tw, "%s\t%s (%s)\t%s\t%s\t%s\t%s\t%s\t%s\n", name, p.Status, p.StatusSource, short(oneLine(p.Summary), 40),
			strings.Join(groups, ","), p.Cwd, p.Hostname, short(p.Pubkey, 12), p.Node)
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

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

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
		fmt.Fprintf(tw, "pending\t%s\t%s\t%s\t%s\n", e.CreatedAt.Format(time.RFC3339), describeTarget(orTarget(e.To, e.TargetSpec), e.TargetSpec), short(oneLine(e.Text), 40), e.ClientMessageID)
	}
	for _, f := range failed {
		fmt.Fprintf(tw, "rejected: %s\t%s\t%s\t%s\t%s\n", f.Code, f.CreatedAt.Format(time.RFC3339), describeTarget(orTarget(f.To, f.TargetSpec), f.TargetSpec), short(oneLine(f.Text), 40), f.ClientMessageID)
	}
	return tw.Flush()
}

func orTarget(to, target string) string {
	if to == "" {
		return target
	}
	return to
}
