package clustertest_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/protocol"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// brokerBinary builds cmd/broker once per test binary.
func brokerBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "cmtest-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "broker")
		out, err := exec.Command("go", "build", "-o", binPath, "../../cmd/broker").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func freePort(t testing.TB, ip string) int {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// procNode is a broker running as its own process.
type procNode struct {
	name   string
	ip     string
	port   int
	gossip string
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited
	err    error         // its exit status, once exited is closed
}

func (p *procNode) URL() string     { return fmt.Sprintf("ws://%s:%d/ws", p.ip, p.port) }
func (p *procNode) HTTPURL() string { return fmt.Sprintf("http://%s:%d", p.ip, p.port) }

// startProcNodes starts n broker processes (serve) on db, gossiping on
// 127.0.0.31, .32, … and waits until each reports a full cluster.
func startProcNodes(t *testing.T, db string, n int, extraEnv ...string) []*procNode {
	t.Helper()
	bin := brokerBinary(t)
	var nodes []*procNode
	for i := 0; i < n; i++ {
		ip := fmt.Sprintf("127.0.0.%d", 31+i)
		p := &procNode{name: fmt.Sprintf("proc-%d", i+1), ip: ip, port: freePort(t, ip), exited: make(chan struct{})}
		p.gossip = fmt.Sprintf("%s:%d", ip, freePort(t, ip))
		env := append(os.Environ(),
			"DATABASE_URL="+db, "BROKER_HOST="+ip, "BROKER_PORT="+strconv.Itoa(p.port), "NODE_NAME="+p.name,
			"CLUSTER_BIND="+p.gossip, "CLUSTER_PROFILE=local", "LOG_LEVEL=info", "SWEEP_INTERVAL=1s",
			"HELLO_RATE_PER_SEC=10000")
		if i > 0 {
			env = append(env, "CLUSTER_JOIN="+nodes[0].gossip)
		}
		env = append(env, extraEnv...)
		p.cmd = exec.Command(bin, "serve")
		p.cmd.Env = env
		logFile, err := os.Create(filepath.Join(t.TempDir(), p.name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		p.cmd.Stdout, p.cmd.Stderr = logFile, logFile
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() {
			p.err = p.cmd.Wait()
			logFile.Close()
			close(p.exited)
		}()
		t.Cleanup(func() {
			_ = p.cmd.Process.Kill()
			<-p.exited
			if t.Failed() {
				b, _ := os.ReadFile(logFile.Name())
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("%s log tail:\n%s", p.name, b)
			}
		})
		nodes = append(nodes, p)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, p := range nodes {
		for {
			h, err := getHealth(p.HTTPURL())
			if err == nil && h.ClusterSize == n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not ready: %v %+v", p.name, err, h)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nodes
}

type healthBody struct {
	Status      string `json:"status"`
	ClusterSize int    `json:"clusterSize"`
}

func getHealth(base string) (healthBody, error) {
	var h healthBody
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(base + "/health")
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	return h, jsonDecode(resp, &h)
}

// peer is an application using the protocol the way the client library
// does: client_ack, dedupe of redelivered pushes by messageId, sends with a
// client_message_id resent after a reconnect until acked, reconnection to
// the next broker URL with the same session id.
type peer struct {
	id      client.Identity
	urls    []string
	session string
	caps    []string

	mu          sync.Mutex
	conn        *client.Conn
	next        int
	pending     map[string]protocol.Send // client_message_id → send awaiting its ack
	acked       map[string]string        // client_message_id → messageId
	seen        map[string]int           // messageId → pushes received (before dedupe)
	app         map[string]int           // messageId → times handed to the application
	events      []protocol.Push          // system events
	reconnects  int
	connectedAt time.Time
	onConnect   chan struct{}
}

func newPeer(id client.Identity, urls []string, first int, caps ...string) *peer {
	return &peer{id: id, urls: urls, next: first, session: "sess-" + id.MemberID, caps: caps,
		pending: map[string]protocol.Send{}, acked: map[string]string{}, seen: map[string]int{}, app: map[string]int{},
		onConnect: make(chan struct{}, 16)}
}

// run keeps the peer connected until ctx ends.
func (p *peer) run(ctx context.Context) {
	for ctx.Err() == nil {
		p.mu.Lock()
		url := p.urls[p.next%len(p.urls)]
		p.mu.Unlock()
		if err := p.connectOnce(ctx, url); err != nil && ctx.Err() == nil {
			p.mu.Lock()
			p.next++ // try the next node
			p.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

func (p *peer) connectOnce(ctx context.Context, url string) error {
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	c, err := client.Dial(dctx, url, nil)
	if err != nil {
		cancel()
		return err
	}
	_, err = c.Hello(dctx, p.id, client.HelloOptions{SessionID: p.session, Capabilities: append([]string{protocol.CapClientAck}, p.caps...)})
	cancel()
	if err != nil {
		c.CloseNow()
		return err
	}
	p.mu.Lock()
	p.conn = c
	p.reconnects++
	p.connectedAt = time.Now()
	resend := make([]protocol.Send, 0, len(p.pending))
	for _, s := range p.pending {
		resend = append(resend, s)
	}
	p.mu.Unlock()
	select {
	case p.onConnect <- struct{}{}:
	default:
	}
	for _, s := range resend {
		_ = c.WriteJSON(ctx, s)
	}
	defer func() {
		p.mu.Lock()
		if p.conn == c {
			p.conn = nil
		}
		p.mu.Unlock()
		c.CloseNow()
	}()
	for {
		f, err := c.Next(ctx)
		if err != nil {
			return err
		}
		switch f.Type {
		case protocol.TypeAck:
			var a protocol.Ack
			if f.Decode(&a) == nil && a.Queued {
				p.mu.Lock()
				for cmid, s := range p.pending {
					if s.ID == a.ID {
						p.acked[cmid] = a.MessageID
						delete(p.pending, cmid)
					}
				}
				p.mu.Unlock()
			}
		case protocol.TypePush:
			var m protocol.Push
			if f.Decode(&m) != nil {
				continue
			}
			if m.Subtype != "" {
				p.mu.Lock()
				p.events = append(p.events, m)
				p.mu.Unlock()
				continue
			}
			p.mu.Lock()
			p.seen[m.MessageID]++
			if p.seen[m.MessageID] == 1 {
				p.app[m.MessageID]++ // the application sees it once
			}
			p.mu.Unlock()
			_ = c.WriteJSON(ctx, protocol.ClientAck{Type: protocol.TypeClientAck, BrokerMessageID: m.MessageID})
		}
	}
}

// send queues a message; it is (re)sent until acked.
func (p *peer) send(ctx context.Context, to string, body string) {
	cmid := fmt.Sprintf("%s-%s", p.id.MemberID, body)
	s := protocol.Send{Type: protocol.TypeSend, ID: cmid, TargetSpec: to, Priority: "now", Nonce: "bg==", Ciphertext: body, ClientMessageID: cmid}
	p.mu.Lock()
	p.pending[cmid] = s
	c := p.conn
	p.mu.Unlock()
	if c != nil {
		_ = c.WriteJSON(ctx, s)
	}
}

func (p *peer) pendingCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pending)
}

// waitFor polls cond (bounded) for state that converges asynchronously.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func signalNode(t *testing.T, p *procNode, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}
