package presence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/claudemesh/broker/internal/protocol"
)

// Options configure the gossip layer.
type Options struct {
	Name          string // node name, unique in the cluster
	Incarnation   int64  // changes on every start
	BindAddr      string // IP to bind ("" or "0.0.0.0" or "::" for all)
	BindPort      int    // 0 picks a free port
	AdvertiseAddr string // IP others reach us at; "" lets memberlist choose
	AdvertisePort int
	Profile       string // lan, wan, local or test
	Secret        string // enables AES-GCM gossip encryption when set
	HTTPAddr      string // carried in node metadata for operators
	Logger        *slog.Logger
	// WrapTransport, when set, wraps the network transport (tests use it
	// to cut the network between nodes).
	WrapTransport func(memberlist.NodeAwareTransport) memberlist.NodeAwareTransport
	// OnInvalid is called for each gossip message dropped as malformed.
	OnInvalid func()
	// OnDropped is called for each presence entry refused (reason: see
	// the drop* constants); OnCommandDropped for each command refused.
	OnDropped        func(reason string)
	OnCommandDropped func()
	// OnRefused is called for each stream or packet memberlist refused
	// (not encrypted with the cluster key, or undecodable).
	OnRefused func()
	// OnState is called with the size of every push-pull state sent, and
	// whether it was above 60 % of memberlist's limit.
	OnState func(bytes int, warn bool)
}

// Command is a request sent to the node that owns a presence.
type Command struct {
	Kind       string `json:"k"` // "hook"
	PresenceID string `json:"p"`
	Status     string `json:"s,omitempty"`
	Source     string `json:"src,omitempty"`
	From       string `json:"f,omitempty"`
}

// NodeEvent reports a cluster membership change.
type NodeEvent struct {
	Name        string
	Incarnation int64
	Addr        string
	Up          bool
}

// NodeInfo describes one cluster member.
type NodeInfo struct {
	Name        string `json:"name"`
	Addr        string `json:"gossipAddr"`
	HTTPAddr    string `json:"httpAddr"`
	Incarnation int64  `json:"incarnation"`
	State       string `json:"state"`
	Self        bool   `json:"self"`
}

type nodeMeta struct {
	Inc  int64  `json:"i"`
	HTTP string `json:"h,omitempty"`
	// Acks: the node acknowledges delta packets (deltas.go).
	Acks bool `json:"a,omitempty"`
}

// Message kinds on the wire (first byte).
const (
	msgDeltas  byte = 'D'
	msgCommand byte = 'C'
	msgAck     byte = 'A'
	msgLeave   byte = 'L'
)

// leaveMsg says that node From (incarnation Inc) is leaving.
type leaveMsg struct {
	From string `json:"f"`
	Inc  int64  `json:"i"`
}

// deltaMsg carries changed entries of the sending node. Inc is its
// incarnation (0 from nodes that predate it). Seq, on a packet, asks for
// an ack (ackMsg); a delta without entries is a heartbeat.
type deltaMsg struct {
	From    string  `json:"f"`
	Inc     int64   `json:"i,omitempty"`
	Seq     uint64  `json:"q,omitempty"`
	Entries []Entry `json:"e"`
}

// deltaOut is deltaMsg with its entries already encoded.
type deltaOut struct {
	From    string            `json:"f"`
	Inc     int64             `json:"i,omitempty"`
	Seq     uint64            `json:"q,omitempty"`
	Entries []json.RawMessage `json:"e"`
}

// stateMsg is a node's push-pull state: its own present entries. Partial
// means some were left out to stay under memberlist's limit, so entries
// it does not list are not to be taken as deleted.
type stateMsg struct {
	From    string  `json:"f"`
	Inc     int64   `json:"i"`
	Clock   uint64  `json:"c"`
	Entries []Entry `json:"e"`
	Partial bool    `json:"p,omitempty"`
}

// memberlistStateLimit is memberlist v0.7.0's limit on a push-pull state
// (maxPushStateBytes in its net.go, unexported): a state above it is
// refused whole, and the node sending it can join nobody. Above
// stateWarnAt this node warns; above stateMaxBytes it sends a partial
// state (deltas still carry every entry).
const (
	memberlistStateLimit = 20 << 20
	stateWarnAt          = memberlistStateLimit * 6 / 10
	stateMaxBytes        = memberlistStateLimit * 8 / 10
)

// Cluster replicates a Replica over memberlist. Deltas of the node's own
// entries go straight to every other node, coalesced per peer, as
// acknowledged packets (deltas.go); push-pull exchanges of whole snapshots
// (with a node that joins or comes back at once, with a random one
// periodically) repair anything a lost delta missed.
type Cluster struct {
	opts    Options
	replica *Replica
	ml      *memberlist.Memberlist
	logger  *slog.Logger
	timings deltaTimings
	// packetBudget is the largest delta sent as a packet, in bytes.
	packetBudget int
	stats        stats

	onCommand func(Command)
	onNode    func(NodeEvent)
	onReach   func(ReachEvent)

	mu     sync.Mutex
	peers  map[string]*peer     // live members; guarded by mu
	dead   map[string]*deadPeer // members declared dead, contacted again; guarded by mu
	closed bool
	cmds   chan Command
	done   chan struct{}
	wg     sync.WaitGroup
	dials  sync.WaitGroup // reconnect attempts (a dial may outlast Shutdown)
}

// peer is one remote node as the delta channel sees it.
type peer struct {
	name    string
	wake    chan struct{} // the send loop has something to do
	syncReq chan struct{} // a push-pull with the peer is wanted
	stop    chan struct{} // closed when the peer leaves

	leaving atomic.Bool // it said it is leaving (not a failure when it goes)

	mu   sync.Mutex
	node *memberlist.Node // a copy (copyNode); guarded by mu
	inc  int64            // its incarnation, from its metadata; guarded by mu
	acks bool             // it acknowledges packets; guarded by mu

	// The rest is guarded by mu and owned by the peer's sendLoop, except
	// what Replicate and acked change.
	pending  map[string]struct{} // own presence ids to send
	inflight map[uint64]*flight  // packets awaiting their ack, by seq
	latest   map[string]uint64   // id → the newest packet in flight carrying it
	seq      uint64
	failures int       // timeouts and failed sends since the last ack
	retryAt  time.Time // no reliable send before
	rtt      rtt
	// lastPacket is when a packet was last sent; lastHeard when an ack
	// last came; silentSince when the first packet still unanswered was
	// sent (zero, or before lastHeard, when none is).
	lastPacket, lastHeard, silentSince time.Time
	reachable                          bool // as last reported
}

func newPeer(n *memberlist.Node, meta nodeMeta) *peer {
	return &peer{name: n.Name, node: copyNode(n), inc: meta.Inc, acks: meta.Acks,
		wake: make(chan struct{}, 1), syncReq: make(chan struct{}, 1), stop: make(chan struct{}),
		pending: map[string]struct{}{}, inflight: map[uint64]*flight{}, latest: map[string]uint64{}, reachable: true}
}

// maxDeltaBatch and maxDeltaBytes bound one reliable message (memberlist
// refuses user messages above 20 MiB).
const (
	maxDeltaBatch = 2000
	maxDeltaBytes = 1 << 20
)

// New creates a cluster layer for replica. Call SetHandlers, then Start.
func New(opts Options, replica *Replica) *Cluster {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Cluster{
		opts: opts, replica: replica, logger: opts.Logger, timings: timingsFor(opts.Profile),
		peers: map[string]*peer{}, dead: map[string]*deadPeer{}, cmds: make(chan Command, 1024), done: make(chan struct{}),
	}
	return c
}

// SetHandlers sets the callbacks for commands addressed to this node and
// for membership changes. They run on the cluster's goroutines.
func (c *Cluster) SetHandlers(onCommand func(Command), onNode func(NodeEvent)) {
	c.onCommand, c.onNode = onCommand, onNode
}

func (c *Cluster) config() (*memberlist.Config, error) {
	var cfg *memberlist.Config
	switch c.opts.Profile {
	case "wan":
		cfg = memberlist.DefaultWANConfig()
		// memberlist's WAN timings (probe every 5 s, 3 s timeout,
		// suspicion × 6) let a region that stopped answering stay alive
		// for over 30 s, and senders route rows to its sessions meanwhile.
		// A node is now suspected when a probe, its indirect probes and
		// the TCP fallback all go unanswered for a second, and declared
		// dead 2 s after that unless it refutes (the suspicion reaches it
		// with the next probe or gossip, 200 ms apart): ~3.5 s in all,
		// at worst ~6 s. The probe timeout stays above any round trip
		// on Earth (~350 ms) with room for a loaded node.
		cfg.ProbeInterval = time.Second
		cfg.ProbeTimeout = 600 * time.Millisecond
		cfg.SuspicionMult = 2
		cfg.GossipInterval = 200 * time.Millisecond
		// Bounds a push-pull or reliable send to a node that vanished
		// mid-way (memberlist's WAN 30 s holds a reconnect that long).
		cfg.TCPTimeout = 10 * time.Second
	case "local":
		cfg = memberlist.DefaultLocalConfig()
		cfg.PushPullInterval = 5 * time.Second
	case "test":
		cfg = memberlist.DefaultLocalConfig()
		cfg.ProbeInterval = 200 * time.Millisecond
		cfg.ProbeTimeout = 100 * time.Millisecond
		cfg.SuspicionMult = 2
		cfg.PushPullInterval = time.Second
		cfg.GossipInterval = 50 * time.Millisecond
		cfg.TCPTimeout = time.Second
		cfg.GossipToTheDeadTime = 2 * time.Second
		cfg.DeadNodeReclaimTime = time.Millisecond
	default:
		cfg = memberlist.DefaultLANConfig()
		cfg.PushPullInterval = 10 * time.Second
	}
	if c.opts.Profile != "wan" {
		// Deltas are JSON of a few hundred bytes per entry; on a LAN the
		// CPU that LZW compression costs buys nothing.
		cfg.EnableCompression = false
	}
	if cfg.DeadNodeReclaimTime == 0 {
		// A restarted node keeps its name even if its address changed.
		cfg.DeadNodeReclaimTime = 10 * time.Second
	}
	c.packetBudget = cfg.UDPBufferSize - packetOverhead
	cfg.Name = c.opts.Name
	cfg.BindAddr = c.opts.BindAddr
	if cfg.BindAddr == "" {
		cfg.BindAddr = "0.0.0.0"
	}
	cfg.BindPort = c.opts.BindPort
	cfg.AdvertiseAddr = c.opts.AdvertiseAddr
	cfg.AdvertisePort = c.opts.AdvertisePort
	if cfg.AdvertisePort == 0 {
		cfg.AdvertisePort = cfg.BindPort
	}
	if c.opts.Secret != "" {
		key := sha256.Sum256([]byte(c.opts.Secret))
		cfg.SecretKey = key[:]
	}
	cfg.Delegate = &delegate{c}
	cfg.Events = &events{c}
	cfg.Logger = log.New(&logWriter{logger: c.logger, onRefused: c.opts.OnRefused}, "", 0)
	if c.opts.WrapTransport != nil {
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{cfg.BindAddr}, BindPort: cfg.BindPort, Logger: cfg.Logger,
		})
		if err != nil {
			return nil, fmt.Errorf("gossip transport: %w", err)
		}
		if cfg.BindPort == 0 {
			cfg.BindPort = nt.GetAutoBindPort()
			if c.opts.AdvertisePort == 0 {
				cfg.AdvertisePort = cfg.BindPort
			}
		}
		cfg.Transport = c.opts.WrapTransport(nt)
	}
	return cfg, nil
}

// Start creates the memberlist (binding the gossip port).
func (c *Cluster) Start() error {
	cfg, err := c.config()
	if err != nil {
		return err
	}
	ml, err := memberlist.Create(cfg)
	if err != nil {
		return fmt.Errorf("start gossip on %s:%d: %w", cfg.BindAddr, cfg.BindPort, err)
	}
	c.ml = ml
	c.wg.Add(2)
	go c.commandLoop()
	go c.reconnectLoop()
	return nil
}

// LocalAddr is the gossip address other nodes should use to join us.
func (c *Cluster) LocalAddr() string {
	n := c.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// Join contacts existing members (host[:port] or DNS names resolving to
// several addresses). It returns how many it reached.
func (c *Cluster) Join(addrs []string) (int, error) {
	var targets []string
	self := c.LocalAddr()
	for _, a := range addrs {
		a = strings.TrimSpace(a)
		if a == "" || a == self {
			continue
		}
		targets = append(targets, a)
	}
	if len(targets) == 0 {
		return 0, nil
	}
	return c.ml.Join(targets)
}

// NumMembers counts live nodes, this one included.
func (c *Cluster) NumMembers() int { return c.ml.NumMembers() }

// Members lists the live nodes.
func (c *Cluster) Members() []NodeInfo {
	var out []NodeInfo
	for _, n := range c.ml.Members() {
		var meta nodeMeta
		_ = json.Unmarshal(n.Meta, &meta)
		out = append(out, NodeInfo{
			Name: n.Name, Addr: net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))),
			HTTPAddr: meta.HTTP, Incarnation: meta.Inc, State: stateName(n.State), Self: n.Name == c.opts.Name,
		})
	}
	return out
}

func stateName(s memberlist.NodeStateType) string {
	switch s {
	case memberlist.StateAlive:
		return "alive"
	case memberlist.StateSuspect:
		return "suspect"
	case memberlist.StateLeft:
		return "left"
	}
	return "dead"
}

// Replicate queues own entries for every other node. It never blocks.
func (c *Cluster) Replicate(entries []Entry) {
	c.mu.Lock()
	peers := make([]*peer, 0, len(c.peers))
	for _, p := range c.peers {
		peers = append(peers, p)
	}
	c.mu.Unlock()
	for _, p := range peers {
		p.mu.Lock()
		for _, e := range entries {
			p.pending[e.PresenceID] = struct{}{}
		}
		p.mu.Unlock()
		poke(p.wake)
	}
}

// wireEntry is an own entry as it travels: tombstones stripped (the text
// of an entry was bounded when it was made, see bound).
func wireEntry(e Entry) Entry {
	if e.State == Gone {
		return tombstone(e)
	}
	return e
}

// Send delivers a command to node name over the reliable channel.
func (c *Cluster) Send(name string, cmd Command) error {
	cmd.From = c.opts.Name
	if name == c.opts.Name {
		select {
		case c.cmds <- cmd:
			return nil
		default:
			return errors.New("command queue full")
		}
	}
	c.mu.Lock()
	p := c.peers[name]
	c.mu.Unlock()
	if p == nil {
		return fmt.Errorf("node %s is not in the cluster", name)
	}
	p.mu.Lock()
	target := p.node
	p.mu.Unlock()
	body, _ := Marshal(cmd)
	return c.ml.SendReliable(target, append([]byte{msgCommand}, body...))
}

func (c *Cluster) commandLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.done:
			return
		case cmd := <-c.cmds:
			if c.onCommand != nil {
				c.onCommand(cmd)
			}
		}
	}
}

// Leave announces departure and waits up to timeout for it to spread.
func (c *Cluster) Leave(timeout time.Duration) error {
	if c.ml == nil {
		return nil
	}
	// memberlist tells its delegates neither whether a node that went
	// left or failed (Node.State is never set), so the others are told
	// directly that this one is leaving: they will not try to reach it
	// again, nor count a death.
	c.mu.Lock()
	nodes := make([]*memberlist.Node, 0, len(c.peers))
	for _, p := range c.peers {
		p.mu.Lock()
		if p.acks { // nodes that predate it would count it as invalid
			nodes = append(nodes, p.node)
		}
		p.mu.Unlock()
	}
	c.mu.Unlock()
	body, _ := Marshal(leaveMsg{From: c.opts.Name, Inc: c.opts.Incarnation})
	for _, n := range nodes {
		_ = c.ml.SendBestEffort(n, append([]byte{msgLeave}, body...))
	}
	return c.ml.Leave(timeout)
}

// Shutdown stops gossip. It is idempotent.
func (c *Cluster) Shutdown() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.done)
	c.mu.Unlock()
	var err error
	if c.ml != nil {
		err = c.ml.Shutdown()
	}
	c.wg.Wait()
	// A reconnect attempt blocked in a dial to a vanished address ends
	// with the dial's timeout; it is not waited for longer than this.
	dialed := make(chan struct{})
	go func() {
		c.dials.Wait()
		close(dialed)
	}()
	select {
	case <-dialed:
	case <-time.After(time.Second):
	}
	return err
}

func (c *Cluster) invalid(what string, err error) {
	c.logger.Warn("dropped invalid gossip message", "what", what, "err", err)
	if c.opts.OnInvalid != nil {
		c.opts.OnInvalid()
	}
}

func (c *Cluster) dropped(reason string) {
	if c.opts.OnDropped != nil {
		c.opts.OnDropped(reason)
	}
}

// accept keeps the entries of a message from node from (incarnation inc,
// 0 when it did not say) that it may send: only its own (a node speaks for
// nobody else, so one faulty or hostile node cannot rewrite the others'
// sessions, and a takeover or a dead node's orphans are settled by their
// own entries' epochs), each within the caps (checkEntry, MaxEntryBytes).
// One bad entry costs only itself.
func (c *Cluster) accept(from string, inc int64, in []Entry) []Entry {
	out := in[:0]
	for i := range in {
		e := in[i]
		if e.Owner != from || (inc != 0 && e.OwnerInc != inc) {
			c.dropped(dropNotOwner)
			continue
		}
		if err := checkEntry(&e); err != nil {
			c.dropped(dropReason(err))
			continue
		}
		if b, err := Marshal(e); err != nil || len(b) > MaxEntryBytes {
			c.dropped(dropTooLarge)
			continue
		}
		e.orphaned, e.orphanUntil = false, 0
		out = append(out, e)
	}
	return out
}

// sender checks the node a message says it comes from: a name, and not
// this node (it never gossips to itself).
func (c *Cluster) sender(from string) error {
	if from == "" || len(from) > MaxEntryIDLen {
		return errors.New("message without a valid sender")
	}
	if from == c.opts.Name {
		return errors.New("message claims to come from this node")
	}
	return nil
}

// validCommand checks a command from another node: a hook with a status
// and no other source, for a presence this node owns.
func (c *Cluster) validCommand(cmd *Command) error {
	if cmd.Kind != "hook" {
		return fmt.Errorf("unknown command kind %q", truncate(cmd.Kind, 32))
	}
	if err := c.sender(cmd.From); err != nil {
		return err
	}
	if cmd.PresenceID == "" || len(cmd.PresenceID) > MaxEntryIDLen || protocol.CheckText(cmd.PresenceID, 0) != nil {
		return errors.New("command without a valid presence id")
	}
	if !protocol.ValidStatus(cmd.Status) || (cmd.Source != "" && cmd.Source != protocol.SourceHook) {
		return fmt.Errorf("hook command with status %q source %q", truncate(cmd.Status, 16), truncate(cmd.Source, 16))
	}
	if !c.replica.Owns(cmd.PresenceID) {
		return errors.New("command for a presence this node does not own")
	}
	return nil
}

// delegate adapts memberlist's Delegate to the cluster.
type delegate struct{ c *Cluster }

func (d *delegate) NodeMeta(limit int) []byte {
	b, _ := json.Marshal(nodeMeta{Inc: d.c.opts.Incarnation, HTTP: d.c.opts.HTTPAddr, Acks: true})
	if len(b) > limit {
		b, _ = json.Marshal(nodeMeta{Inc: d.c.opts.Incarnation, Acks: true})
	}
	return b
}

func (d *delegate) NotifyMsg(b []byte) {
	if len(b) == 0 {
		d.c.invalid("empty", errors.New("empty message"))
		return
	}
	switch b[0] {
	case msgDeltas:
		var m deltaMsg
		if err := json.Unmarshal(b[1:], &m); err != nil {
			d.c.invalid("deltas", err)
			return
		}
		if err := d.c.sender(m.From); err != nil {
			d.c.invalid("deltas", err)
			return
		}
		if len(m.Entries) > 0 {
			d.c.replica.Apply(d.c.accept(m.From, m.Inc, m.Entries))
		}
		if m.Seq != 0 {
			d.c.sendAck(m.From, m.Inc, m.Seq)
		}
	case msgAck:
		var m ackMsg
		if err := json.Unmarshal(b[1:], &m); err != nil {
			d.c.invalid("ack", err)
			return
		}
		if err := d.c.sender(m.From); err != nil {
			d.c.invalid("ack", err)
			return
		}
		d.c.mu.Lock()
		p := d.c.peers[m.From]
		d.c.mu.Unlock()
		if p == nil || m.To != d.c.opts.Incarnation {
			return // for an earlier incarnation of this node, or from a node gone since
		}
		d.c.acked(p, m.Seq)
	case msgLeave:
		var m leaveMsg
		if err := json.Unmarshal(b[1:], &m); err != nil {
			d.c.invalid("leave", err)
			return
		}
		if err := d.c.sender(m.From); err != nil {
			d.c.invalid("leave", err)
			return
		}
		d.c.mu.Lock()
		p := d.c.peers[m.From]
		d.c.mu.Unlock()
		if p != nil {
			p.mu.Lock()
			same := p.inc == m.Inc
			p.mu.Unlock()
			if same {
				p.leaving.Store(true)
			}
		}
	case msgCommand:
		var cmd Command
		if err := json.Unmarshal(b[1:], &cmd); err != nil {
			d.c.invalid("command", err)
			return
		}
		if err := d.c.validCommand(&cmd); err != nil {
			d.c.logger.Warn("dropped cluster command", "from", truncate(cmd.From, 64), "err", err)
			if d.c.opts.OnCommandDropped != nil {
				d.c.opts.OnCommandDropped()
			}
			return
		}
		select {
		case d.c.cmds <- cmd:
		default:
			d.c.logger.Warn("command queue full; dropping", "kind", cmd.Kind)
		}
	default:
		d.c.invalid("unknown kind", fmt.Errorf("kind %q", b[0]))
	}
}

// maxLamport bounds the epochs and versions accepted from other nodes. A
// Lamport clock moves by one per change, so only a corrupt or forged
// message carries more; merging it would wrap this node's clock, and every
// change it makes afterwards would lose to older entries.
const maxLamport = 1 << 62

func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }

// LocalState is this node's own present entries (OwnSnapshot): what it
// says of other nodes' sessions is theirs to say.
func (d *delegate) LocalState(join bool) []byte {
	clock, entries := d.c.replica.OwnSnapshot()
	m := stateMsg{From: d.c.opts.Name, Inc: d.c.opts.Incarnation, Clock: clock, Entries: entries}
	b, _ := Marshal(m)
	if len(b) > stateMaxBytes {
		// Memberlist would refuse the whole state, and no node could join
		// this one. Send what fits; deltas carry the rest.
		size, keep := 256, 0
		for keep < len(entries) {
			e, _ := Marshal(entries[keep])
			if size+len(e)+1 > stateMaxBytes {
				break
			}
			size += len(e) + 1
			keep++
		}
		m.Entries, m.Partial = entries[:keep], true
		b, _ = Marshal(m)
	}
	warn := len(b) > stateWarnAt
	if warn {
		d.c.logger.Warn("gossip state near memberlist's limit: nodes may fail to join",
			"bytes", len(b), "limit", memberlistStateLimit, "entries", len(entries), "partial", m.Partial)
	}
	if d.c.opts.OnState != nil {
		d.c.opts.OnState(len(b), warn)
	}
	return b
}

func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	if len(buf) == 0 {
		return
	}
	var m stateMsg
	if err := json.Unmarshal(buf, &m); err != nil {
		d.c.invalid("state", err)
		return
	}
	if err := d.c.sender(m.From); err != nil {
		d.c.invalid("state", err)
		return
	}
	if m.Inc == 0 || m.Clock > maxLamport {
		d.c.invalid("state", errors.New("state without incarnation or with a clock beyond any"))
		return
	}
	entries := d.c.accept(m.From, m.Inc, m.Entries)
	if m.Partial || len(entries) < len(m.Entries) {
		// Entries it did not list (or that were refused) may still be
		// there: only add, delete nothing.
		d.c.replica.Apply(entries)
		return
	}
	d.c.replica.MergeSnapshot(m.From, m.Inc, m.Clock, entries)
}

// events adapts memberlist's EventDelegate.
type events struct{ c *Cluster }

func (e *events) NotifyJoin(n *memberlist.Node)   { e.c.nodeUp(n) }
func (e *events) NotifyUpdate(n *memberlist.Node) { e.c.nodeUp(n) }
func (e *events) NotifyLeave(n *memberlist.Node)  { e.c.nodeDown(n) }

// copyNode copies a node memberlist hands to an event callback. The
// original is memberlist's own state, updated later under its lock: it
// must not be read once the callback has returned.
func copyNode(n *memberlist.Node) *memberlist.Node {
	cp := *n
	cp.Addr = slices.Clone(n.Addr)
	cp.Meta = slices.Clone(n.Meta)
	return &cp
}

func (c *Cluster) nodeUp(n *memberlist.Node) {
	if n.Name == c.opts.Name {
		return
	}
	var meta nodeMeta
	_ = json.Unmarshal(n.Meta, &meta)
	c.replica.NodeAlive(n.Name, meta.Inc)
	c.mu.Lock()
	delete(c.dead, n.Name)
	p, ok := c.peers[n.Name]
	sync := false
	if !ok && !c.closed {
		p = newPeer(n, meta)
		c.peers[n.Name] = p
		c.wg.Add(2)
		go c.sendLoop(p)
		go c.syncLoop(p)
		sync = true
	} else if ok {
		p.mu.Lock()
		p.node = copyNode(n)
		p.acks = meta.Acks
		if p.inc != meta.Inc {
			// Restarted under the same name: what was in flight went to
			// the previous process.
			sync = true
			p.inc = meta.Inc
			clear(p.inflight)
			clear(p.latest)
			p.failures, p.retryAt, p.silentSince = 0, time.Time{}, time.Time{}
		}
		p.mu.Unlock()
	}
	c.mu.Unlock()
	if sync {
		// A node learns each node's sessions from that node only (accept),
		// and one that comes back missed the deltas of its absence: both
		// sides send their full state now rather than at the next random
		// push-pull, which also removes what was deleted meanwhile.
		poke(p.syncReq)
	}
	if !ok && p != nil {
		c.logger.Info("cluster node joined", "peer", n.Name, "addr", n.Address())
		c.reachChanged(ReachEvent{Name: n.Name, Incarnation: meta.Inc, Reachable: true})
	}
	if c.onNode != nil {
		c.onNode(NodeEvent{Name: n.Name, Incarnation: meta.Inc, Addr: n.Address(), Up: true})
	}
}

func (c *Cluster) nodeDown(n *memberlist.Node) {
	if n.Name == c.opts.Name {
		return
	}
	var meta nodeMeta
	_ = json.Unmarshal(n.Meta, &meta)
	c.replica.NodeDead(n.Name)
	c.mu.Lock()
	p, ok := c.peers[n.Name]
	failed := !ok || !p.leaving.Load()
	if ok {
		close(p.stop)
		delete(c.peers, n.Name)
	}
	if failed && !c.closed {
		c.noteDead(n.Name, n.Address())
	}
	c.mu.Unlock()
	if failed {
		c.stats.deaths.Add(1)
	}
	how := "left"
	if failed {
		how = "failed"
	}
	c.logger.Info("cluster node gone", "peer", n.Name, "how", how)
	if ok {
		p.mu.Lock()
		was := p.reachable
		p.reachable = false
		p.mu.Unlock()
		if was {
			c.reachChanged(ReachEvent{Name: n.Name, Incarnation: meta.Inc, Reachable: false})
		}
	}
	if c.onNode != nil {
		c.onNode(NodeEvent{Name: n.Name, Incarnation: meta.Inc, Addr: n.Address(), Up: false})
	}
}

// logWriter sends memberlist's log lines to slog at their level, and
// counts the streams and packets memberlist refused: it has no other
// signal for them.
type logWriter struct {
	logger    *slog.Logger
	onRefused func()
}

func (w *logWriter) Write(p []byte) (int, error) {
	line := string(bytes.TrimSpace(p))
	level := slog.LevelInfo
	switch {
	case strings.Contains(line, "[DEBUG]"):
		level = slog.LevelDebug
	case strings.Contains(line, "[WARN]"):
		level = slog.LevelWarn
	case strings.Contains(line, "[ERR]"):
		level = slog.LevelError
		// memberlist v0.7.0's texts for a stream it could not read
		// (undecryptable, unencrypted while a key is set, garbage) and a
		// packet it could not decrypt.
		if w.onRefused != nil && (strings.Contains(line, "memberlist: failed to receive:") || strings.Contains(line, "Decrypt packet failed")) {
			w.onRefused()
		}
	}
	w.logger.Log(context.Background(), level, "memberlist", "line", line) // not "msg": slog's own key
	return len(p), nil
}

var _ io.Writer = (*logWriter)(nil)

// Flush waits up to timeout for queued deltas to be sent and, to peers
// that acknowledge, acknowledged.
func (c *Cluster) Flush(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		pending := 0
		for _, p := range c.peers {
			p.mu.Lock()
			pending += len(p.pending)
			for _, f := range p.inflight {
				if len(f.ids) > 0 {
					pending++
				}
			}
			p.mu.Unlock()
		}
		c.mu.Unlock()
		if pending == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
