// Package peer is this machine's side of a claudemesh session: one mesh,
// one identity, a reconnecting broker connection (internal/client) whose
// outbox and inbox live in the user's local state (internal/localstore),
// addressing peers by display name, and — for the long-running sessions of
// `claudemesh mcp` and `claudemesh listen` — status inference from Claude
// Code's transcript and a control socket through which `claudemesh status`
// and `claudemesh summary` reach the session.
package peer

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/localstore"
	"github.com/claudemesh/broker/internal/profile"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/sanitize"
	"github.com/claudemesh/broker/internal/transcript"
)

// Config configures a session.
type Config struct {
	Identity *profile.Identity
	Mesh     *profile.Mesh
	Store    *localstore.Store
	// URLs override the mesh's broker URLs when not empty.
	URLs     []string
	Cwd      string
	PID      int64
	Hostname string
	// Groups the session is in from the start (for "@group" messages).
	Groups []string
	// Persistent sessions reconnect for as long as they run; others give
	// up after GiveUpAfter failed attempts (zero: 3), so a one-shot
	// command fails fast when the broker is unreachable.
	Persistent  bool
	GiveUpAfter int
	// SendOnly sessions are never handed a message by the broker (a
	// command that only sends or lists): what waits for the member's real
	// session stays there. Only for sessions that are not Persistent.
	SendOnly bool
	// OnMessage and OnEvent are called for each new message and event,
	// after the message is in the local inbox.
	OnMessage func(client.Message)
	OnEvent   func(client.Event)
	Backoff   client.Backoff
	// ConnectGrace is how long a request waits for a connection being
	// (re)established before failing; zero 5s.
	ConnectGrace time.Duration
	Logger       *slog.Logger
}

// Session is a running session.
type Session struct {
	cfg    Config
	c      *client.Client
	st     *localstore.Mesh
	self   string // pubkey
	logger *slog.Logger
	news   chan struct{}

	mu        sync.Mutex
	members   []protocol.MemberInfo // the last member listing; guarded by mu
	membersAt time.Time
}

// Start opens a session and starts connecting.
func Start(cfg Config) (*Session, error) {
	id, err := cfg.Mesh.ClientIdentity(cfg.Identity)
	if err != nil {
		return nil, err
	}
	key, err := cfg.Mesh.MeshKey()
	if err != nil {
		return nil, fmt.Errorf("mesh %s: %w", cfg.Mesh.Slug, err)
	}
	urls := cfg.URLs
	if len(urls) == 0 {
		urls = cfg.Mesh.BrokerURLs
	}
	if len(urls) == 0 {
		return nil, fmt.Errorf("mesh %s has no broker URL; join it again or pass --broker", cfg.Mesh.Slug)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := &Session{cfg: cfg, st: cfg.Store.Mesh(cfg.Mesh.MeshID), self: id.Pubkey(), logger: logger, news: make(chan struct{}, 1)}
	giveUp := 0
	if !cfg.Persistent {
		giveUp = cfg.GiveUpAfter
		if giveUp <= 0 {
			giveUp = 3
		}
	}
	backoff := cfg.Backoff
	sessionID := ""
	if !cfg.Persistent {
		if backoff.Min == 0 {
			backoff = client.Backoff{Min: 100 * time.Millisecond, Max: time.Second}
		}
		var b [12]byte
		rand.Read(b[:])
		sessionID = EphemeralPrefix + hex.EncodeToString(b[:])
	}
	s.c, err = client.New(client.Options{
		Identity: id, URLs: urls, MeshKey: key, SessionID: sessionID, PID: cfg.PID, Cwd: cfg.Cwd, Hostname: cfg.Hostname, Groups: cfg.Groups,
		Outbox: s.st, Inbox: s.st, OnMessage: s.onMessage, OnEvent: s.onEvent,
		Backoff: backoff, GiveUpAfter: giveUp, Logger: logger, Ephemeral: !cfg.Persistent, SendOnly: cfg.SendOnly && !cfg.Persistent,
	})
	if err != nil {
		return nil, err
	}
	s.c.Start()
	return s, nil
}

func (s *Session) onMessage(m client.Message) {
	if m.FromName != "" {
		if err := s.st.RememberPeers([]localstore.Contact{{Pubkey: m.From, Name: m.FromName}}); err != nil {
			s.logger.Warn("remember sender", "err", err)
		}
	}
	select {
	case s.news <- struct{}{}:
	default:
	}
	if s.cfg.OnMessage != nil {
		s.cfg.OnMessage(m)
	}
}

func (s *Session) onEvent(e client.Event) {
	if IsEphemeral(e.Peer.SessionID) {
		return // a command's connection coming or going
	}
	if e.Name == protocol.EventPeerJoined && e.Peer.DisplayName != "" {
		if err := s.st.RememberPeers([]localstore.Contact{{Pubkey: e.Peer.Pubkey, Name: e.Peer.DisplayName}}); err != nil {
			s.logger.Warn("remember peer", "err", err)
		}
	}
	if s.cfg.OnEvent != nil {
		s.cfg.OnEvent(e)
	}
}

// EphemeralPrefix starts the session id of a one-shot command's connection
// (send, peers, inbox). Other claudemesh clients leave such sessions out of
// peer lists and events: they are a command's short-lived connection, not a
// peer one can talk to. The protocol has no field for this; the session id
// is the one place a client can mark it.
const EphemeralPrefix = "cli-"

// IsEphemeral reports whether a session id belongs to a one-shot command.
func IsEphemeral(sessionID string) bool { return strings.HasPrefix(sessionID, EphemeralPrefix) }

// Client is the underlying broker client.
func (s *Session) Client() *client.Client { return s.c }

// Mesh is the session's mesh.
func (s *Session) Mesh() *profile.Mesh { return s.cfg.Mesh }

// Pubkey is the session's identity.
func (s *Session) Pubkey() string { return s.self }

// Local is the session's part of the local state.
func (s *Session) Local() *localstore.Mesh { return s.st }

// WaitReady waits for the connection; errors say what a person can do.
func (s *Session) WaitReady(ctx context.Context) error {
	return Explain(s.c.WaitReady(ctx), s.cfg.Mesh)
}

// Close ends the session; unacked sends stay in the outbox.
func (s *Session) Close() error { return s.c.Close() }

// NewMessages is signalled (without blocking) whenever a new message is
// stored.
func (s *Session) NewMessages() <-chan struct{} { return s.news }

// Explain turns connection errors into messages a person can act on.
func Explain(err error, m *profile.Mesh) error {
	if err == nil {
		return nil
	}
	var he *client.HelloError
	if errors.As(err, &he) {
		switch he.Code {
		case protocol.ReasonUnauthorized:
			return fmt.Errorf("the broker does not accept this identity in mesh %s (membership revoked, or the mesh was joined on another broker); join again with a new invite: %w", m.Slug, err)
		case protocol.ReasonTimestampSkew:
			return fmt.Errorf("this machine's clock is more than 60 s off the broker's; fix the system time: %w", err)
		case protocol.ReasonCapacity:
			return fmt.Errorf("mesh %s has reached its connection limit on the broker: %w", m.Slug, err)
		}
		return err
	}
	var ce *client.CloseError
	if errors.As(err, &ce) && ce.Reason == protocol.CloseReasonRevoked {
		return fmt.Errorf("your membership of mesh %s was revoked", m.Slug)
	}
	var ue *client.UnreachableError
	if errors.As(err, &ue) {
		return fmt.Errorf("%w; check your network and the broker URL (`claudemesh meshes` lists it)", err)
	}
	return err
}

// UnknownPeerError is a name no member has.
type UnknownPeerError struct {
	Name  string
	Known []string // members (or peers seen) as "name (fingerprint)"
	// Members: Known is the mesh's member list, not only who was seen.
	Members bool
}

func (e *UnknownPeerError) Error() string {
	name := strconv.Quote(sanitize.Clip(e.Name, sanitize.MaxNameRunes))
	switch {
	case e.Members && len(e.Known) == 0:
		return fmt.Sprintf("unknown member %s: the mesh has no other member", name)
	case e.Members:
		return fmt.Sprintf("unknown member %s; members: %s", name, strings.Join(e.Known, ", "))
	case len(e.Known) == 0:
		return fmt.Sprintf("unknown peer %s: no member of that name was seen before (the broker is out of reach); address a member by its pubkey", name)
	}
	return fmt.Sprintf("unknown peer %s; members seen before: %s (the broker is out of reach; or address a member by its pubkey)", name, strings.Join(e.Known, ", "))
}

// AmbiguousPeerError is a name several members match.
type AmbiguousPeerError struct {
	Name    string
	Pubkeys []string
	Names   []string // "name (fingerprint)" of each, in Pubkeys' order
}

func (e *AmbiguousPeerError) Error() string {
	return fmt.Sprintf("several members match %s: %s; address one as it is shown here, or by its pubkey: %s",
		strconv.Quote(sanitize.Clip(e.Name, sanitize.MaxNameRunes)), strings.Join(e.Names, ", "), strings.Join(e.Pubkeys, ", "))
}

// ErrSelf is returned for a message addressed to the sender's own identity.
var ErrSelf = errors.New("that name is your own identity")

// nameKey folds a display name for matching: what is shown (sanitized), in
// any case, so that a name that differs only by invisible characters or
// escapes matches, and is then reported as ambiguous rather than sent to.
func nameKey(n string) string { return strings.ToLower(sanitize.Line(n)) }

// splitFingerprint reads "name (3f9a2c81)", the form names are shown in.
func splitFingerprint(to string) (name, fp string) {
	open := strings.LastIndex(to, " (")
	if open < 0 || !strings.HasSuffix(to, ")") {
		return to, ""
	}
	fp = strings.ToLower(to[open+2 : len(to)-1])
	if len(fp) < 6 || len(fp) > 64 || strings.Trim(fp, "0123456789abcdef") != "" {
		return to, ""
	}
	return to[:open], fp
}

// Resolve turns what a person addressed — a display name (optionally as
// shown, "name (fingerprint)"), a pubkey, "*" or "@group" — into a
// targetSpec. Names are looked up in the mesh's member list, which the
// broker keeps and which holds offline members too: a live session never
// outranks it, so someone online under a look-alike name cannot receive
// what was meant for an offline member. Against a broker without member
// listings, names are looked up among the live peers, then the peers seen
// before; with no broker at all, among the members and peers seen before.
func (s *Session) Resolve(ctx context.Context, to string) (string, error) {
	to = strings.TrimSpace(to)
	switch kind, arg := protocol.ParseTarget(to); kind {
	case protocol.TargetPubkey:
		return arg, nil
	case protocol.TargetBroadcast, protocol.TargetGroup:
		return to, nil
	}
	if to == "" {
		return "", errors.New("no recipient: give a name, a pubkey, * or @group")
	}
	if strings.HasPrefix(to, "@") {
		return "", fmt.Errorf("%q is not a valid group name", sanitize.Line(to))
	}
	name, fp := splitFingerprint(to)
	want := nameKey(name)
	match := func(names map[string]string) []string {
		var keys []string
		for pk, n := range names {
			if nameKey(n) == want && strings.HasPrefix(pk, fp) {
				keys = append(keys, pk)
			}
		}
		sort.Strings(keys)
		return keys
	}
	var names map[string]string // pubkey → name, of what was searched
	authoritative := false
	if s.awaitConn(ctx) {
		members, cached, err := s.memberList(ctx, false)
		if err == nil && cached && len(match(byPubkey(members))) != 1 {
			// The list may predate the member addressed: ask again.
			members, cached, err = s.memberList(ctx, true)
		}
		switch {
		case err == nil:
			names, authoritative = byPubkey(members), true
			if !cached {
				cs := make([]localstore.Contact, 0, len(members))
				for _, m := range members {
					cs = append(cs, localstore.Contact{Pubkey: m.Pubkey, Name: m.DisplayName})
				}
				if err := s.st.RememberPeers(cs); err != nil {
					s.logger.Warn("remember members", "err", err)
				}
			}
		case errors.Is(err, client.ErrUnsupported):
			// An older broker: the live sessions, then the contacts.
			if peers, err := s.c.ListPeers(ctx); err == nil {
				names = map[string]string{}
				for _, p := range peers {
					names[p.Pubkey] = p.DisplayName
				}
				s.remember(peers)
			}
		default:
			s.logger.Info("member list unavailable; using the members seen before", "err", err)
		}
	}
	keys := match(names)
	if len(keys) == 0 && !authoritative {
		contacts, err := s.st.Contacts()
		if err != nil {
			return "", err
		}
		known := map[string]string{}
		for _, c := range contacts {
			known[c.Pubkey] = c.Name
		}
		if names == nil {
			names = known
		} else {
			for pk, n := range known {
				if _, ok := names[pk]; !ok {
					names[pk] = n
				}
			}
		}
		keys = match(known)
	}
	switch len(keys) {
	case 0:
		list := make([]string, 0, len(names))
		for pk, n := range names {
			if pk != s.self {
				list = append(list, sanitize.Name(n, pk))
			}
		}
		sort.Strings(list)
		if len(list) > 20 {
			list = append(list[:20], fmt.Sprintf("… %d more (claudemesh members)", len(list)-20))
		}
		return "", &UnknownPeerError{Name: to, Known: list, Members: authoritative}
	case 1:
		if keys[0] == s.self {
			return "", ErrSelf
		}
		return keys[0], nil
	}
	shown := make([]string, len(keys))
	for i, pk := range keys {
		shown[i] = sanitize.Name(names[pk], pk)
	}
	return "", &AmbiguousPeerError{Name: to, Pubkeys: keys, Names: shown}
}

// memberListTTL: a session that sends often (Claude's) resolves names
// from a member list this recent; a name it does not find there is looked
// up in a fresh one.
const memberListTTL = 10 * time.Second

// memberList returns the mesh's members, from the last listing when it is
// recent and fresh is false; cached reports which.
func (s *Session) memberList(ctx context.Context, fresh bool) (list []protocol.MemberInfo, cached bool, err error) {
	s.mu.Lock()
	if !fresh && s.members != nil && time.Since(s.membersAt) < memberListTTL {
		list = s.members
		s.mu.Unlock()
		return list, true, nil
	}
	s.mu.Unlock()
	list, err = s.c.ListMembers(ctx)
	if err != nil {
		return nil, false, err
	}
	s.mu.Lock()
	s.members, s.membersAt = list, time.Now()
	s.mu.Unlock()
	return list, false, nil
}

func byPubkey(members []protocol.MemberInfo) map[string]string {
	out := make(map[string]string, len(members))
	for _, m := range members {
		out[m.Pubkey] = m.DisplayName
	}
	return out
}

// Member is a member of the mesh, online or not.
type Member struct {
	protocol.MemberInfo
	Me bool `json:"me,omitempty"`
}

// Members lists the mesh's members, online or not, by name; they are
// remembered, so they can be addressed by name while the broker is
// unreachable.
func (s *Session) Members(ctx context.Context) ([]Member, error) {
	s.awaitConn(ctx)
	list, _, err := s.memberList(ctx, true)
	if err != nil {
		return nil, err
	}
	out := make([]Member, 0, len(list))
	cs := make([]localstore.Contact, 0, len(list))
	for _, m := range list {
		out = append(out, Member{MemberInfo: m, Me: m.Pubkey == s.self})
		cs = append(cs, localstore.Contact{Pubkey: m.Pubkey, Name: m.DisplayName})
	}
	if err := s.st.RememberPeers(cs); err != nil {
		s.logger.Warn("remember members", "err", err)
	}
	sort.SliceStable(out, func(i, j int) bool { return nameKey(out[i].DisplayName) < nameKey(out[j].DisplayName) })
	return out, nil
}

// MessageStatus asks the broker for the delivery state of a message.
func (s *Session) MessageStatus(ctx context.Context, messageID string) (*protocol.MessageStatusResult, error) {
	return s.c.MessageStatus(ctx, messageID)
}

func (s *Session) remember(peers []protocol.Peer) {
	cs := make([]localstore.Contact, 0, len(peers))
	for _, p := range peers {
		cs = append(cs, localstore.Contact{Pubkey: p.Pubkey, Name: p.DisplayName})
	}
	if err := s.st.RememberPeers(cs); err != nil {
		s.logger.Warn("remember peers", "err", err)
	}
}

// awaitConn waits (at most Config.ConnectGrace) for a connection and
// reports whether there is one: a session just started, or one whose broker
// node was just lost, is usually connected again within it.
func (s *Session) awaitConn(ctx context.Context) bool {
	if _, ok := s.c.Info(); ok {
		return true
	}
	grace := s.cfg.ConnectGrace
	if grace <= 0 {
		grace = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, grace)
	defer cancel()
	return s.c.WaitReady(ctx) == nil
}

// Enqueue resolves to and accepts the message into the outbox.
func (s *Session) Enqueue(ctx context.Context, to, text, priority string) (*client.Pending, string, error) {
	if strings.TrimSpace(text) == "" {
		return nil, "", errors.New("empty message")
	}
	target, err := s.Resolve(ctx, to)
	if err != nil {
		return nil, "", err
	}
	label := ""
	if target != to {
		label = to
	}
	p, err := s.c.EnqueueTo(target, text, priority, label)
	return p, target, err
}

// Send resolves, enqueues and waits for the broker's ack.
func (s *Session) Send(ctx context.Context, to, text, priority string) (client.SendResult, string, error) {
	p, target, err := s.Enqueue(ctx, to, text, priority)
	if err != nil {
		return client.SendResult{}, target, err
	}
	res, err := p.Wait(ctx)
	return res, target, err
}

// Peer is a live session of the mesh.
type Peer struct {
	protocol.Peer
	// Self marks this session; Me marks any session of this identity.
	Self bool `json:"self,omitempty"`
	Me   bool `json:"me,omitempty"`
}

// Peers lists the live sessions of the mesh, sorted by name, leaving out
// the short-lived connections of other one-shot commands.
func (s *Session) Peers(ctx context.Context) ([]Peer, error) {
	return s.peers(ctx, false)
}

// AllPeers is Peers including one-shot commands' connections.
func (s *Session) AllPeers(ctx context.Context) ([]Peer, error) {
	return s.peers(ctx, true)
}

func (s *Session) peers(ctx context.Context, all bool) ([]Peer, error) {
	s.awaitConn(ctx)
	list, err := s.c.ListPeers(ctx)
	if err != nil {
		return nil, err
	}
	s.remember(list)
	info, _ := s.c.Info()
	out := make([]Peer, 0, len(list))
	for _, p := range list {
		self := p.PresenceID == info.PresenceID
		if !all && !self && IsEphemeral(p.SessionID) {
			continue
		}
		out = append(out, Peer{Peer: p, Self: self, Me: p.Pubkey == s.self})
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].DisplayName != out[j].DisplayName {
			return out[i].DisplayName < out[j].DisplayName
		}
		return out[i].ConnectedAt < out[j].ConnectedAt
	})
	return out, nil
}

// TakeMessages returns unread messages, oldest first, and marks them read.
func (s *Session) TakeMessages(limit int) ([]client.Message, error) {
	return s.st.TakeUnread(limit)
}

// SetStatus sets the session's status by hand.
func (s *Session) SetStatus(ctx context.Context, status string) error {
	return s.c.SetStatus(ctx, status, protocol.SourceManual)
}

// SetSummary sets the session's summary.
func (s *Session) SetSummary(ctx context.Context, summary string) error {
	return s.c.SetSummary(ctx, summary)
}

// Timings of status inference.
const (
	// refreshWorking re-sends "working" while it lasts, so the broker's
	// stuck-session timer does not flip a long tool call to idle.
	refreshWorking = 20 * time.Second
	// staleTranscript: a transcript untouched for longer is not refreshed.
	staleTranscript = 10 * time.Minute
)

// InferStatus follows Claude Code's transcript of the session started in
// the session's cwd and reports working/idle with source jsonl whenever it
// changes. It runs until ctx ends; every is the polling interval.
func (s *Session) InferStatus(ctx context.Context, home string, every time.Duration) {
	dir := transcript.ProjectDir(home, s.cfg.Cwd)
	t := time.NewTicker(every)
	defer t.Stop()
	last, sentAt := "", time.Time{}
	announced := false
	for {
		path, mod, err := transcript.Latest(dir)
		if err != nil && last == "" && !announced {
			// No transcript (yet): the broker's default, idle from the
			// transcript, would be untrue. Say idle as the session itself,
			// until a transcript tells more.
			if s.c.SetStatus(ctx, protocol.StatusIdle, protocol.SourceManual) == nil {
				announced = true
			}
		}
		if err == nil {
			st, err := transcript.InferFile(path)
			switch {
			case err != nil:
				s.logger.Debug("transcript", "path", path, "err", err)
			case st != last,
				st == transcript.Working && time.Since(sentAt) >= refreshWorking && time.Since(mod) < staleTranscript:
				if err := s.c.SetStatus(ctx, st, protocol.SourceJSONL); err == nil {
					s.logger.Info("inferred status", "status", st, "transcript", path)
					last, sentAt = st, time.Now()
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// MarkRead marks messages read (they reached Claude another way).
func (s *Session) MarkRead(ids []string) error { return s.st.MarkRead(ids) }

// JoinGroup adds the session to a group, kept across reconnections.
func (s *Session) JoinGroup(ctx context.Context, name string) error { return s.c.JoinGroup(ctx, name) }

// LeaveGroup removes the session from a group.
func (s *Session) LeaveGroup(ctx context.Context, name string) error {
	return s.c.LeaveGroup(ctx, name)
}

// Groups lists the session's groups.
func (s *Session) Groups() []string { return s.c.Groups() }
