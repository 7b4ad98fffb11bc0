package server_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/devcluster"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
	"github.com/claudemesh/broker/internal/testkit"
)

// These tests attack the per-address limits through the deployment shape
// that used to defeat them: several clients behind one load balancer. The
// balancer is `broker dev`'s (it adds X-Forwarded-For, as compose's HAProxy
// does); the node trusts its address, 127.0.0.1. Each client connects from
// a loopback address of its own (127.0.0.2x), which the balancer names.

// behindProxy starts a node that trusts 127.0.0.1 and a load balancer in
// front of it; it returns the node and the balancer's WebSocket URL.
func behindProxy(t *testing.T, configure func(*config.Config)) (*testkit.Node, string) {
	t.Helper()
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) {
		c.TrustedProxies = []string{"127.0.0.1/32"}
		if configure != nil {
			configure(c)
		}
	}})
	lb, err := devcluster.StartLB(devcluster.LBOptions{Addr: "127.0.0.1:0", Logger: testkit.Logger(t),
		Backends: []devcluster.Backend{{Name: n.Name(), URL: n.HTTPURL()}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = lb.Close(ctx)
	})
	return n, lb.URL()
}

// dialFrom opens a WebSocket to url through hc (no hello).
func dialFrom(t *testing.T, url string, hc *http.Client, header http.Header) (*client.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, url, &client.DialOptions{HTTPClient: hc, Header: header})
	if err == nil {
		t.Cleanup(func() { _ = c.CloseNow() })
	}
	return c, err
}

// helloFrom connects through hc and says a valid hello; the error is the
// rejection, if any.
func helloFrom(t *testing.T, url string, hc *http.Client, id client.Identity, header http.Header) error {
	t.Helper()
	c, err := dialFrom(t, url, hc, header)
	if err != nil {
		return err
	}
	defer c.CloseNow()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = c.Hello(ctx, id, client.HelloOptions{})
	return err
}

// junkHello connects through hc, sends a hello that is not one and
// returns the rejection's reason.
func junkHello(t *testing.T, url string, hc *http.Client, header http.Header) (string, error) {
	c, err := dialFrom(t, url, hc, header)
	if err != nil {
		return "", err
	}
	defer c.CloseNow()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.WriteRaw(ctx, []byte(`{"type":"hello","meshId":"x"}`)); err != nil {
		return "", err
	}
	_, err = c.WaitHelloAck(ctx)
	var he *client.HelloError
	if !errors.As(err, &he) {
		return "", fmt.Errorf("junk hello: %v, want a rejection", err)
	}
	return he.Code, nil
}

// remotes returns the remote address of every audit event of type typ in
// mesh (or of every mesh when mesh is "").
func remotes(t *testing.T, st *store.Store, mesh, typ string) map[string]int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	evs, err := st.ListAudit(ctx, mesh, typ, 1000)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, e := range evs {
		r, _ := e.Metadata["remote"].(string)
		out[r]++
	}
	return out
}

// Finding 1: one client behind the proxy floods junk hellos far beyond
// HELLO_RATE_PER_SEC while another client behind the same proxy says valid
// hellos. The flooder is rate limited; every honest hello is accepted,
// and the audit log names each client by its own address.
func TestHonestHelloBehindProxyWhileAnotherFloods(t *testing.T) {
	const rate = 5 // a bucket of 11
	n, url := behindProxy(t, func(c *config.Config) { c.HelloRatePerSec = rate })
	mesh := testkit.NewMesh(t, n.Store(), 1)
	honest := mesh.Members[0]
	flooder, honestClient := testkit.HTTPClientFrom(t, "127.0.0.21"), testkit.HTTPClientFrom(t, "127.0.0.22")

	var limited, rejected atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Go(func() {
			for i := 0; i < 200; i++ {
				select {
				case <-stop:
					return
				default:
				}
				reason, err := junkHello(t, url, flooder, nil)
				if err != nil {
					t.Errorf("flooder: %v", err)
					return
				}
				rejected.Add(1)
				if reason == protocol.ReasonRateLimited {
					limited.Add(1)
				}
			}
		})
	}
	defer func() { close(stop); wg.Wait() }()
	testkit.Eventually(t, 20*time.Second, "the flooder to be rate limited", func() bool { return limited.Load() > 0 })

	for i := 0; i < 8; i++ {
		if err := helloFrom(t, url, honestClient, honest, nil); err != nil {
			t.Fatalf("honest hello %d behind the proxy during the flood (%d junk hellos so far): %v", i, rejected.Load(), err)
		}
	}
	if limited.Load() == 0 || rejected.Load() < 2*rate+1+8 {
		t.Fatalf("the flood sent %d junk hellos, %d rate limited: it did not exceed the limit", rejected.Load(), limited.Load())
	}
	testkit.Eventually(t, 10*time.Second, "peer_connected audited with the client's address", func() bool {
		return remotes(t, n.Store(), mesh.MeshID, store.EventPeerConnected)["127.0.0.22"] == 8
	})
	t.Logf("RESULT %d junk hellos from 127.0.0.21 (%d rate limited), 8 of 8 honest hellos from 127.0.0.22 accepted", rejected.Load(), limited.Load())
}

// Finding 1: idle sockets that never say hello, from one client behind the
// proxy, fill only that client's pending cap; another client behind the
// same proxy connects and says hello, and so does the first client once
// its idle sockets are gone.
func TestIdleSocketsBehindProxyDoNotBlockOthers(t *testing.T) {
	const perAddr, pending = 20, 5
	n, url := behindProxy(t, func(c *config.Config) {
		c.ConnsPerAddr, c.PendingPerAddr = perAddr, pending
		c.HelloTimeout = time.Minute
	})
	mesh := testkit.NewMesh(t, n.Store(), 2)
	idler, other := testkit.HTTPClientFrom(t, "127.0.0.23"), testkit.HTTPClientFrom(t, "127.0.0.24")

	var idle []*client.Conn
	refused := 0
	for i := 0; i < perAddr; i++ {
		c, err := dialFrom(t, url, idler, nil)
		switch {
		case err == nil:
			idle = append(idle, c)
		case strings.Contains(err.Error(), "429"):
			refused++
		default:
			t.Fatalf("idle socket %d: %v", i, err)
		}
	}
	if len(idle) != pending || refused != perAddr-pending {
		t.Fatalf("%d idle sockets accepted, %d refused; want %d and %d (MAX_PENDING_CONNECTIONS_PER_ADDR)", len(idle), refused, pending, perAddr-pending)
	}
	for i := 0; i < 3; i++ {
		if err := helloFrom(t, url, other, mesh.Members[1], nil); err != nil {
			t.Fatalf("another client behind the proxy, connection %d, while the first holds %d idle sockets: %v", i, len(idle), err)
		}
	}
	for _, c := range idle {
		_ = c.CloseNow()
	}
	testkit.Eventually(t, 5*time.Second, "the idle client's own hello", func() bool {
		return helloFrom(t, url, idler, mesh.Members[0], nil) == nil
	})
}

// Forwarding headers count only from a trusted proxy. From the trusted
// address, each X-Forwarded-For is a client of its own (no shared bucket;
// IPv6 by /64);
// from any other address, X-Forwarded-For and Fly-Client-IP are ignored:
// rotating them does not escape the hello rate, and the audit log shows
// the socket's address. An honest client is served meanwhile.
func TestForwardingHeadersOnlyFromTrustedProxies(t *testing.T) {
	const rate = 5 // a bucket of 11
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) {
		c.TrustedProxies = []string{"127.0.0.1/32"}
		c.HelloRatePerSec = rate
	}})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	const tries = 40
	proxy, honest := testkit.HTTPClientFrom(t, "127.0.0.1"), testkit.HTTPClientFrom(t, "127.0.0.27")

	for i := 0; i < tries; i++ {
		h := http.Header{"X-Forwarded-For": {fmt.Sprintf("198.51.100.%d", i+1)}}
		if reason, err := junkHello(t, n.URL(), proxy, h); err != nil || reason != protocol.ReasonMalformed {
			t.Fatalf("trusted proxy, client %d: %q %v; want each forwarded client its own bucket (malformed, not rate_limited)", i, reason, err)
		}
	}

	// IPv6 clients count by their /64: other addresses of one /64 share a
	// bucket, another /64 has its own.
	limited := 0
	for i := 0; i < tries; i++ {
		h := http.Header{"X-Forwarded-For": {fmt.Sprintf("2001:db8:1:2::%x", i+1)}}
		if reason, err := junkHello(t, n.URL(), proxy, h); err != nil {
			t.Fatal(err)
		} else if reason == protocol.ReasonRateLimited {
			limited++
		}
	}
	if limited == 0 {
		t.Fatalf("%d addresses of one IPv6 /64 were %d clients to the hello rate, want one", tries, tries)
	}
	if reason, err := junkHello(t, n.URL(), proxy, http.Header{"X-Forwarded-For": {"2001:db8:1:3::1"}}); err != nil || reason != protocol.ReasonMalformed {
		t.Fatalf("another /64 after its neighbour's flood: %q %v, want its own bucket", reason, err)
	}

	for header, ip := range map[string]string{"X-Forwarded-For": "127.0.0.25", "Fly-Client-IP": "127.0.0.26"} {
		spoofer := testkit.HTTPClientFrom(t, ip)
		limited := 0
		start := time.Now()
		for i := 0; i < tries; i++ {
			reason, err := junkHello(t, n.URL(), spoofer, http.Header{header: {fmt.Sprintf("203.0.113.%d", i+1)}})
			if err != nil {
				t.Fatal(err)
			}
			if reason == protocol.ReasonRateLimited {
				limited++
			}
			if i == tries/2 {
				if err := helloFrom(t, n.URL(), honest, mesh.Members[0], nil); err != nil {
					t.Fatalf("honest client during the %s spoofing: %v", header, err)
				}
			}
		}
		// At most the bucket plus what refilled meanwhile got through.
		passed := float64(2*rate+1) + rate*time.Since(start).Seconds() + 1
		if float64(tries-limited) > passed {
			t.Fatalf("%s from an untrusted address: %d of %d junk hellos got past the hello rate (at most %.0f may); the header was believed",
				header, tries-limited, tries, passed)
		}
	}
	testkit.Eventually(t, 10*time.Second, "rejections audited", func() bool {
		got := remotes(t, n.Store(), "", store.EventHelloRejected)
		return got["198.51.100.1"] == 1 && got["198.51.100.40"] == 1 && got["127.0.0.25"] > 0 && got["127.0.0.26"] > 0
	})
	for r := range remotes(t, n.Store(), "", store.EventHelloRejected) {
		if strings.HasPrefix(r, "203.0.113.") {
			t.Fatalf("a rejection is audited from %s, a forged header of an untrusted client", r)
		}
	}
}

// proxyClient is an HTTP client from local address ip that opens each
// connection with a PROXY v2 header naming src (none when src is nil).
func proxyClient(t *testing.T, ip string, src *net.TCPAddr) *http.Client {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil || src == nil {
			return c, err
		}
		h := proxyproto.HeaderProxyFromAddrs(2, src, c.RemoteAddr())
		if _, err := h.WriteTo(c); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// PROXY_PROTOCOL: a trusted proxy must open with a PROXY header, whose
// source is then the client (audited, and counted apart); a connection
// from anyone else that sends one is refused, and one that does not is
// served as it is.
func TestProxyProtocolOnlyFromTrustedProxies(t *testing.T) {
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{Configure: func(c *config.Config) {
		c.TrustedProxies = []string{"127.0.0.1/32"}
		c.ProxyProtocol = true
	}})
	mesh := testkit.NewMesh(t, n.Store(), 1)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	helloVia := func(hc *http.Client) error {
		c, err := client.Dial(ctx, n.URL(), &client.DialOptions{HTTPClient: hc})
		if err != nil {
			return err
		}
		defer c.CloseNow()
		_, err = c.Hello(ctx, mesh.Members[0], client.HelloOptions{})
		return err
	}
	client1 := &net.TCPAddr{IP: net.ParseIP("198.51.100.77"), Port: 40000}
	if err := helloVia(proxyClient(t, "127.0.0.1", client1)); err != nil {
		t.Fatalf("trusted proxy with a PROXY header: %v", err)
	}
	if err := helloVia(proxyClient(t, "127.0.0.1", nil)); err == nil {
		t.Fatal("trusted proxy without a PROXY header was served; its clients would all be one address")
	}
	if err := helloVia(proxyClient(t, "127.0.0.28", &net.TCPAddr{IP: net.ParseIP("198.51.100.78"), Port: 1})); err == nil {
		t.Fatal("an untrusted address sent a PROXY header and was served")
	}
	if err := helloVia(proxyClient(t, "127.0.0.28", nil)); err != nil {
		t.Fatalf("an untrusted address without a PROXY header (a direct client): %v", err)
	}
	testkit.Eventually(t, 10*time.Second, "peer_connected audited", func() bool {
		got := remotes(t, n.Store(), mesh.MeshID, store.EventPeerConnected)
		return got["198.51.100.77"] == 1 && got["127.0.0.28"] == 1
	})
	if got := remotes(t, n.Store(), mesh.MeshID, store.EventPeerConnected); got["198.51.100.78"] != 0 || len(got) != 2 {
		t.Fatalf("peer_connected remotes %v, want 198.51.100.77 and 127.0.0.28 only", got)
	}
}
