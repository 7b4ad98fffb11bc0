package mcpserver

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/sanitize"
)

// Claude Code's push channel: a server that declares the experimental
// capability "claude/channel" may send notifications/claude/channel with
// {content, meta}; Claude Code puts them into the running conversation as
// <channel source="…" key="value" …>content</channel>, in the middle of a
// turn too. meta keys must be identifiers (letters, digits, underscores).
const (
	ChannelCapability = "claude/channel"
	ChannelMethod     = "notifications/claude/channel"
)

// Channel modes (Options.Channel).
const (
	// ChannelAuto pushes to Claude Code, which takes the notifications only
	// when started with channels enabled — so the message also stays for
	// check_messages and the hooks — and to other clients that declare the
	// capability, for which a pushed message counts as read.
	ChannelAuto = "auto"
	// ChannelOn pushes to any client and counts pushed messages as read.
	ChannelOn = "on"
	// ChannelOff never pushes.
	ChannelOff = "off"
)

// ChannelParams are the params of a channel notification.
type ChannelParams struct {
	Content string            `json:"content"`
	Meta    map[string]string `json:"meta,omitempty"`
}

// Bounds of the push path: messages waiting per connection (beyond, the
// notification is skipped: the message is in the inbox all the same), and
// the text of one notification.
const (
	channelQueue      = 256
	maxChannelContent = 16 << 10
	channelWrite      = 5 * time.Second
)

// channelConn is one client connection and its notification queue.
type channelConn struct {
	conn  mcp.Connection // set by the transport's Connect
	ss    *mcp.ServerSession
	queue chan client.Message
	done  chan struct{}
	// Decided once the client has said who it is (initialize, or the
	// stateless server/discover); guarded by channels.mu.
	decided, on bool
	trusted     atomic.Bool // read by the writer
}

// channelTransport keeps the connection it makes, so that notifications the
// SDK has no method for can be written on it.
type channelTransport struct {
	mcp.Transport
	cc *channelConn
}

func (t *channelTransport) Connect(ctx context.Context) (mcp.Connection, error) {
	c, err := t.Transport.Connect(ctx)
	if err == nil {
		t.cc.conn = c
	}
	return c, err
}

// channels tracks the server's connections.
type channels struct {
	mode   string
	onRead func(ids []string) error
	logf   func(format string, args ...any)

	mu    sync.Mutex
	conns map[*mcp.ServerSession]*channelConn
}

func newChannels(mode string, onRead func([]string) error, logf func(string, ...any)) *channels {
	return &channels{mode: mode, onRead: onRead, logf: logf, conns: map[*mcp.ServerSession]*channelConn{}}
}

// connect serves t: it connects the server and starts the connection's
// notification writer, which ends with the session.
func (ch *channels) connect(ctx context.Context, s *mcp.Server, t mcp.Transport, opts *mcp.ServerSessionOptions) (*mcp.ServerSession, error) {
	cc := &channelConn{queue: make(chan client.Message, channelQueue), done: make(chan struct{})}
	ss, err := s.Connect(ctx, &channelTransport{Transport: t, cc: cc}, opts)
	if err != nil {
		return nil, err
	}
	cc.ss = ss
	ch.mu.Lock()
	ch.conns[ss] = cc
	ch.mu.Unlock()
	go func() {
		_ = ss.Wait()
		ch.mu.Lock()
		delete(ch.conns, ss)
		ch.mu.Unlock()
		close(cc.done)
	}()
	go ch.write(cc)
	return ss, nil
}

// decide settles, once the client has said who it is, whether it takes
// notifications. Callers hold ch.mu.
func (ch *channels) decide(cc *channelConn) bool {
	if !cc.decided {
		p := cc.ss.InitializeParams()
		if p == nil {
			return false // not initialized yet: nothing to push to
		}
		on, trusted := channelFor(ch.mode, p)
		cc.decided, cc.on = true, on
		cc.trusted.Store(trusted)
	}
	return cc.on
}

// channelFor decides, from the client's initialize, whether it gets channel
// notifications and whether one counts as read.
func channelFor(mode string, p *mcp.InitializeParams) (on, trusted bool) {
	switch mode {
	case ChannelOff:
		return false, false
	case ChannelOn:
		return true, true
	}
	if p != nil && p.ClientInfo != nil && p.ClientInfo.Name == "claude-code" {
		// Claude Code drops the notifications unless it was started with
		// channels on, which a server cannot see: never count them as read.
		return true, false
	}
	if p != nil && p.Capabilities != nil {
		if _, ok := p.Capabilities.Experimental[ChannelCapability]; ok {
			return true, true
		}
	}
	return false, false
}

// push queues a new message on every connection that takes notifications;
// it never blocks.
func (ch *channels) push(m client.Message) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for _, cc := range ch.conns {
		if !ch.decide(cc) {
			continue
		}
		select {
		case cc.queue <- m:
		default:
			ch.logf("channel queue full; message %s waits for check_messages", m.ID)
		}
	}
}

// write sends a connection's notifications until it closes.
func (ch *channels) write(cc *channelConn) {
	for {
		select {
		case <-cc.done:
			return
		case m := <-cc.queue:
			params, whole := channelParams(m)
			data, err := json.Marshal(params)
			if err != nil {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), channelWrite)
			err = cc.conn.Write(ctx, &jsonrpc.Request{Method: ChannelMethod, Params: data})
			cancel()
			if err != nil {
				ch.logf("channel notification for message %s not sent: %v", m.ID, err)
				continue
			}
			if cc.trusted.Load() && whole && ch.onRead != nil {
				if err := ch.onRead([]string{m.ID}); err != nil {
					ch.logf("mark message %s read: %v", m.ID, err)
				}
			}
		}
	}
}

// channelParams renders a message as a notification; whole is false when
// its text was cut.
func channelParams(m client.Message) (ChannelParams, bool) {
	who := sanitize.Name(m.FromName, m.From)
	to := ""
	if m.Kind != client.KindDirect {
		to = " → " + sanitize.Line(m.Target)
	}
	body := m.Text
	if m.DecryptError != "" {
		body = "[could not decrypt: " + m.DecryptError + "]"
	}
	body = sanitize.Text(body)
	whole := len(body) <= maxChannelContent
	if !whole {
		body = cutUTF8(body, maxChannelContent) + "\n(cut short: call check_messages for the whole message " + sanitize.Line(m.ID) + ")"
	}
	content := neutralizeTags(fmt.Sprintf("%s%s [%s]:\n%s", who, to, sanitize.Line(m.Priority), body))
	meta := map[string]string{
		"from_name":        metaValue(sanitize.Clip(m.FromName, sanitize.MaxNameRunes)),
		"from_pubkey":      metaValue(m.From),
		"from_fingerprint": sanitize.Fingerprint(m.From),
		"from_member_id":   metaValue(m.FromMemberID),
		"priority":         metaValue(m.Priority),
		"message_id":       metaValue(m.ID),
		"kind":             metaValue(m.Kind),
		"sent_at":          metaValue(m.CreatedAt),
	}
	if m.ClientMessageID != "" {
		meta["client_message_id"] = metaValue(m.ClientMessageID)
	}
	if m.Kind != client.KindDirect {
		meta["target"] = metaValue(m.Target)
	}
	for k, v := range meta {
		if v == "" {
			delete(meta, k)
		}
	}
	return ChannelParams{Content: content, Meta: meta}, whole
}

// metaValue makes a value safe as a tag attribute whatever Claude Code
// escapes: one sanitized line without quotes or angle brackets.
func metaValue(s string) string {
	return strings.NewReplacer(`"`, "'", "<", "‹", ">", "›").Replace(sanitize.Line(s))
}

// neutralizeTags keeps a message body from closing the <channel> element
// it is shown in, or opening a forged one: the "<" of such a tag becomes
// "‹".
func neutralizeTags(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '<' && (asciiPrefixFold(s[i+1:], "channel") || asciiPrefixFold(s[i+1:], "/channel")) {
			b.WriteString("‹")
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// asciiPrefixFold reports whether s starts with the lowercase ASCII word
// prefix, in any case.
func asciiPrefixFold(s, prefix string) bool {
	if len(s) < len(prefix) {
		return false
	}
	for i := 0; i < len(prefix); i++ {
		c := s[i]
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != prefix[i] {
			return false
		}
	}
	return true
}

func cutUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && s[n]&0xC0 == 0x80 {
		n--
	}
	return s[:n]
}
