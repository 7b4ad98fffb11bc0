// Package config reads the broker's configuration from the environment and
// validates it, reporting every bad variable on its own line.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/claudemesh/broker/internal/clientaddr"
)

// Config is a broker node's configuration. Field comments give the
// environment variable and its default; the zero value of a field that has a
// default is replaced by that default in Normalize, so tests can build a
// Config literal with only the fields they care about.
type Config struct {
	// Seed variables (kept from the original broker).
	Port                int    `env:"BROKER_PORT" envDefault:"7900"`             // HTTP + WebSocket port
	Host                string `env:"BROKER_HOST"`                               // bind address; empty = all interfaces
	DatabaseURL         string `env:"DATABASE_URL"`                              // Postgres connection string
	StatusTTLSeconds    int    `env:"STATUS_TTL_SECONDS" envDefault:"60"`        // flip stuck "working" to idle
	HookFreshSeconds    int    `env:"HOOK_FRESH_WINDOW_SECONDS" envDefault:"30"` // a fresh hook beats lower sources
	MaxConnsPerMesh     int    `env:"MAX_CONNECTIONS_PER_MESH" envDefault:"100"` // live sessions per mesh, cluster-wide
	MaxMessageBytes     int    `env:"MAX_MESSAGE_BYTES" envDefault:"65536"`      // WebSocket frame and HTTP body limit
	HookRateLimitPerMin int    `env:"HOOK_RATE_LIMIT_PER_MIN" envDefault:"30"`   // per signer (or client address) and session
	GitSHA              string `env:"GIT_SHA"`                                   // reported by /health
	// HookRequireSignature is "true" (the default, also when empty): the
	// public port refuses unsigned hooks (local ones go to HOOK_LOCAL_ADDR);
	// "false": the public port accepts them from anywhere.
	HookRequireSignature string `env:"HOOK_REQUIRE_SIGNATURE" envDefault:"true"`

	// Cluster.
	NodeName         string        `env:"NODE_NAME"`                              // default: hostname-port
	ClusterBind      string        `env:"CLUSTER_BIND" envDefault:":7946"`        // memberlist bind host:port
	ClusterAdvertise string        `env:"CLUSTER_ADVERTISE"`                      // host:port others reach us at
	ClusterJoin      []string      `env:"CLUSTER_JOIN" envSeparator:","`          // seeds: host[:port] or DNS names
	ClusterSecret    string        `env:"CLUSTER_SECRET"`                         // gossip encryption key material
	ClusterProfile   string        `env:"CLUSTER_PROFILE" envDefault:"lan"`       // lan | wan | local
	PresenceGrace    int           `env:"PRESENCE_GRACE_SECONDS" envDefault:"90"` // reattach window after a drop
	MessageTTL       time.Duration `env:"MESSAGE_TTL" envDefault:"168h"`          // undelivered messages expire
	LogLevel         string        `env:"LOG_LEVEL" envDefault:"info"`            // debug | info | warn | error
	PublicURL        string        `env:"PUBLIC_URL"`                             // ws URL put into invites
	AdminToken       string        `env:"ADMIN_TOKEN"`                            // protects /status; empty = disabled
	// MetricsAddr, when set, serves /metrics on its own listener (host:port)
	// instead of the public port, so a cloud proxy never exposes it.
	MetricsAddr string `env:"METRICS_ADDR"`

	// Client addresses, local hooks, joins and operator endpoints (the
	// defences of issue 11, docs/SECURITY.md).
	//
	// TrustedProxies are the peers (CIDRs or addresses) allowed to name the
	// client: in ClientIPHeader, or in a PROXY protocol header when
	// ProxyProtocol is on. Empty: every request's socket peer is its client.
	TrustedProxies []string `env:"TRUSTED_PROXIES" envSeparator:","`
	ClientIPHeader string   `env:"CLIENT_IP_HEADER" envDefault:"X-Forwarded-For"` // X-Forwarded-For | Fly-Client-IP
	ProxyProtocol  bool     `env:"PROXY_PROTOCOL"`                                // PROXY v1/v2 header required from trusted proxies
	// PendingPerAddr bounds the WebSockets of one client address that have
	// not completed their hello (zero means 64), so idle sockets cannot
	// fill MAX_CONNECTIONS_PER_ADDR.
	PendingPerAddr int `env:"MAX_PENDING_CONNECTIONS_PER_ADDR" envDefault:"64"`
	// HookLocalAddr, when set, is a loopback host:port that accepts
	// unsigned hooks (POST /hook/set-status only). The public port always
	// requires signed hooks unless HOOK_REQUIRE_SIGNATURE=false.
	HookLocalAddr string `env:"HOOK_LOCAL_ADDR"`
	// JoinRequireProof is "true" (the default, also when empty): /join
	// needs a signature by the key being enrolled; "false" accepts the
	// original client's unsigned body.
	JoinRequireProof string        `env:"JOIN_REQUIRE_PROOF" envDefault:"true"`
	MetricsToken     string        `env:"METRICS_TOKEN"`                      // bearer token for /metrics; empty = open
	PProf            bool          `env:"PPROF"`                              // Go's profiler on METRICS_ADDR
	HTTPReadTimeout  time.Duration `env:"HTTP_READ_TIMEOUT" envDefault:"10s"` // a non-WebSocket request's body
	// ClusterInsecure lets a node gossip on a non-loopback address without
	// CLUSTER_SECRET (a private lab): anyone who reaches the gossip port
	// can then join the cluster and speak for it.
	ClusterInsecure bool `env:"CLUSTER_INSECURE"`

	// Fly.io sets these; they supply defaults for NODE_NAME,
	// CLUSTER_BIND and CLUSTER_ADVERTISE (gossip over the 6PN network).
	FlyPrivateIP string `env:"FLY_PRIVATE_IP"`
	FlyMachineID string `env:"FLY_MACHINE_ID"`

	// Tunables. The defaults suit production; tests shorten them.
	HelloTimeout  time.Duration `env:"HELLO_TIMEOUT" envDefault:"10s"`
	PingInterval  time.Duration `env:"PING_INTERVAL" envDefault:"30s"`
	PongTimeout   time.Duration `env:"PONG_TIMEOUT" envDefault:"75s"`
	LeaseDuration time.Duration `env:"LEASE_DURATION" envDefault:"30s"`
	SweepInterval time.Duration `env:"SWEEP_INTERVAL" envDefault:"2s"` // safety re-scan for this node's sessions
	// DisableRemoteFastPath turns off the remote fast path: a sender's node
	// leasing a row to the recipient's only session on another node and
	// carrying it in the notification, so that node pushes it without a
	// claim. For comparison runs and as an escape hatch.
	DisableRemoteFastPath bool          `env:"DISABLE_REMOTE_FAST_PATH"`
	DeliveredRetention    time.Duration `env:"DELIVERED_RETENTION" envDefault:"1h"` // keep delivered rows for message_status and idempotency
	AuditRetention        time.Duration `env:"AUDIT_RETENTION" envDefault:"720h"`   // audit events older than this are purged
	ShutdownTimeout       time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"10s"`
	SendRatePerSec        float64       `env:"SEND_RATE_PER_SEC" envDefault:"500"` // per session; burst is twice this
	HelloRatePerSec       float64       `env:"HELLO_RATE_PER_SEC" envDefault:"50"` // per remote address, before ed25519
	ConnsPerAddr          int           `env:"MAX_CONNECTIONS_PER_ADDR" envDefault:"20000"`
	SendQueueLen          int           `env:"SEND_QUEUE_LEN" envDefault:"1024"` // frames buffered per connection
	DBPoolSize            int           `env:"DB_POOL_SIZE" envDefault:"16"`
	RevokeCheck           time.Duration `env:"REVOKE_CHECK_INTERVAL" envDefault:"2s"`

	// Bounds on what one session or member can make a node hold.
	// SendQueueBytes bounds the bytes queued (and being written) per
	// connection; zero means the larger of 4 MiB and
	// MinSendQueueBytes plus two maximal frames.
	SendQueueBytes int `env:"SEND_QUEUE_BYTES"`
	// MaxSessionsPerMember bounds one member's present sessions (live or
	// in grace, ephemeral ones included), counted cluster-wide.
	MaxSessionsPerMember int `env:"MAX_SESSIONS_PER_MEMBER" envDefault:"32"`
}

// Load reads the configuration from the process environment.
func Load() (*Config, error) { return LoadFrom(nil) }

// LoadFrom reads the configuration from environ (KEY=VALUE strings);
// nil means the process environment.
func LoadFrom(environ []string) (*Config, error) {
	var opts env.Options
	if environ != nil {
		opts.Environment = env.ToMap(environ)
	}
	cfg := &Config{}
	if err := env.ParseWithOptions(cfg, opts); err != nil {
		return nil, describe(err)
	}
	cfg.Normalize()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// describe turns the env library's errors into one line per variable.
func describe(err error) error {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return fmt.Errorf("config: %w", err)
	}
	var lines []string
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			lines = append(lines, fmt.Sprintf("config: %s: cannot parse as %s: %v", envName(pe.Name), pe.Type, pe.Err))
			continue
		}
		lines = append(lines, "config: "+e.Error())
	}
	return errors.New(strings.Join(lines, "\n"))
}

// envName maps a field name back to its variable for error messages.
func envName(field string) string {
	for _, f := range fields() {
		if f.field == field {
			return f.env
		}
	}
	return field
}

// Normalize fills zero values with defaults and derived values.
func (c *Config) Normalize() {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	defD := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	def(&c.Port, 7900)
	def(&c.StatusTTLSeconds, 60)
	def(&c.HookFreshSeconds, 30)
	def(&c.MaxConnsPerMesh, 100)
	def(&c.MaxMessageBytes, 65536)
	def(&c.HookRateLimitPerMin, 30)
	def(&c.PresenceGrace, 90)
	def(&c.ConnsPerAddr, 20000)
	def(&c.SendQueueLen, 1024)
	def(&c.MaxSessionsPerMember, 32)
	if c.SendQueueBytes == 0 {
		c.SendQueueBytes = max(4<<20, MinSendQueueBytes(c.MaxMessageBytes)+2*c.MaxMessageBytes)
	}
	def(&c.DBPoolSize, 16)
	def(&c.PendingPerAddr, 64)
	defD(&c.HTTPReadTimeout, 10*time.Second)
	if c.ClientIPHeader == "" {
		c.ClientIPHeader = clientaddr.HeaderForwardedFor
	}
	defD(&c.MessageTTL, 168*time.Hour)
	defD(&c.HelloTimeout, 10*time.Second)
	defD(&c.PingInterval, 30*time.Second)
	defD(&c.PongTimeout, 75*time.Second)
	defD(&c.LeaseDuration, 30*time.Second)
	defD(&c.SweepInterval, 2*time.Second)
	defD(&c.DeliveredRetention, time.Hour)
	defD(&c.AuditRetention, 720*time.Hour)
	defD(&c.ShutdownTimeout, 10*time.Second)
	defD(&c.RevokeCheck, 2*time.Second)
	if c.SendRatePerSec == 0 {
		c.SendRatePerSec = 500
	}
	if c.HelloRatePerSec == 0 {
		c.HelloRatePerSec = 50
	}
	if c.FlyPrivateIP != "" {
		// On Fly the private network is IPv6: bind every address, advertise
		// the machine's 6PN address.
		if c.ClusterBind == "" || c.ClusterBind == ":7946" {
			c.ClusterBind = "[::]:7946"
		}
		if c.ClusterAdvertise == "" {
			_, port, _ := net.SplitHostPort(c.ClusterBind)
			c.ClusterAdvertise = net.JoinHostPort(c.FlyPrivateIP, port)
		}
		if c.NodeName == "" && c.FlyMachineID != "" {
			c.NodeName = c.FlyMachineID
		}
	}
	if c.ClusterBind == "" {
		c.ClusterBind = ":7946"
	}
	if c.ClusterProfile == "" {
		c.ClusterProfile = "lan"
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.NodeName == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "node"
		}
		c.NodeName = h + "-" + strconv.Itoa(c.Port)
	}
	if c.PublicURL == "" {
		c.PublicURL = NodeURL(c.Host, c.Port)
	}
}

// NodeURL is the WebSocket URL of a node listening on host:port, the
// fallback for PUBLIC_URL: right for a single node, wrong behind a load
// balancer (which is why a cluster sets PUBLIC_URL).
func NodeURL(host string, port int) string {
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "localhost"
	}
	return "ws://" + net.JoinHostPort(host, strconv.Itoa(port)) + "/ws"
}

// CheckPublicURL reports why s cannot be written into invites: peers dial
// it, so it must be a ws:// or wss:// URL with a host.
func CheckPublicURL(s string) error {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return fmt.Errorf("must be a ws:// or wss:// URL: %v", err)
	case u.Scheme != "ws" && u.Scheme != "wss":
		return fmt.Errorf("must start with ws:// or wss://, got %q", s)
	case u.Host == "" || u.Hostname() == "":
		return fmt.Errorf("has no host: %q", s)
	}
	return nil
}

// InviteURL is the broker URL an operator command writes into invites:
// PUBLIC_URL when set (explicit is then true), else the URL of a node on
// BROKER_HOST:BROKER_PORT. getenv is os.Getenv outside tests.
func InviteURL(getenv func(string) string) (u string, explicit bool, err error) {
	if v := strings.TrimSpace(getenv("PUBLIC_URL")); v != "" {
		if err := CheckPublicURL(v); err != nil {
			return "", true, fmt.Errorf("config: PUBLIC_URL: %w", err)
		}
		return v, true, nil
	}
	port := 7900
	if v := strings.TrimSpace(getenv("BROKER_PORT")); v != "" {
		p, err := strconv.Atoi(v)
		if err != nil || p < 1 || p > 65535 {
			return "", false, fmt.Errorf("config: BROKER_PORT: %q is not a TCP port", v)
		}
		port = p
	}
	return NodeURL(strings.TrimSpace(getenv("BROKER_HOST")), port), false, nil
}

// Validate reports every invalid setting, one per line.
func (c *Config) Validate() error {
	var lines []string
	bad := func(name, format string, args ...any) {
		lines = append(lines, fmt.Sprintf("config: %s: %s", name, fmt.Sprintf(format, args...)))
	}
	if c.Port < 0 || c.Port > 65535 {
		bad("BROKER_PORT", "%d is not a TCP port (1..65535, or 0 for any)", c.Port)
	}
	if c.StatusTTLSeconds < 1 {
		bad("STATUS_TTL_SECONDS", "must be at least 1, got %d", c.StatusTTLSeconds)
	}
	if c.HookFreshSeconds < 1 {
		bad("HOOK_FRESH_WINDOW_SECONDS", "must be at least 1, got %d", c.HookFreshSeconds)
	}
	if c.MaxConnsPerMesh < 1 {
		bad("MAX_CONNECTIONS_PER_MESH", "must be at least 1, got %d", c.MaxConnsPerMesh)
	}
	if c.MaxMessageBytes < 1024 || c.MaxMessageBytes > 16<<20 {
		bad("MAX_MESSAGE_BYTES", "must be between 1024 and 16777216, got %d", c.MaxMessageBytes)
	}
	if c.HookRequireSignature != "" {
		if _, err := strconv.ParseBool(c.HookRequireSignature); err != nil {
			bad("HOOK_REQUIRE_SIGNATURE", "must be true or false, got %q", c.HookRequireSignature)
		}
	}
	if c.HookRateLimitPerMin < 1 {
		bad("HOOK_RATE_LIMIT_PER_MIN", "must be at least 1, got %d", c.HookRateLimitPerMin)
	}
	if c.PresenceGrace < 0 {
		bad("PRESENCE_GRACE_SECONDS", "must not be negative, got %d", c.PresenceGrace)
	}
	if c.MessageTTL < time.Second {
		bad("MESSAGE_TTL", "must be at least 1s, got %s", c.MessageTTL)
	}
	switch c.ClusterProfile {
	case "lan", "wan", "local":
	default:
		bad("CLUSTER_PROFILE", "must be lan, wan or local, got %q", c.ClusterProfile)
	}
	if host, _, err := net.SplitHostPort(c.ClusterBind); err != nil {
		bad("CLUSTER_BIND", "must be host:port, got %q", c.ClusterBind)
	} else if host == "::" && c.ClusterAdvertise == "" {
		// memberlist would advertise "::", which no peer can reach.
		bad("CLUSTER_ADVERTISE", "required when CLUSTER_BIND listens on [::] (set it to this node's reachable [ipv6]:port)")
	}
	if c.ClusterAdvertise != "" {
		if _, _, err := net.SplitHostPort(c.ClusterAdvertise); err != nil {
			bad("CLUSTER_ADVERTISE", "must be host:port, got %q", c.ClusterAdvertise)
		}
	}
	for _, j := range c.ClusterJoin {
		if strings.TrimSpace(j) == "" {
			bad("CLUSTER_JOIN", "has an empty entry")
		}
	}
	if c.MetricsAddr != "" {
		if _, _, err := net.SplitHostPort(c.MetricsAddr); err != nil {
			bad("METRICS_ADDR", "must be host:port, got %q", c.MetricsAddr)
		}
	}
	if c.ClusterSecret != "" && len(c.ClusterSecret) < 16 {
		bad("CLUSTER_SECRET", "must be at least 16 characters")
	}
	if _, err := ParseLevel(c.LogLevel); err != nil {
		bad("LOG_LEVEL", "%v", err)
	}
	if err := CheckPublicURL(c.PublicURL); err != nil {
		bad("PUBLIC_URL", "%v", err)
	}
	if c.LeaseDuration < time.Second {
		bad("LEASE_DURATION", "must be at least 1s")
	}
	if c.PongTimeout <= c.PingInterval {
		bad("PONG_TIMEOUT", "must be longer than PING_INTERVAL (%s)", c.PingInterval)
	}
	if c.SendQueueLen < 16 {
		bad("SEND_QUEUE_LEN", "must be at least 16")
	}
	if least := MinSendQueueBytes(c.MaxMessageBytes); c.SendQueueBytes < least {
		bad("SEND_QUEUE_BYTES", "must be at least %d (1 MiB for a peers_list plus two frames of MAX_MESSAGE_BYTES), got %d", least, c.SendQueueBytes)
	}
	if c.MaxSessionsPerMember < 1 {
		bad("MAX_SESSIONS_PER_MEMBER", "must be at least 1, got %d", c.MaxSessionsPerMember)
	}
	if len(c.NodeName) > MaxNodeName {
		bad("NODE_NAME", "must be at most %d bytes (it names the node in every presence entry), got %d", MaxNodeName, len(c.NodeName))
	}
	if c.DBPoolSize < 4 {
		bad("DB_POOL_SIZE", "must be at least 4")
	}
	if _, err := clientaddr.ParseTrusted(c.TrustedProxies); err != nil {
		bad("TRUSTED_PROXIES", "%v", err)
	}
	if _, err := clientaddr.CanonicalHeader(c.ClientIPHeader); err != nil {
		bad("CLIENT_IP_HEADER", "%v", err)
	}
	if p, _ := clientaddr.ParseTrusted(c.TrustedProxies); c.ProxyProtocol && len(p) == 0 {
		bad("PROXY_PROTOCOL", "needs TRUSTED_PROXIES: only the proxies listed there may send a PROXY header")
	}
	if c.PendingPerAddr < 1 {
		bad("MAX_PENDING_CONNECTIONS_PER_ADDR", "must be at least 1, got %d", c.PendingPerAddr)
	}
	if c.HookLocalAddr != "" {
		if host, _, err := net.SplitHostPort(c.HookLocalAddr); err != nil {
			bad("HOOK_LOCAL_ADDR", "must be host:port, got %q", c.HookLocalAddr)
		} else if !IsLoopbackHost(host) {
			bad("HOOK_LOCAL_ADDR", "must be a loopback address (127.0.0.1:PORT or [::1]:PORT): it accepts unsigned hooks, got %q", c.HookLocalAddr)
		}
	}
	if c.JoinRequireProof != "" {
		if _, err := strconv.ParseBool(c.JoinRequireProof); err != nil {
			bad("JOIN_REQUIRE_PROOF", "must be true or false, got %q", c.JoinRequireProof)
		}
	}
	if c.MetricsToken != "" && len(c.MetricsToken) < 16 {
		bad("METRICS_TOKEN", "must be at least 16 characters")
	}
	if c.PProf && c.MetricsAddr == "" {
		bad("PPROF", "needs METRICS_ADDR: the profiler is never served on the public port")
	}
	if c.HTTPReadTimeout < 100*time.Millisecond {
		bad("HTTP_READ_TIMEOUT", "must be at least 100ms, got %s", c.HTTPReadTimeout)
	}
	if c.SendRatePerSec < 0 || c.HelloRatePerSec < 0 {
		bad("SEND_RATE_PER_SEC/HELLO_RATE_PER_SEC", "must not be negative")
	}
	if len(lines) > 0 {
		return errors.New(strings.Join(lines, "\n"))
	}
	return nil
}

// RequireDatabase reports a clear error when DATABASE_URL is missing.
func (c *Config) RequireDatabase() error {
	if c.DatabaseURL == "" {
		return errors.New("config: DATABASE_URL: required (a postgres:// URL); or run `broker dev` for a local cluster on a private Postgres")
	}
	return nil
}

// MinSendQueueBytes is the smallest SEND_QUEUE_BYTES allowed: room for
// the largest reply (a peers_list of at most 1 MiB, plus acks) and two
// pushes of maxMessageBytes, so a single frame always fits an empty queue.
func MinSendQueueBytes(maxMessageBytes int) int { return ReplyReserveBytes + 2*maxMessageBytes }

// ReplyReserveBytes is the part of a session's byte budget that pushed
// envelopes leave free for replies: one full peers_list (1 MiB) and room
// for acks and errors.
const ReplyReserveBytes = 1<<20 + 64<<10

// MaxNodeName bounds NODE_NAME: every presence entry and lease carries it.
const MaxNodeName = 128

// RequireGossipSecret refuses a gossip bind address other hosts can reach
// without CLUSTER_SECRET: memberlist would then accept any node that
// reaches the port, and with it forged presence entries and hook
// commands. CLUSTER_INSECURE=true waives it for a private lab.
func (c *Config) RequireGossipSecret() error {
	if c.ClusterSecret != "" || c.ClusterInsecure {
		return nil
	}
	host, _, err := net.SplitHostPort(c.ClusterBind)
	if err != nil {
		return fmt.Errorf("config: CLUSTER_BIND: must be host:port, got %q", c.ClusterBind)
	}
	if ip := net.ParseIP(strings.Trim(host, "[]")); ip != nil && ip.IsLoopback() {
		return nil
	}
	where := host
	if where == "" {
		where = "all interfaces"
	}
	return fmt.Errorf("config: CLUSTER_SECRET: required when gossip listens beyond loopback (CLUSTER_BIND=%s, %s): "+
		"without it any host that reaches the gossip port can join the cluster and forge presence and status; "+
		"set the same CLUSTER_SECRET (at least 16 characters, e.g. `openssl rand -hex 32`) on every node, "+
		"or CLUSTER_INSECURE=true on a private network you trust", c.ClusterBind, where)
}

// RequireHookSignature reports whether the public port refuses unsigned
// hooks.
func (c *Config) RequireHookSignature() bool {
	v, err := strconv.ParseBool(c.HookRequireSignature)
	return err != nil || v
}

// RequireJoinProof reports whether /join needs a signature by the key it
// enrols.
func (c *Config) RequireJoinProof() bool {
	v, err := strconv.ParseBool(c.JoinRequireProof)
	return err != nil || v
}

// IsLoopbackHost reports whether host is "localhost" or a loopback IP.
func IsLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// Addr is the HTTP listen address.
func (c *Config) Addr() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.Port)) }

// StatusTTL is STATUS_TTL_SECONDS as a duration.
func (c *Config) StatusTTL() time.Duration { return time.Duration(c.StatusTTLSeconds) * time.Second }

// HookFresh is HOOK_FRESH_WINDOW_SECONDS as a duration.
func (c *Config) HookFresh() time.Duration { return time.Duration(c.HookFreshSeconds) * time.Second }

// Grace is PRESENCE_GRACE_SECONDS as a duration.
func (c *Config) Grace() time.Duration { return time.Duration(c.PresenceGrace) * time.Second }

// ParseLevel maps LOG_LEVEL to a slog level.
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info", "":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("must be debug, info, warn or error, got %q", s)
}

type fieldInfo struct{ field, env, def string }

// Variables lists every environment variable the broker reads, with its
// default; the README table and the deployment checks are built from it.
func Variables() []string {
	var out []string
	for _, f := range fields() {
		out = append(out, f.env)
	}
	return out
}

func fields() []fieldInfo {
	t := reflect.TypeOf(Config{})
	out := make([]fieldInfo, 0, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("env"), ",")
		if name == "" {
			continue
		}
		out = append(out, fieldInfo{field: f.Name, env: name, def: f.Tag.Get("envDefault")})
	}
	return out
}
