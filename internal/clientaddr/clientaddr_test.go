package clientaddr_test

import (
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/clientaddr"
)

func resolver(t testing.TB, header string, trusted ...string) *clientaddr.Resolver {
	t.Helper()
	p, err := clientaddr.ParseTrusted(trusted)
	if err != nil {
		t.Fatal(err)
	}
	r, err := clientaddr.New(p, header)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func hdr(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

func TestResolve(t *testing.T) {
	xff := resolver(t, "", "10.0.0.0/8", "127.0.0.1", "fd00::/8")
	fly := resolver(t, "fly-client-ip", "172.16.0.0/12")
	none := resolver(t, "")
	for _, tc := range []struct {
		name   string
		r      *clientaddr.Resolver
		remote string
		h      http.Header
		want   string
	}{
		{"no proxy: the socket", xff, "203.0.113.5:4000", nil, "203.0.113.5"},
		{"untrusted peer's XFF is ignored", xff, "203.0.113.5:4000", hdr("X-Forwarded-For", "198.51.100.1"), "203.0.113.5"},
		{"untrusted peer's Fly-Client-IP is ignored", fly, "203.0.113.5:4000", hdr("Fly-Client-IP", "198.51.100.1"), "203.0.113.5"},
		{"nothing trusted", none, "127.0.0.1:1", hdr("X-Forwarded-For", "198.51.100.1"), "127.0.0.1"},
		{"trusted proxy names the client", xff, "10.1.2.3:80", hdr("X-Forwarded-For", "198.51.100.1"), "198.51.100.1"},
		{"rightmost untrusted hop wins over a forged left part", xff, "10.1.2.3:80",
			hdr("X-Forwarded-For", "1.1.1.1, 2.2.2.2,198.51.100.1"), "198.51.100.1"},
		{"trusted hops are skipped", xff, "10.1.2.3:80", hdr("X-Forwarded-For", "1.1.1.1, 198.51.100.1, 10.9.9.9"), "198.51.100.1"},
		{"several header lines are one list", xff, "10.1.2.3:80",
			hdr("X-Forwarded-For", "1.1.1.1", "X-Forwarded-For", "198.51.100.1, 10.0.0.7"), "198.51.100.1"},
		{"garbage stops at the last trusted hop", xff, "10.1.2.3:80", hdr("X-Forwarded-For", "198.51.100.1, unknown, 10.0.0.7"), "10.0.0.7"},
		{"empty entry stops", xff, "10.1.2.3:80", hdr("X-Forwarded-For", "198.51.100.1,"), "10.1.2.3"},
		{"all trusted: the leftmost", xff, "10.1.2.3:80", hdr("X-Forwarded-For", "10.0.0.1, 10.0.0.2"), "10.0.0.1"},
		{"port and brackets", xff, "[fd00::1]:80", hdr("X-Forwarded-For", "[2001:db8::7]:5555"), "2001:db8::7"},
		{"address with port", xff, "127.0.0.1:80", hdr("X-Forwarded-For", "198.51.100.9:1234"), "198.51.100.9"},
		{"IPv4-mapped is unmapped", xff, "[::ffff:10.0.0.5]:80", hdr("X-Forwarded-For", "::ffff:198.51.100.2"), "198.51.100.2"},
		{"Fly-Client-IP from the proxy", fly, "172.19.0.10:5000", hdr("Fly-Client-IP", "2001:db8:1:2::3"), "2001:db8:1:2::3"},
		{"Fly resolver ignores XFF", fly, "172.19.0.10:5000", hdr("X-Forwarded-For", "198.51.100.1"), "172.19.0.10"},
		{"XFF resolver ignores Fly-Client-IP", xff, "10.0.0.1:5000", hdr("Fly-Client-IP", "198.51.100.1"), "10.0.0.1"},
		{"bad Fly-Client-IP keeps the peer", fly, "172.19.0.10:5000", hdr("Fly-Client-IP", "nope"), "172.19.0.10"},
		{"zone dropped", xff, "[fe80::1%eth0]:80", nil, "fe80::1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.h
			if h == nil {
				h = http.Header{}
			}
			got := tc.r.Resolve(tc.remote, h)
			if got.String() != tc.want {
				t.Fatalf("Resolve(%s, %v) = %s, want %s", tc.remote, h, got, tc.want)
			}
		})
	}
}

// A header as long as a request allows costs at most maxHops entries, and a
// long chain of trusted hops ends at the last one examined.
func TestResolveBoundsHops(t *testing.T) {
	r := resolver(t, "", "10.0.0.0/8")
	chain := strings.Repeat("10.0.0.1,", 100000) + "10.0.0.2"
	got := r.Resolve("10.0.0.3:1", hdr("X-Forwarded-For", "198.51.100.1,"+chain))
	if got.IP != netip.MustParseAddr("10.0.0.1") {
		t.Fatalf("long trusted chain resolved to %s, want the last trusted hop examined", got)
	}
}

func TestKey(t *testing.T) {
	for in, want := range map[string]string{
		"198.51.100.7":         "198.51.100.7",
		"2001:db8:1:2:3:4:5:6": "2001:db8:1:2::/64",
		"2001:db8:1:2::9":      "2001:db8:1:2::/64",
		"2001:db8:1:3::9":      "2001:db8:1:3::/64",
	} {
		if got := clientaddr.Key(netip.MustParseAddr(in)); got != want {
			t.Errorf("Key(%s) = %s, want %s", in, got, want)
		}
	}
	if clientaddr.Key(netip.Addr{}) != "unknown" {
		t.Error("an invalid address has a key of its own")
	}
	r := resolver(t, "")
	a := r.Resolve("[2001:db8:5:6:aaaa::1]:9", http.Header{})
	b := r.Resolve("[2001:db8:5:6:bbbb::2]:9", http.Header{})
	if a.Key() != b.Key() || a.String() == b.String() {
		t.Fatalf("one /64: keys %s %s, addresses %s %s; want one key, two addresses", a.Key(), b.Key(), a, b)
	}
}

func TestParseTrusted(t *testing.T) {
	got, err := clientaddr.ParseTrusted([]string{" 10.0.0.0/8", "127.0.0.1", "fdaa::/16", "", "::ffff:192.168.0.0/112", "10.1.2.3/8"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "127.0.0.1/32", "fdaa::/16", "192.168.0.0/16", "10.0.0.0/8"}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Errorf("entry %d = %s, want %s", i, got[i], want[i])
		}
	}
	for _, bad := range []string{"0.0.0.0/0", "::/0", "10.0.0.0/33", "nope", "10.0.0.1/x", "fe80::1%eth0/64"} {
		if _, err := clientaddr.ParseTrusted([]string{bad}); err == nil {
			t.Errorf("ParseTrusted(%q) accepted", bad)
		}
	}
	if _, err := clientaddr.New(nil, "X-Real-IP"); err == nil {
		t.Error("New accepted a header it does not know")
	}
}

// Resolve never panics; from an untrusted peer the answer is the peer; the
// answer is always the peer or an address the header names; and its key
// is the address itself (IPv4) or its /64.
func FuzzResolve(f *testing.F) {
	f.Add("10.0.0.1:80", "198.51.100.1, 10.0.0.2", "", false)
	f.Add("203.0.113.1:80", "198.51.100.1", "198.51.100.2", true)
	f.Add("[fd00::1]:80", "[2001:db8::1]:443,unknown", "2001:db8::2", true)
	f.Add("garbage", ",,,", "::ffff:1.2.3.4", false)
	f.Add("10.0.0.1:1", strings.Repeat("10.0.0.9,", 40), "", false)
	xff := resolver(f, "", "10.0.0.0/8", "fd00::/8")
	fly := resolver(f, "Fly-Client-IP", "10.0.0.0/8", "fd00::/8")
	f.Fuzz(func(t *testing.T, remote, forwarded, flyIP string, useFly bool) {
		r := xff
		if useFly {
			r = fly
		}
		h := http.Header{}
		if forwarded != "" {
			h.Set("X-Forwarded-For", forwarded)
		}
		if flyIP != "" {
			h.Set("Fly-Client-IP", flyIP)
		}
		a := r.Resolve(remote, h)
		if !a.Peer.IsValid() {
			if a.IP.IsValid() {
				t.Fatalf("no peer address, yet client %s", a.IP)
			}
			return
		}
		if !r.Trusts(a.Peer) && a.IP != a.Peer {
			t.Fatalf("untrusted peer %s named client %s", a.Peer, a.IP)
		}
		if a.IP != a.Peer {
			named := false
			for _, e := range append(strings.Split(forwarded, ","), flyIP) {
				if ip, ok := clientaddr.ParseHop(e); ok && ip == a.IP {
					named = true
				}
			}
			if !named {
				t.Fatalf("client %s is neither the peer %s nor named by the headers", a.IP, a.Peer)
			}
		}
		if a.IP.Zone() != "" || a.IP.Is4In6() {
			t.Fatalf("client %s has a zone or is IPv4-mapped", a.IP)
		}
		k := a.Key()
		if a.IP.Is4() && k != a.IP.String() || a.IP.Is6() && !strings.HasSuffix(k, "/64") {
			t.Fatalf("key %s of %s", k, a.IP)
		}
	})
}

// FromConfig believes the configured header from the configured proxies;
// a bad TRUSTED_PROXIES is logged and trusts nobody, a bad
// CLIENT_IP_HEADER is logged and means X-Forwarded-For.
func TestFromConfig(t *testing.T) {
	var logged strings.Builder
	logger := slog.New(slog.NewTextHandler(&logged, nil))
	fly := hdr("Fly-Client-IP", "203.0.113.9", "X-Forwarded-For", "198.51.100.7")
	if got := clientaddr.FromConfig([]string{"10.0.0.0/8"}, "fly-client-ip", logger).Resolve("10.1.2.3:5000", fly).String(); got != "203.0.113.9" {
		t.Fatalf("valid config: client %s", got)
	}
	if logged.Len() != 0 {
		t.Fatalf("a valid config logged: %s", logged.String())
	}
	if got := clientaddr.FromConfig([]string{"not a prefix"}, "fly-client-ip", logger).Resolve("10.1.2.3:5000", fly).String(); got != "10.1.2.3" {
		t.Fatalf("bad TRUSTED_PROXIES: client %s, want the socket peer", got)
	}
	if !strings.Contains(logged.String(), "TRUSTED_PROXIES ignored") {
		t.Fatalf("bad TRUSTED_PROXIES not logged: %s", logged.String())
	}
	logged.Reset()
	if got := clientaddr.FromConfig([]string{"10.0.0.0/8"}, "X-Real-IP", logger).Resolve("10.1.2.3:5000", fly).String(); got != "198.51.100.7" {
		t.Fatalf("bad CLIENT_IP_HEADER: client %s, want X-Forwarded-For's", got)
	}
	if !strings.Contains(logged.String(), "CLIENT_IP_HEADER ignored") {
		t.Fatalf("bad CLIENT_IP_HEADER not logged: %s", logged.String())
	}
}
