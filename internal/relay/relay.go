// Package relay wakes the nodes that host a message's recipients through
// Postgres LISTEN/NOTIFY. Notifications are only hints: the rows are already
// committed, every node re-scans after (re)listening and on a slow sweep, so a
// lost notification delays a delivery but never loses it.
//
// Senders notify after commit, once per channel per batch; channels come from
// a fixed set keyed by a hash of the mesh id (pgxlisten cannot add channels
// while listening), and every node listens to all of them.
package relay

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgxlisten"

	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/startstop"
)

// Channels is the number of mesh channels. Every node must agree on it.
const Channels = 16

// MaxPayload keeps NOTIFY payloads under Postgres' 8000-byte limit.
const MaxPayload = 7000

// maxNotifyPayload is Postgres' own limit: anything longer is not a
// notification Postgres delivered.
const maxNotifyPayload = 8000

// maxIDLen bounds the mesh and member ids of a wake-up (protocol.MaxIDLen).
const maxIDLen = protocol.MaxIDLen

// ChannelFor names the channel of a mesh.
func ChannelFor(meshID string) string {
	h := fnv.New32a()
	h.Write([]byte(meshID))
	return "cm_mesh_" + strconv.Itoa(int(h.Sum32()%Channels))
}

// NodeChannel names the channel of a node (by name, whatever its
// incarnation): envelopes of the remote fast path go only to the node that
// holds their lease, not to every listener. Names are hashed to fit
// Postgres' identifier limit; a collision costs a decode, nothing else
// (the envelope names its node).
func NodeChannel(node string) string {
	h := fnv.New64a()
	h.Write([]byte(node))
	return "cm_node_" + strconv.FormatUint(h.Sum64(), 16)
}

// AllChannels lists the mesh channels.
func AllChannels() []string {
	out := make([]string, Channels)
	for i := range out {
		out[i] = "cm_mesh_" + strconv.Itoa(i)
	}
	return out
}

// Wake is one mesh's part of a notification: its recipient members, or
// All when the payload had no room to list them.
type Wake struct {
	MeshID  string
	Members []string
	All     bool
}

// Encode renders wakes into payloads of at most MaxPayload bytes:
// "v1 <unix micros>" then one line per mesh, "meshId\tm1,m2" or
// "meshId\t*". A mesh whose members do not fit is sent as "*".
func Encode(sentAt time.Time, wakes []Wake) []string {
	header := "v1 " + strconv.FormatInt(sentAt.UnixMicro(), 10)
	var out []string
	var b strings.Builder
	b.WriteString(header)
	flush := func() {
		if b.Len() > len(header) {
			out = append(out, b.String())
		}
		b.Reset()
		b.WriteString(header)
	}
	for _, w := range wakes {
		line := "\n" + w.MeshID + "\t"
		if w.All {
			line += "*"
		} else {
			line += strings.Join(w.Members, ",")
		}
		if len(header)+len(line) > MaxPayload {
			line = "\n" + w.MeshID + "\t*"
		}
		if b.Len()+len(line) > MaxPayload {
			flush()
		}
		b.WriteString(line)
	}
	flush()
	return out
}

// Decode parses a payload made by Encode. Wake-ups are unauthenticated
// (any database role may NOTIFY): they only make a node claim, which
// reads the truth from Postgres, so they are checked for shape and size
// only. A malformed line is skipped (and counted in skipped) without
// losing the others; err is for a payload that is not a wake-up at all.
func Decode(payload string) (sentAt time.Time, wakes []Wake, skipped int, err error) {
	if len(payload) > maxNotifyPayload {
		return time.Time{}, nil, 0, errors.New("relay: payload longer than a notification can be")
	}
	lines := strings.Split(payload, "\n")
	head := strings.Fields(lines[0])
	if len(head) != 2 || head[0] != "v1" {
		return time.Time{}, nil, 0, errors.New("relay: unknown payload version")
	}
	us, err := strconv.ParseInt(head[1], 10, 64)
	if err != nil {
		return time.Time{}, nil, 0, fmt.Errorf("relay: bad timestamp: %w", err)
	}
	for _, line := range lines[1:] {
		w, ok := decodeLine(line)
		if !ok {
			skipped++
			continue
		}
		wakes = append(wakes, w)
	}
	return time.UnixMicro(us), wakes, skipped, nil
}

// decodeLine parses "meshId\tm1,m2" or "meshId\t*".
func decodeLine(line string) (Wake, bool) {
	mesh, members, ok := strings.Cut(line, "\t")
	if !ok || !validID(mesh) {
		return Wake{}, false
	}
	w := Wake{MeshID: mesh}
	switch members {
	case "*":
		w.All = true
	case "":
	default:
		w.Members = strings.Split(members, ",")
		for _, m := range w.Members {
			if !validID(m) {
				return Wake{}, false
			}
		}
	}
	return w, true
}

func validID(s string) bool { return s != "" && protocol.CheckText(s, maxIDLen) == nil }

// Notifications turns mesh → member wake-ups into NOTIFY channels and
// payloads (parallel slices), for a statement that notifies as it commits.
// Duplicate members are sent once; a nil member list wakes the whole mesh.
func Notifications(sentAt time.Time, meshes map[string][]string) (channels, payloads []string) {
	if len(meshes) == 0 {
		return nil, nil
	}
	wakes := make([]Wake, 0, len(meshes))
	for mesh, members := range meshes {
		w := Wake{MeshID: mesh, All: members == nil}
		seen := make(map[string]struct{}, len(members))
		for _, m := range members {
			if _, dup := seen[m]; !dup {
				seen[m] = struct{}{}
				w.Members = append(w.Members, m)
			}
		}
		wakes = append(wakes, w)
	}
	return batch(sentAt, wakes)
}

// batch groups wakes by channel and renders each channel's payloads: the
// one encoder of wake-up notifications, for the statement that commits a
// send batch and for the Notifier alike. Members are sorted and channels
// come out in order, so equal inputs make equal notifications.
func batch(sentAt time.Time, wakes []Wake) (channels, payloads []string) {
	byChannel := map[string][]Wake{}
	for _, w := range wakes {
		sort.Strings(w.Members)
		ch := ChannelFor(w.MeshID)
		byChannel[ch] = append(byChannel[ch], w)
	}
	names := make([]string, 0, len(byChannel))
	for ch := range byChannel {
		names = append(names, ch)
	}
	sort.Strings(names)
	for _, ch := range names {
		ws := byChannel[ch]
		sort.Slice(ws, func(i, j int) bool { return ws[i].MeshID < ws[j].MeshID })
		for _, p := range Encode(sentAt, ws) {
			channels = append(channels, ch)
			payloads = append(payloads, p)
		}
	}
	return channels, payloads
}

// NotifyFunc sends notifications (one statement, one transaction).
type NotifyFunc func(ctx context.Context, channels, payloads []string) error

// Notifier coalesces wake-ups and sends them after the caller's commit.
// While one NOTIFY is in flight, new wake-ups accumulate and go out
// together in the next one: one notifying transaction per batch, whatever
// the number of meshes and members. Wake-ups queued before Start go out
// once it runs; Stop sends what is queued.
type Notifier struct {
	startstop.Base
	send   NotifyFunc
	logger *slog.Logger
	onSent func(n int)

	mu      sync.Mutex
	pending map[string]map[string]struct{} // mesh → members; nil set means all
	wake    chan struct{}
}

var _ startstop.Service = (*Notifier)(nil)

// NewNotifier makes a notifier; onSent (optional) counts payloads sent.
func NewNotifier(send NotifyFunc, logger *slog.Logger, onSent func(int)) *Notifier {
	return &Notifier{
		send: send, logger: logger, onSent: onSent,
		pending: map[string]map[string]struct{}{},
		wake:    make(chan struct{}, 1),
	}
}

// Start runs the sending loop.
func (n *Notifier) Start(ctx context.Context) error {
	if _, ok := n.StartInit(ctx); !ok {
		return nil
	}
	n.Go(n.loop)
	return nil
}

// Stop sends what is queued and stops the loop.
func (n *Notifier) Stop(ctx context.Context) { n.Base.Stop(ctx) }

// Notify queues a wake-up for members of a mesh; nil members wakes every
// session of the mesh.
func (n *Notifier) Notify(meshID string, members []string) {
	n.mu.Lock()
	set, ok := n.pending[meshID]
	switch {
	case members == nil:
		n.pending[meshID] = nil
	case ok && set == nil:
		// already "all"
	default:
		if set == nil {
			set = make(map[string]struct{}, len(members))
			n.pending[meshID] = set
		}
		for _, m := range members {
			set[m] = struct{}{}
		}
	}
	n.mu.Unlock()
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

func (n *Notifier) loop(ctx context.Context) {
	for {
		select {
		case <-n.wake:
		case <-ctx.Done():
			n.flush() // last call: send what is queued
			return
		}
		n.flush()
	}
}

func (n *Notifier) flush() {
	n.mu.Lock()
	pending := n.pending
	n.pending = map[string]map[string]struct{}{}
	n.mu.Unlock()
	if len(pending) == 0 {
		return
	}
	wakes := make([]Wake, 0, len(pending))
	for mesh, set := range pending {
		w := Wake{MeshID: mesh, All: set == nil}
		for m := range set {
			w.Members = append(w.Members, m)
		}
		wakes = append(wakes, w)
	}
	channels, payloads := batch(time.Now(), wakes)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.send(ctx, channels, payloads); err != nil {
		// Nothing is lost: the recipients' nodes re-scan on their sweep.
		n.logger.Warn("relay notify failed; recipients will be found by the sweep", "err", err, "payloads", len(payloads))
		return
	}
	if n.onSent != nil {
		n.onSent(len(payloads))
	}
}

// Handlers receive what the listener hears. They must not block for long.
type Handlers struct {
	// Wake is called for each mesh of a delivery notification.
	Wake func(sentAt time.Time, w Wake)
	// Envelope is called for a row carried whole (the remote fast path).
	Envelope func(sentAt time.Time, e Envelope)
	// MemberChange is called with a member-channel payload (unchecked:
	// the receiver validates it).
	MemberChange func(payload string)
	// Rejected is called for each notification, or line of one, refused:
	// "bad_seal" for an envelope not sealed with the key, "malformed" for
	// anything that does not parse.
	Rejected func(reason string)
	// Listening is called after every (re)LISTEN, before notifications
	// flow: the node re-scans for anything it may have missed.
	Listening func()
}

// Listener is the node's single LISTEN connection.
type Listener struct {
	startstop.Base
	l      *pgxlisten.Listener
	logger *slog.Logger
}

var _ startstop.Service = (*Listener)(nil)

// NewListener prepares a listener on the mesh channels, memberChannel and
// nodeChannel (this node's envelopes, checked with key). connect must
// return a dedicated connection (not from the pool).
func NewListener(connect func(ctx context.Context) (*pgx.Conn, error), memberChannel, nodeChannel string, key *EnvelopeKey, h Handlers, logger *slog.Logger) *Listener {
	l := &pgxlisten.Listener{
		Connect: connect,
		LogError: func(ctx context.Context, err error) {
			if ctx.Err() == nil {
				logger.Warn("relay listener error", "err", err)
			}
		},
		ReconnectDelay: time.Second,
	}
	// Refused notifications are counted, and logged at most once a
	// minute: any database role can send them, as fast as it likes.
	var lastLog atomic.Int64
	reject := func(n *pgconn.Notification, reason string, err error) {
		if h.Rejected != nil {
			h.Rejected(reason)
		}
		if now := time.Now().UnixNano(); now-lastLog.Load() > int64(time.Minute) {
			lastLog.Store(now)
			logger.Warn("relay notification refused", "channel", n.Channel, "backend_pid", n.PID, "reason", reason, "err", err)
		}
	}
	mesh := func(ctx context.Context, n *pgconn.Notification, _ *pgx.Conn) error {
		if IsEnvelope(n.Payload) {
			sentAt, e, err := DecodeEnvelope(n.Payload, key)
			switch {
			case errors.Is(err, ErrBadSeal):
				// Its row, if there is one, is leased to this node and
				// taken by the next claim or sweep.
				reject(n, "bad_seal", err)
			case err != nil:
				reject(n, "malformed", err)
			default:
				h.Envelope(sentAt, e)
			}
			return nil
		}
		sentAt, wakes, skipped, err := Decode(n.Payload)
		if err != nil {
			reject(n, "malformed", err)
			return nil
		}
		for range skipped {
			reject(n, "malformed", errors.New("relay: malformed wake-up line"))
		}
		for _, w := range wakes {
			h.Wake(sentAt, w)
		}
		return nil
	}
	member := func(_ context.Context, n *pgconn.Notification, _ *pgx.Conn) error {
		h.MemberChange(n.Payload)
		return nil
	}
	// pgxlisten calls each handler's backlog right after that channel's
	// LISTEN; the re-scan must wait until every channel listens, or a
	// notification could slip between the scan and the last LISTEN.
	total := Channels + 2
	var mu sync.Mutex
	var conn *pgx.Conn
	count := 0
	backlog := func(_ context.Context, _ string, c *pgx.Conn) error {
		mu.Lock()
		if c != conn {
			conn, count = c, 0
		}
		count++
		done := count == total
		mu.Unlock()
		if done {
			h.Listening()
		}
		return nil
	}
	for _, ch := range AllChannels() {
		l.Handle(ch, handler{mesh, backlog})
	}
	l.Handle(memberChannel, handler{member, backlog})
	l.Handle(nodeChannel, handler{mesh, backlog})
	return &Listener{l: l, logger: logger}
}

// handler adapts functions to pgxlisten's Handler and BacklogHandler.
type handler struct {
	notify  func(context.Context, *pgconn.Notification, *pgx.Conn) error
	backlog func(context.Context, string, *pgx.Conn) error
}

func (h handler) HandleNotification(ctx context.Context, n *pgconn.Notification, c *pgx.Conn) error {
	return h.notify(ctx, n, c)
}

func (h handler) HandleBacklog(ctx context.Context, channel string, c *pgx.Conn) error {
	return h.backlog(ctx, channel, c)
}

// Start listens until Stop, reconnecting after a second on failure.
func (l *Listener) Start(ctx context.Context) error {
	if _, ok := l.StartInit(ctx); !ok {
		return nil
	}
	l.Go(func(ctx context.Context) {
		if err := l.l.Listen(ctx); err != nil && ctx.Err() == nil {
			l.logger.Error("relay listener stopped", "err", err)
		}
	})
	return nil
}

// Stop closes the connection.
func (l *Listener) Stop(ctx context.Context) { l.Base.Stop(ctx) }
