package devcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// Backend is one node behind a load balancer.
type Backend struct {
	Name string
	URL  string // base HTTP URL, e.g. http://127.0.0.1:7900
}

// LBOptions configure a load balancer.
type LBOptions struct {
	Addr     string // listen address, e.g. 127.0.0.1:7800; port 0 picks one
	Backends []Backend
	// CheckInterval is how often every backend's /health is probed;
	// zero means 1s.
	CheckInterval time.Duration
	Logger        *slog.Logger
}

// LB is the dev cluster's load balancer: what HAProxy is to the
// docker-compose cluster, built on httputil.ReverseProxy (which also
// carries WebSocket upgrades). Requests go round-robin to the backends
// whose GET /health last answered 200. A request that cannot reach its
// backend marks it down at once and, when it has no body (WebSocket
// upgrades, /health, /metrics), is retried on the next backend, so a
// stopped node costs clients nothing.
type LB struct {
	backends  []*lbBackend
	next      atomic.Uint64
	interval  time.Duration
	logger    *slog.Logger
	ln        *trackingListener
	srv       *http.Server
	transport *http.Transport
	checker   *http.Client

	stop context.CancelFunc // ends the health checks
	wg   sync.WaitGroup
	once sync.Once
}

type lbBackend struct {
	Backend
	health string // its /health URL
	proxy  *httputil.ReverseProxy
	up     atomic.Bool
}

// StartLB checks every backend once, then listens and serves.
func StartLB(o LBOptions) (*LB, error) {
	if len(o.Backends) == 0 {
		return nil, errors.New("load balancer: no backends")
	}
	if o.CheckInterval <= 0 {
		o.CheckInterval = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	lb := &LB{
		interval: o.CheckInterval,
		logger:   o.Logger.With("component", "lb"),
		transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     30 * time.Second,
		},
		// Probes open a fresh connection each time, as HAProxy's do, so a
		// node that stopped accepting is noticed.
		checker: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}},
	}
	for _, b := range o.Backends {
		target, err := url.Parse(b.URL)
		if err != nil || target.Host == "" {
			return nil, fmt.Errorf("load balancer: backend %s: bad URL %q", b.Name, b.URL)
		}
		lb.backends = append(lb.backends, lb.newBackend(b, target))
	}
	lb.checkAll(context.Background())
	ln, err := net.Listen("tcp", o.Addr)
	if err != nil {
		return nil, fmt.Errorf("load balancer: listen on %s: %w", o.Addr, err)
	}
	lb.ln = &trackingListener{Listener: ln, conns: map[*trackedConn]struct{}{}}
	lb.srv = &http.Server{
		Handler:           lb,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(lb.logger.Handler(), slog.LevelDebug),
	}
	checkCtx, stop := context.WithCancel(context.Background())
	lb.stop = stop
	lb.wg.Add(2)
	go func() {
		defer lb.wg.Done()
		if err := lb.srv.Serve(lb.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			lb.logger.Error("load balancer stopped", "err", err)
		}
	}()
	go func() {
		defer lb.wg.Done()
		lb.checkLoop(checkCtx)
	}()
	return lb, nil
}

func (lb *LB) newBackend(b Backend, target *url.URL) *lbBackend {
	be := &lbBackend{Backend: b, health: target.JoinPath("/health").String()}
	be.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
			// Name the client, as HAProxy's forwardfor does: the dev nodes
			// trust this balancer's address (TRUSTED_PROXIES) and count
			// each client apart. Rewrite has dropped whatever
			// X-Forwarded-For the client sent, so it cannot choose its own.
			pr.SetXForwarded()
		},
		Transport:    lb.transport,
		ErrorLog:     slog.NewLogLogger(lb.logger.Handler(), slog.LevelDebug),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) { lb.failed(be, w, r, err) },
	}
	be.up.Store(true)
	return be
}

// attemptsKey carries a request's forwarding state to the error handler.
type attemptsKey struct{}

type attempts struct {
	in    *http.Request // as received; the error handler sees the outgoing copy
	tried []bool        // backends already tried
}

// ServeHTTP forwards the request to the next healthy backend.
func (lb *LB) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a := &attempts{tried: make([]bool, len(lb.backends))}
	a.in = r.WithContext(context.WithValue(r.Context(), attemptsKey{}, a))
	lb.forward(w, a.in, a)
}

func (lb *LB) forward(w http.ResponseWriter, r *http.Request, a *attempts) {
	i := lb.pick(a.tried)
	if i < 0 {
		http.Error(w, "no broker node reachable", http.StatusBadGateway)
		return
	}
	a.tried[i] = true
	lb.backends[i].proxy.ServeHTTP(w, r)
}

// pick returns the next backend in round-robin order that is up and not
// yet tried; when every untried backend is down it takes one anyway (a
// failing /health, say while Postgres restarts, does not stop sockets
// from working), and -1 when all were tried.
func (lb *LB) pick(tried []bool) int {
	n := len(lb.backends)
	start := int(lb.next.Add(1)-1) % n
	fallback := -1
	for k := 0; k < n; k++ {
		i := (start + k) % n
		if tried[i] {
			continue
		}
		if lb.backends[i].up.Load() {
			return i
		}
		if fallback < 0 {
			fallback = i
		}
	}
	return fallback
}

// failed runs when the request could not be forwarded; ReverseProxy calls
// it before anything was written to w. A backend that refused the
// connection is marked down, and a request without a body, which it
// cannot have seen, goes to the next backend. Other errors are answered
// 502 and left to the health checks.
func (lb *LB) failed(be *lbBackend, w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the client went away; not the backend's fault
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		lb.setUp(be, false, err.Error())
		if a, _ := r.Context().Value(attemptsKey{}).(*attempts); a != nil && a.in.Body == http.NoBody {
			lb.forward(w, a.in, a)
			return
		}
	}
	lb.logger.Debug("lb forward failed", "backend", be.Name, "path", r.URL.Path, "err", err)
	http.Error(w, "broker node unreachable", http.StatusBadGateway)
}

func (lb *LB) setUp(be *lbBackend, up bool, why string) {
	if be.up.Swap(up) == up {
		return
	}
	if up {
		lb.logger.Info("lb backend up", "backend", be.Name)
	} else {
		lb.logger.Warn("lb backend down", "backend", be.Name, "reason", why)
	}
}

func (lb *LB) checkLoop(ctx context.Context) {
	tick := time.NewTicker(lb.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			lb.checkAll(ctx)
		}
	}
}

// checkAll probes every backend's /health concurrently.
func (lb *LB) checkAll(ctx context.Context) {
	// Not shorter than a second whatever the interval: a node that takes
	// 20 ms to answer under load is busy, not down (tests check every
	// 20 ms; a 20 ms timeout marked every node down and the fallback then
	// routed to a failing one).
	timeout := min(max(lb.interval, time.Second), 2*time.Second)
	var wg sync.WaitGroup
	for _, be := range lb.backends {
		wg.Add(1)
		go func() {
			defer wg.Done()
			up, why := lb.probe(ctx, be, timeout)
			if ctx.Err() == nil {
				lb.setUp(be, up, why)
			}
		}()
	}
	wg.Wait()
}

func (lb *LB) probe(ctx context.Context, be *lbBackend, timeout time.Duration) (bool, string) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, be.health, nil)
	if err != nil {
		return false, err.Error()
	}
	resp, err := lb.checker.Do(req)
	if err != nil {
		return false, err.Error()
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, "health " + resp.Status
	}
	return true, ""
}

// Healthy lists the backends currently considered up, in order.
func (lb *LB) Healthy() []string {
	var out []string
	for _, be := range lb.backends {
		if be.up.Load() {
			out = append(out, be.Name)
		}
	}
	return out
}

// Addr is the address the load balancer listens on.
func (lb *LB) Addr() string { return lb.ln.Addr().String() }

// URL is the WebSocket URL peers connect to.
func (lb *LB) URL() string { return "ws://" + lb.Addr() + "/ws" }

// HTTPURL is the base HTTP URL.
func (lb *LB) HTTPURL() string { return "http://" + lb.Addr() }

// Close stops accepting, waits for plain requests to finish (bounded by
// ctx) and then cuts what is left, WebSockets included. Close the nodes
// first so that their sockets end with a proper close frame.
func (lb *LB) Close(ctx context.Context) error {
	var err error
	lb.once.Do(func() {
		lb.stop()
		if err = lb.srv.Shutdown(ctx); err != nil {
			err = errors.Join(err, lb.srv.Close())
		}
		lb.ln.closeAll()
		lb.wg.Wait()
		lb.transport.CloseIdleConnections()
	})
	return err
}

// trackingListener remembers accepted connections until they are closed,
// so that Close can cut hijacked ones (WebSocket tunnels), which
// http.Server no longer tracks.
type trackingListener struct {
	net.Listener
	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, l: l}
	l.mu.Lock()
	l.conns[tc] = struct{}{}
	l.mu.Unlock()
	return tc, nil
}

func (l *trackingListener) closeAll() {
	l.mu.Lock()
	all := make([]*trackedConn, 0, len(l.conns))
	for c := range l.conns {
		all = append(all, c)
	}
	l.mu.Unlock()
	for _, c := range all {
		_ = c.Close()
	}
}

type trackedConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
