package clustertest_test

import (
	"bytes"
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

	"github.com/claudemesh/broker/internal/testkit"
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

// procNode is a broker running as its own process. It may be stopped and
// started again with the same name, ports and environment.
type procNode struct {
	name    string
	ip      string
	port    int
	gossip  string
	env     []string
	logPath string

	// Set by start, for the current process; exited is closed once it has
	// exited, and err then holds its exit status.
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

func (p *procNode) URL() string     { return fmt.Sprintf("ws://%s:%d/ws", p.ip, p.port) }
func (p *procNode) HTTPURL() string { return fmt.Sprintf("http://%s:%d", p.ip, p.port) }

// start runs the node's process; the previous one, if any, must have
// exited.
func (p *procNode) start(t *testing.T) {
	t.Helper()
	logFile, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(brokerBinary(t), "serve")
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatal(err)
	}
	exited := make(chan struct{})
	p.cmd, p.exited = cmd, exited
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(exited)
	}()
}

// startProcNodes starts n broker processes (serve) on db, gossiping on
// 127.0.0.31, .32, … and waits until each reports a full cluster.
func startProcNodes(t *testing.T, db string, n int, extraEnv ...string) []*procNode {
	t.Helper()
	var nodes []*procNode
	logDir := t.TempDir()
	for i := 0; i < n; i++ {
		ip := fmt.Sprintf("127.0.0.%d", 31+i)
		p := &procNode{name: fmt.Sprintf("proc-%d", i+1), ip: ip, port: freePort(t, ip)}
		p.gossip = fmt.Sprintf("%s:%d", ip, freePort(t, ip))
		p.logPath = filepath.Join(logDir, p.name+".log")
		p.env = append(os.Environ(),
			"DATABASE_URL="+db, "BROKER_HOST="+ip, "BROKER_PORT="+strconv.Itoa(p.port), "NODE_NAME="+p.name,
			"CLUSTER_BIND="+p.gossip, "CLUSTER_PROFILE=local", "LOG_LEVEL=info", "SWEEP_INTERVAL=1s",
			"HELLO_RATE_PER_SEC=10000")
		if i > 0 {
			p.env = append(p.env, "CLUSTER_JOIN="+nodes[0].gossip)
		}
		p.env = append(p.env, extraEnv...)
		p.start(t)
		t.Cleanup(func() {
			_ = p.cmd.Process.Kill()
			<-p.exited
			checkLogKeys(t, p.name, p.logPath)
			if t.Failed() {
				b, _ := os.ReadFile(p.logPath)
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("%s log tail:\n%s", p.name, b)
			}
		})
		nodes = append(nodes, p)
	}
	waitReady(t, 30*time.Second, n, nodes...)
	return nodes
}

// waitReady waits until each node answers /health with Postgres up and a
// cluster of size nodes.
func waitReady(t *testing.T, timeout time.Duration, size int, nodes ...*procNode) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for _, p := range nodes {
		for {
			h, err := getHealth(p.HTTPURL())
			if err == nil && h.Status == "ok" && h.ClusterSize == size {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not ready: %v %+v", p.name, err, h)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
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

// checkLogKeys fails t on a line of a node's log that repeats a key (the
// broker logs one JSON object a line; other lines are a crash's output).
func checkLogKeys(t *testing.T, name, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Errorf("%s log: %v", name, err)
		return
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("{")) {
			continue
		}
		if key, err := testkit.DuplicateKey(line); err != nil || key != "" {
			t.Errorf("%s log line repeats the key %q (%v): %s", name, key, err, line)
		}
	}
}
