// Package clientaddr decides which address a request comes from: the one
// every per-address limit, log line and audit event uses.
//
// A connection's socket peer is the client unless that peer is a trusted
// proxy (TRUSTED_PROXIES). Only a trusted proxy may name the client, in the
// one header the deployment's proxy writes (X-Forwarded-For or
// Fly-Client-IP); from anyone else such headers are ignored, so a client
// cannot choose its own address. The PROXY protocol is handled a layer
// below, on the listener (node): by the time a request gets here, its
// RemoteAddr already is the address the PROXY header carried.
//
// IPv6 clients are keyed by their /64: one host usually holds a whole
// /64, and keying by single addresses would give it 2^64 budgets.
package clientaddr

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// The headers a trusted proxy may name the client in.
const (
	HeaderForwardedFor = "X-Forwarded-For"
	HeaderFlyClientIP  = "Fly-Client-IP"
)

// maxHops bounds the X-Forwarded-For entries examined: a chain of trusted
// proxies is short, and a header as long as the request allows must not
// cost more than a few of them.
const maxHops = 16

// Resolver finds requests' client addresses.
type Resolver struct {
	trusted []netip.Prefix
	header  string // canonical header key
}

// New returns a resolver that believes header (HeaderForwardedFor when
// empty) from peers within trusted.
func New(trusted []netip.Prefix, header string) (*Resolver, error) {
	h, err := CanonicalHeader(header)
	if err != nil {
		return nil, err
	}
	return &Resolver{trusted: trusted, header: h}, nil
}

// FromConfig returns the resolver of TRUSTED_PROXIES (trusted) and
// CLIENT_IP_HEADER (header). config.Validate refuses bad values at
// start-up; a Config built by hand that skipped it gets them logged and
// ignored: a bad TRUSTED_PROXIES trusts nobody rather than everybody, a
// bad CLIENT_IP_HEADER is X-Forwarded-For.
func FromConfig(trusted []string, header string, logger *slog.Logger) *Resolver {
	prefixes, err := ParseTrusted(trusted)
	if err != nil {
		logger.Error("TRUSTED_PROXIES ignored", "err", err)
		prefixes = nil
	}
	r, err := New(prefixes, header)
	if err != nil {
		logger.Error("CLIENT_IP_HEADER ignored", "err", err)
		r, _ = New(prefixes, "")
	}
	return r
}

// CanonicalHeader maps a CLIENT_IP_HEADER value to the header's canonical
// name; empty means X-Forwarded-For.
func CanonicalHeader(name string) (string, error) {
	switch strings.ToLower(strings.TrimSpace(name)) {
	case "", "x-forwarded-for":
		return HeaderForwardedFor, nil
	case "fly-client-ip":
		return HeaderFlyClientIP, nil
	}
	return "", fmt.Errorf("must be %s or %s, got %q", HeaderForwardedFor, HeaderFlyClientIP, name)
}

// ParseTrusted parses TRUSTED_PROXIES entries: CIDRs, or single addresses
// (taken as /32 or /128). A prefix of length 0 is refused: trusting every
// address would let any client name its own.
func ParseTrusted(entries []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, e := range entries {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		var p netip.Prefix
		if strings.Contains(e, "/") {
			var err error
			if p, err = netip.ParsePrefix(e); err != nil {
				return nil, fmt.Errorf("%q is not a CIDR: %v", e, err)
			}
		} else {
			ip, err := netip.ParseAddr(e)
			if err != nil {
				return nil, fmt.Errorf("%q is not an address or a CIDR", e)
			}
			ip = ip.Unmap()
			p = netip.PrefixFrom(ip, ip.BitLen())
		}
		if p.Addr().Zone() != "" {
			return nil, fmt.Errorf("%q: zones are not allowed", e)
		}
		if p.Bits() == 0 {
			return nil, fmt.Errorf("%q trusts every address: any client could name its own", e)
		}
		if p.Addr().Is4In6() {
			// ::ffff:a.b.c.d/n: requests carry the unmapped form.
			if p.Bits() < 96 {
				return nil, fmt.Errorf("%q mixes IPv4-mapped and IPv6 addresses", e)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// Trusts reports whether ip is a trusted proxy.
func (r *Resolver) Trusts(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, p := range r.trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// Addr is a request's client address.
type Addr struct {
	IP   netip.Addr // the client; invalid when the peer address did not parse
	Peer netip.Addr // the socket's peer (the PROXY header's source, if any)
}

// Request resolves req's client address.
func (r *Resolver) Request(req *http.Request) Addr { return r.Resolve(req.RemoteAddr, req.Header) }

// Resolve resolves the client address of a request from remoteAddr
// (host:port) with headers h.
func (r *Resolver) Resolve(remoteAddr string, h http.Header) Addr {
	peer := Peer(remoteAddr)
	a := Addr{IP: peer, Peer: peer}
	if !peer.IsValid() || !r.Trusts(peer) {
		return a
	}
	if r.header == HeaderFlyClientIP {
		// Fly's proxy sets it; the last value is the nearest proxy's.
		if v := h.Values(HeaderFlyClientIP); len(v) > 0 {
			if ip, ok := ParseHop(v[len(v)-1]); ok {
				a.IP = ip
			}
		}
		return a
	}
	// Right to left: each trusted hop vouches for the entry before it; the
	// first untrusted entry is the client. An entry that does not parse was
	// not written by a trusted proxy, so the last trusted hop is the best
	// the request can tell.
	lines := h.Values(HeaderForwardedFor)
	hops := 0
	for i := len(lines) - 1; i >= 0; i-- {
		line := lines[i]
		for end := len(line); ; {
			start := strings.LastIndexByte(line[:end], ',') + 1
			if hops++; hops > maxHops {
				return a
			}
			ip, ok := ParseHop(line[start:end])
			if !ok {
				return a
			}
			a.IP = ip
			if !r.Trusts(ip) {
				return a
			}
			if start == 0 {
				break
			}
			end = start - 1
		}
	}
	return a
}

// Peer parses a socket address (host:port, or a bare address); invalid
// when it is neither.
func Peer(remoteAddr string) netip.Addr {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}
	}
	return ip.Unmap().WithZone("")
}

// ParseHop parses one X-Forwarded-For entry (or a Fly-Client-IP value):
// an address, optionally with a port, IPv6 optionally in brackets.
// Obfuscated identifiers and "unknown" are not addresses.
func ParseHop(s string) (netip.Addr, bool) {
	s = strings.Trim(s, " \t")
	if s == "" || len(s) > 64 {
		return netip.Addr{}, false
	}
	if ip, err := netip.ParseAddr(s); err == nil {
		return ip.Unmap().WithZone(""), true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap().WithZone(""), true
	}
	if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		if ip, err := netip.ParseAddr(s[1 : len(s)-1]); err == nil && ip.Is6() {
			return ip.Unmap().WithZone(""), true
		}
	}
	return netip.Addr{}, false
}

// String is the client's address, for logs and audit events.
func (a Addr) String() string {
	if !a.IP.IsValid() {
		return "unknown"
	}
	return a.IP.String()
}

// Key is what per-address limits count by: the IPv4 address, or the /64 of
// an IPv6 address.
func (a Addr) Key() string { return Key(a.IP) }

// Key is the limit key of ip.
func Key(ip netip.Addr) string {
	switch {
	case !ip.IsValid():
		return "unknown"
	case ip.Is4():
		return ip.String()
	}
	p, _ := ip.WithZone("").Prefix(64)
	return p.String()
}
