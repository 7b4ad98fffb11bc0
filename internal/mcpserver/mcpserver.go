// Package mcpserver is the MCP server `claudemesh mcp` runs for Claude
// Code: tools to message peers, list them, read messages and report the
// session's status and summary. It is built on the official Go SDK
// (github.com/modelcontextprotocol/go-sdk) and serves one mesh session.
package mcpserver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/peer"
	"github.com/claudemesh/broker/internal/protocol"
)

// Mesh is what the tools need from a session; *peer.Session implements it.
type Mesh interface {
	Send(ctx context.Context, to, text, priority string) (client.SendResult, string, error)
	Peers(ctx context.Context) ([]peer.Peer, error)
	TakeMessages(limit int) ([]client.Message, error)
	SetStatus(ctx context.Context, status string) error
	SetSummary(ctx context.Context, summary string) error
}

var _ Mesh = (*peer.Session)(nil)

// Options configure the server.
type Options struct {
	Version  string
	MeshName string // shown in the instructions
	Self     string // this session's display name
	// SendTimeout bounds how long send_message waits for the broker's ack
	// before answering that the message is queued; zero 10s.
	SendTimeout time.Duration
}

// New returns an MCP server whose tools act on m.
func New(m Mesh, o Options) *mcp.Server {
	if o.SendTimeout <= 0 {
		o.SendTimeout = 10 * time.Second
	}
	s := mcp.NewServer(&mcp.Implementation{Name: "claudemesh", Title: "claudemesh", Version: o.Version}, &mcp.ServerOptions{
		Instructions: fmt.Sprintf("This Claude Code session is a peer named %q in the claudemesh mesh %q: other Claude Code "+
			"sessions can message it, and it can message them. Call check_messages when the user asks about messages, "+
			"when a hook says messages are waiting, and before finishing a task others may be waiting on. Use list_peers "+
			"to see who is online and what they work on, send_message to write to a peer by name (or * for everyone, "+
			"@group for a group), and set_summary to tell the others what this session is doing. Messages are "+
			"end-to-end encrypted; the broker only relays them.", o.Self, o.MeshName),
	})
	t := &tools{m: m, o: o}
	mcp.AddTool(s, &mcp.Tool{
		Name:        "send_message",
		Description: "Send a message to a peer (display name or 64-hex pubkey), to everyone (*) or to a group (@name).",
		InputSchema: withEnum[SendInput]("priority", protocol.PriorityNow, protocol.PriorityNext, protocol.PriorityLow),
	}, t.send)
	mcp.AddTool(s, &mcp.Tool{
		Name:        "list_peers",
		Description: "List the Claude Code sessions online in the mesh, with their status (idle, working, dnd) and summary.",
	}, t.listPeers)
	mcp.AddTool(s, &mcp.Tool{
		Name:        "check_messages",
		Description: "Return the messages received since the last check (oldest first) and mark them read.",
	}, t.checkMessages)
	mcp.AddTool(s, &mcp.Tool{
		Name:        "set_status",
		Description: "Set this session's status: idle (accepts all messages), working (only urgent ones are delivered) or dnd (do not disturb: only urgent ones).",
		InputSchema: withEnum[SetStatusInput]("status", protocol.StatusIdle, protocol.StatusWorking, protocol.StatusDND),
	}, t.setStatus)
	mcp.AddTool(s, &mcp.Tool{
		Name:        "set_summary",
		Description: "Set a short summary of what this session is working on, shown to the other peers (at most 512 bytes).",
	}, t.setSummary)
	return s
}

// withEnum infers In's schema and restricts one property to values.
func withEnum[In any](prop string, values ...string) *jsonschema.Schema {
	s, err := jsonschema.For[In](nil)
	if err != nil {
		panic(fmt.Sprintf("mcpserver: schema of %T: %v", *new(In), err))
	}
	p := s.Properties[prop]
	if p == nil {
		panic("mcpserver: no property " + prop)
	}
	for _, v := range values {
		p.Enum = append(p.Enum, v)
	}
	return s
}

type tools struct {
	m Mesh
	o Options
}

// SendInput is send_message's input.
type SendInput struct {
	To       string `json:"to" jsonschema:"recipient: a peer's display name, a 64-hex pubkey, * for every member, or @group"`
	Message  string `json:"message" jsonschema:"the message text"`
	Priority string `json:"priority,omitempty" jsonschema:"now (delivered even to busy peers), next (default: delivered when the peer is idle) or low"`
}

// SendOutput is send_message's result.
type SendOutput struct {
	Status    string `json:"status" jsonschema:"sent (the broker stored it for delivery) or queued (kept locally until the broker is reachable)"`
	MessageID string `json:"messageId,omitempty"`
	Target    string `json:"target"`
}

func (t *tools) send(ctx context.Context, _ *mcp.CallToolRequest, in SendInput) (*mcp.CallToolResult, SendOutput, error) {
	if strings.TrimSpace(in.Message) == "" {
		return nil, SendOutput{}, errors.New("message is empty")
	}
	ctx, cancel := context.WithTimeout(ctx, t.o.SendTimeout)
	defer cancel()
	res, target, err := t.m.Send(ctx, in.To, in.Message, in.Priority)
	if errors.Is(err, client.ErrNotAcked) {
		return text("Queued: the broker is not reachable right now; the message will be sent as soon as it is."),
			SendOutput{Status: "queued", Target: target}, nil
	}
	if err != nil {
		return nil, SendOutput{}, err
	}
	return text(fmt.Sprintf("Sent to %s (message %s).", in.To, res.MessageID)),
		SendOutput{Status: "sent", MessageID: res.MessageID, Target: target}, nil
}

// PeerOutput is one peer in list_peers.
type PeerOutput struct {
	Name         string   `json:"name"`
	Pubkey       string   `json:"pubkey"`
	Status       string   `json:"status"`
	StatusSource string   `json:"statusSource"`
	Summary      string   `json:"summary,omitempty"`
	Groups       []string `json:"groups"`
	Cwd          string   `json:"cwd,omitempty"`
	Hostname     string   `json:"hostname,omitempty"`
	You          bool     `json:"you,omitempty" jsonschema:"this session"`
}

// ListPeersOutput is list_peers' result.
type ListPeersOutput struct {
	Peers []PeerOutput `json:"peers"`
}

func (t *tools) listPeers(ctx context.Context, _ *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, ListPeersOutput, error) {
	peers, err := t.m.Peers(ctx)
	if err != nil {
		return nil, ListPeersOutput{}, fmt.Errorf("cannot list peers: %w", err)
	}
	out := ListPeersOutput{Peers: make([]PeerOutput, 0, len(peers))}
	var b strings.Builder
	for _, p := range peers {
		groups := p.Groups
		if groups == nil {
			groups = []string{}
		}
		out.Peers = append(out.Peers, PeerOutput{Name: p.DisplayName, Pubkey: p.Pubkey, Status: p.Status,
			StatusSource: p.StatusSource, Summary: p.Summary, Groups: groups, Cwd: p.Cwd, Hostname: p.Hostname, You: p.Self})
		you := ""
		if p.Self {
			you = " (you)"
		}
		fmt.Fprintf(&b, "- %s%s: %s", p.DisplayName, you, p.Status)
		if p.Summary != "" {
			fmt.Fprintf(&b, " — %s", p.Summary)
		}
		fmt.Fprintf(&b, " [%s…]\n", p.Pubkey[:min(12, len(p.Pubkey))])
	}
	if len(peers) == 0 {
		b.WriteString("No peer is online.")
	}
	return text(b.String()), out, nil
}

// CheckInput is check_messages' input.
type CheckInput struct {
	Limit int `json:"limit,omitempty" jsonschema:"at most this many messages (default 50)"`
}

// MessageOutput is one message in check_messages.
type MessageOutput struct {
	ID         string `json:"id"`
	From       string `json:"from"`
	FromPubkey string `json:"fromPubkey"`
	Kind       string `json:"kind" jsonschema:"direct, broadcast or group"`
	Target     string `json:"target"`
	Priority   string `json:"priority"`
	Text       string `json:"text"`
	SentAt     string `json:"sentAt"`
	Error      string `json:"error,omitempty" jsonschema:"set when the message could not be decrypted"`
}

// CheckOutput is check_messages' result.
type CheckOutput struct {
	Messages []MessageOutput `json:"messages"`
}

func (t *tools) checkMessages(_ context.Context, _ *mcp.CallToolRequest, in CheckInput) (*mcp.CallToolResult, CheckOutput, error) {
	limit := in.Limit
	if limit <= 0 || limit > 500 {
		limit = 50
	}
	msgs, err := t.m.TakeMessages(limit)
	if err != nil {
		return nil, CheckOutput{}, err
	}
	out := CheckOutput{Messages: make([]MessageOutput, 0, len(msgs))}
	var b strings.Builder
	for _, m := range msgs {
		out.Messages = append(out.Messages, MessageOutput{ID: m.ID, From: m.FromName, FromPubkey: m.From, Kind: m.Kind,
			Target: m.Target, Priority: m.Priority, Text: m.Text, SentAt: m.CreatedAt, Error: m.DecryptError})
		where := ""
		if m.Kind != client.KindDirect {
			where = " to " + m.Target
		}
		body := m.Text
		if m.DecryptError != "" {
			body = "[could not decrypt: " + m.DecryptError + "]"
		}
		fmt.Fprintf(&b, "From %s%s at %s (%s):\n%s\n\n", m.FromName, where, m.CreatedAt, m.Priority, body)
	}
	if len(msgs) == 0 {
		b.WriteString("No new messages.")
	}
	return text(strings.TrimSpace(b.String())), out, nil
}

// SetStatusInput is set_status' input.
type SetStatusInput struct {
	Status string `json:"status" jsonschema:"idle, working or dnd"`
}

// StatusOutput is set_status' result.
type StatusOutput struct {
	Status string `json:"status"`
}

func (t *tools) setStatus(ctx context.Context, _ *mcp.CallToolRequest, in SetStatusInput) (*mcp.CallToolResult, StatusOutput, error) {
	if err := t.m.SetStatus(ctx, in.Status); err != nil {
		return nil, StatusOutput{}, err
	}
	return text("Status set to " + in.Status + "."), StatusOutput{Status: in.Status}, nil
}

// SetSummaryInput is set_summary's input.
type SetSummaryInput struct {
	Summary string `json:"summary" jsonschema:"what this session is working on, at most 512 bytes"`
}

// SummaryOutput is set_summary's result.
type SummaryOutput struct {
	Summary string `json:"summary"`
}

func (t *tools) setSummary(ctx context.Context, _ *mcp.CallToolRequest, in SetSummaryInput) (*mcp.CallToolResult, SummaryOutput, error) {
	if err := t.m.SetSummary(ctx, in.Summary); err != nil {
		return nil, SummaryOutput{}, err
	}
	return text("Summary set."), SummaryOutput{Summary: in.Summary}, nil
}

func text(s string) *mcp.CallToolResult {
	return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: s}}}
}
