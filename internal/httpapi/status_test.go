package httpapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image"
	"image/color"
	"image/png"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/admin"
	"github.com/claudemesh/broker/internal/client"
	"github.com/claudemesh/broker/internal/config"
	"github.com/claudemesh/broker/internal/httpapi"
	"github.com/claudemesh/broker/internal/pgtest"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/testkit"
)

const statusToken = "s3cret-admin-token-for-status-tests"

// noRedirect is a client that shows redirects instead of following them.
var noRedirect = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

func statusGet(t *testing.T, url string, mod func(*http.Request)) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if mod != nil {
		mod(req)
	}
	resp, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

func bearer(token string) func(*http.Request) {
	return func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+token) }
}

func withAdminToken(token string) testkit.Options {
	return testkit.Options{Configure: func(c *config.Config) { c.AdminToken = token }}
}

// The page does not exist unless ADMIN_TOKEN is set.
func TestStatusPageOffWithoutAdminToken(t *testing.T) {
	n := testkit.StartNode(t, pgtest.NewDB(t), testkit.Options{})
	for _, path := range []string{"/status", "/status.json", "/status?token=", "/status?token=x"} {
		if resp, _ := statusGet(t, n.HTTPURL()+path, bearer("")); resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s = %d, want 404", path, resp.StatusCode)
		}
	}
	if resp, _ := statusPost(t, n.HTTPURL()+"/status/login", neturl.Values{"token": {""}}, nil); resp.StatusCode != http.StatusNotFound {
		t.Errorf("POST /status/login = %d, want 404", resp.StatusCode)
	}
}

// Bearer header, or the HttpOnly cookie the login form (POST
// /status/login) sets; everything else, a token in the URL included, is
// refused.
func TestStatusPageAuth(t *testing.T) {
	n := testkit.StartNode(t, pgtest.NewDB(t), withAdminToken(statusToken))
	base := n.HTTPURL()

	for name, mod := range map[string]func(*http.Request){
		"no credentials":     nil,
		"wrong bearer":       bearer(statusToken + "x"),
		"token prefix":       bearer(statusToken[:10]),
		"basic auth":         func(r *http.Request) { r.SetBasicAuth("admin", statusToken) },
		"forged cookie":      func(r *http.Request) { r.AddCookie(&http.Cookie{Name: "cm_status", Value: statusToken}) },
		"empty bearer token": bearer(""),
	} {
		for _, path := range []string{"/status", "/status.json"} {
			resp, body := statusGet(t, base+path, mod)
			if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("%s: GET %s = %d %q, want 401 with WWW-Authenticate", name, path, resp.StatusCode, body)
			}
			if strings.Contains(body, n.Name()) {
				t.Errorf("%s: the 401 leaks the report", name)
			}
		}
	}
	resp, body := statusGet(t, base+"/status", bearer(statusToken))
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") || !strings.Contains(body, n.Name()) {
		t.Fatalf("bearer: GET /status = %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || strings.Contains(csp, "script-src") {
		t.Errorf("Content-Security-Policy = %q", csp)
	}
	if !strings.Contains(body, `<meta http-equiv="refresh" content="5">`) {
		t.Error("the page does not refresh itself")
	}
	if regexp.MustCompile(`(?i)<script|src="http|href="http`).MatchString(body) {
		t.Error("the page loads a script or an external resource")
	}

	// A token in the URL is no credential: it would end up in proxy logs
	// and browser history.
	for _, path := range []string{"/status?token=" + statusToken, "/status.json?token=" + statusToken} {
		if resp, body := statusGet(t, base+path, nil); resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("Set-Cookie") != "" || strings.Contains(body, n.Name()) {
			t.Errorf("GET %s = %d, cookie %q: want 401 without a cookie", path, resp.StatusCode, resp.Header.Get("Set-Cookie"))
		}
	}
	// A browser without the cookie gets the login form, which posts the
	// token in the body.
	resp, body = statusGet(t, base+"/status", nil)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, `<form method="post" action="/status/login">`) {
		t.Fatalf("GET /status without credentials = %d, want 401 with the login form:\n%s", resp.StatusCode, body)
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "form-action 'self'") || strings.Contains(csp, "script-src") {
		t.Errorf("login page Content-Security-Policy = %q", csp)
	}
	if resp, body := statusPost(t, base+"/status/login", neturl.Values{"token": {"wrong"}}, nil); resp.StatusCode != http.StatusUnauthorized ||
		resp.Header.Get("Set-Cookie") != "" || !strings.Contains(body, "not the ADMIN_TOKEN") {
		t.Fatalf("wrong token posted = %d, cookie %q; want 401 and no cookie", resp.StatusCode, resp.Header.Get("Set-Cookie"))
	}
	resp, _ = statusPost(t, base+"/status/login", neturl.Values{"token": {statusToken}}, nil)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/status" {
		t.Fatalf("login = %d Location %q, want 303 to /status", resp.StatusCode, resp.Header.Get("Location"))
	}
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "cm_status" {
			cookie = c
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.Path != "/" || cookie.Value == "" || strings.Contains(cookie.Value, statusToken) {
		t.Fatalf("cookie = %+v; want an HttpOnly cookie that does not contain the token", cookie)
	}
	withCookie := func(r *http.Request) { r.AddCookie(&http.Cookie{Name: cookie.Name, Value: cookie.Value}) }
	if resp, body := statusGet(t, base+"/status.json", withCookie); resp.StatusCode != http.StatusOK || !json.Valid([]byte(body)) {
		t.Fatalf("cookie: GET /status.json = %d", resp.StatusCode)
	}
	resp, _ = statusPost(t, base+"/status/login", neturl.Values{"token": {statusToken}}, func(r *http.Request) { r.Header.Set("X-Forwarded-Proto", "https") })
	if c := resp.Cookies(); len(c) != 1 || !c[0].Secure {
		t.Fatalf("behind a TLS proxy the cookie must be Secure: %v", c)
	}
}

func statusPost(t *testing.T, url string, form neturl.Values, mod func(*http.Request)) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if mod != nil {
		mod(req)
	}
	resp, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

// statusCluster is two nodes with a mesh whose peers are spread over them
// in each status, a message waiting for an offline member, and a rejected
// hello.
type statusCluster struct {
	a, b     *testkit.Node
	meshName string
	peers    map[string]string // display name → status
}

func startStatusCluster(t *testing.T) *statusCluster {
	t.Helper()
	db := pgtest.NewDB(t)
	a := testkit.StartNode(t, db, withAdminToken(statusToken))
	b := testkit.StartNode(t, db, testkit.Options{Configure: withAdminToken(statusToken).Configure, Join: []*testkit.Node{a}})
	testkit.Eventually(t, 10*time.Second, "a 2-node cluster", func() bool {
		return a.Cluster().NumMembers() == 2 && b.Cluster().NumMembers() == 2
	})
	sc := &statusCluster{a: a, b: b, meshName: "Apollo Ops", peers: map[string]string{"alice": "idle", "bob": "working", "carol": "dnd"}}
	mc, err := admin.CreateMesh(context.Background(), a.Store(), sc.meshName, "")
	if err != nil {
		t.Fatal(err)
	}
	mesh := &testkit.Mesh{MeshCreated: mc}
	dave := mesh.AddMember(t, a.Store(), "dave") // never connects
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var alice *client.Conn
	for i, name := range []string{"alice", "bob", "carol"} {
		node := a
		if i == 1 {
			node = b
		}
		c := testkit.Connect(t, node.URL(), mesh.AddMember(t, a.Store(), name), client.HelloOptions{Hostname: name + "-laptop"})
		if status := sc.peers[name]; status != "idle" {
			if err := c.WriteJSON(ctx, map[string]string{"type": protocol.TypeSetStatus, "status": status}); err != nil {
				t.Fatal(err)
			}
		}
		if name == "alice" {
			alice = c
		}
	}
	if err := alice.WriteJSON(ctx, protocol.Send{Type: protocol.TypeSend, ID: "q-1", TargetSpec: dave.Pubkey(), Nonce: "bg==", Ciphertext: "cXVldWVk"}); err != nil {
		t.Fatal(err)
	}
	var ack protocol.Ack
	if err := testkit.Expect(t, alice, protocol.TypeAck, 5*time.Second).Decode(&ack); err != nil || !ack.Queued {
		t.Fatalf("send to the offline member: %+v %v", ack, err)
	}

	rejected, err := client.Dial(ctx, b.URL(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rejected.CloseNow()
	h := client.NewHello(dave, client.HelloOptions{})
	h.Signature = strings.Repeat("ab", 64)
	if err := rejected.WriteJSON(ctx, h); err != nil {
		t.Fatal(err)
	}
	var he *client.HelloError
	if _, err := rejected.WaitHelloAck(ctx); !errors.As(err, &he) || he.Code != protocol.ReasonBadSignature {
		t.Fatalf("forged hello: %v, want bad_signature", err)
	}
	return sc
}

func (sc *statusCluster) report(t *testing.T, n *testkit.Node) httpapi.StatusReport {
	t.Helper()
	resp, body := statusGet(t, n.HTTPURL()+"/status.json", bearer(statusToken))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /status.json = %d %s", resp.StatusCode, body)
	}
	var rep httpapi.StatusReport
	if err := json.Unmarshal([]byte(body), &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

// settled reports whether rep shows everything startStatusCluster did:
// gossip, statuses and the asynchronously written audit event.
func (sc *statusCluster) settled(rep httpapi.StatusReport) bool {
	if len(rep.Meshes) != 1 || len(rep.Meshes[0].Peers) != len(sc.peers) || len(rep.Rejections.Recent) == 0 {
		return false
	}
	for _, p := range rep.Meshes[0].Peers {
		if sc.peers[p.DisplayName] != p.Status {
			return false
		}
	}
	return true
}

// Any node reports the whole cluster: both nodes healthy, the mesh with
// every peer on either node and its status, the waiting message, and the
// rejected hello (counted on the node that rejected it, listed
// cluster-wide from the audit log).
func TestStatusPageReport(t *testing.T) {
	sc := startStatusCluster(t)
	var rep httpapi.StatusReport
	testkit.Eventually(t, 10*time.Second, "the report to show the cluster", func() bool {
		rep = sc.report(t, sc.a)
		return sc.settled(rep)
	})
	if rep.Node != sc.a.Name() || rep.DB != "up" || len(rep.Errors) != 0 {
		t.Fatalf("report header = node %q db %q errors %v", rep.Node, rep.DB, rep.Errors)
	}
	if len(rep.Nodes) != 2 || rep.HealthyNodes != 2 {
		t.Fatalf("nodes = %+v, healthy %d", rep.Nodes, rep.HealthyNodes)
	}
	for _, n := range rep.Nodes {
		if n.State != "alive" || n.Health == nil || n.Health.Status != "ok" || n.Health.Node != n.Name || n.Self != (n.Name == sc.a.Name()) {
			t.Errorf("node %+v, health %+v", n, n.Health)
		}
	}
	m := rep.Meshes[0]
	if m.Name != sc.meshName || m.Online != 3 || rep.OnlinePeers != 3 {
		t.Fatalf("mesh = %q online %d (report %d)", m.Name, m.Online, rep.OnlinePeers)
	}
	for _, p := range m.Peers {
		wantNode := sc.a.Name()
		if p.DisplayName == "bob" {
			wantNode = sc.b.Name()
		}
		if p.Node != wantNode || p.Hostname != p.DisplayName+"-laptop" || len(p.Pubkey) != 64 {
			t.Errorf("peer %+v, want it on %s", p, wantNode)
		}
	}
	if rep.QueueDepth == nil {
		t.Error("queue depth unknown")
	} else if *rep.QueueDepth < 1 {
		t.Errorf("queue depth = %d, want at least the message for dave", *rep.QueueDepth)
	}
	r := rep.Rejections.Recent[0]
	if r.Reason != protocol.ReasonBadSignature || r.Remote != "127.0.0.1" {
		t.Errorf("recent rejection = %+v", r)
	}
	if rep.Rejections.Total != 0 {
		t.Errorf("node a rejected %v hellos, want 0 (b rejected it)", rep.Rejections.Total)
	}
	repB := sc.report(t, sc.b)
	var badSig float64
	for _, rc := range repB.Rejections.ByReason {
		if rc.Reason == protocol.ReasonBadSignature {
			badSig = rc.Count
		}
	}
	if badSig != 1 || repB.Rejections.Total != 1 {
		t.Errorf("node b counts %v bad_signature of %v rejections, want 1 of 1: %+v", badSig, repB.Rejections.Total, repB.Rejections.ByReason)
	}

	// A node that dies is shown as unreachable by the others until its
	// registration in Postgres ages out.
	sc.b.Kill()
	testkit.Eventually(t, 15*time.Second, "the dead node to be reported", func() bool {
		rep = sc.report(t, sc.a)
		for _, n := range rep.Nodes {
			if n.Name == sc.b.Name() {
				return !n.Healthy() && n.Health == nil && n.HealthErr != ""
			}
		}
		return false
	})
	if rep.HealthyNodes != 1 {
		t.Fatalf("healthy nodes = %d after one died", rep.HealthyNodes)
	}
}

// Peer-controlled text (display names, summaries, paths) is escaped in
// the page, in element text and in attributes.
func TestStatusPageEscapesPeerText(t *testing.T) {
	db := pgtest.NewDB(t)
	n := testkit.StartNode(t, db, withAdminToken(statusToken))
	mesh := testkit.NewMesh(t, n.Store(), 0)
	evil := `<script>alert("name")</script>`
	c := testkit.Connect(t, n.URL(), mesh.AddMember(t, n.Store(), evil),
		client.HelloOptions{Cwd: `/tmp/"onmouseover="alert(1)`, Hostname: `<b>host</b>`})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	summary := `"><img src=x onerror=alert(2)>`
	if err := c.WriteJSON(ctx, map[string]string{"type": protocol.TypeSetSummary, "summary": summary}); err != nil {
		t.Fatal(err)
	}
	var body string
	testkit.Eventually(t, 5*time.Second, "the summary on the page", func() bool {
		_, body = statusGet(t, n.HTTPURL()+"/status", bearer(statusToken))
		return strings.Contains(body, "onerror=alert(2)")
	})
	for _, raw := range []string{evil, "<img", `"onmouseover="`, "<b>host</b>"} {
		if strings.Contains(body, raw) {
			t.Errorf("the page contains %q unescaped", raw)
		}
	}
	for _, escaped := range []string{
		`&lt;script&gt;alert(&#34;name&#34;)&lt;/script&gt;`,
		`&#34;&gt;&lt;img src=x onerror=alert(2)&gt;`,
		`title="/tmp/&#34;onmouseover=&#34;alert(1)"`,
		`&lt;b&gt;host&lt;/b&gt;`,
	} {
		if !strings.Contains(body, escaped) {
			t.Errorf("the page lacks %s", escaped)
		}
	}
}

// chromium finds Debian's chromium (testkit.Tool: a failure in CI, a
// skip naming the package elsewhere).
func chromium(t *testing.T) string {
	t.Helper()
	return testkit.Tool(t, "chromium", "the status page is tested in a real headless browser",
		"/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium")
}

// runChromium opens url in a fresh headless profile with extra flags and
// returns what it printed on stdout.
func runChromium(t *testing.T, bin, url string, flags ...string) string {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + filepath.Join(dir, "profile")}, flags...)
	cmd := exec.CommandContext(ctx, bin, append(args, url)...)
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_CACHE_HOME="+dir)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %v: %v\n%s", flags, err, stderr.String())
	}
	return stdout.String()
}

// peerRow returns the table row of the page that names peer.
func peerRow(t *testing.T, dom, peer string) string {
	t.Helper()
	for _, row := range strings.Split(dom, "<tr>") {
		if strings.Contains(row, "<b>"+peer+"</b>") {
			return row
		}
	}
	t.Fatalf("no row for peer %s in the rendered page", peer)
	return ""
}

// The page as a browser shows it: chromium opens /status through a proxy
// that adds the admin token's header (as an operator's authenticating
// proxy would), and renders the cluster. The rendered DOM
// names both nodes, the mesh and every peer with its status badge; the
// screenshot has the page's size, is not blank, and shows the status badges
// in their colours.
func TestStatusPageInBrowser(t *testing.T) {
	bin := chromium(t)
	sc := startStatusCluster(t)
	testkit.Eventually(t, 10*time.Second, "the report to show the cluster", func() bool { return sc.settled(sc.report(t, sc.a)) })
	target, err := neturl.Parse(sc.a.HTTPURL())
	if err != nil {
		t.Fatal(err)
	}
	authProxy := httptest.NewServer(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(target)
		pr.Out.Header.Set("Authorization", "Bearer "+statusToken)
	}})
	t.Cleanup(authProxy.Close)
	url := authProxy.URL + "/status"

	dom := runChromium(t, bin, url, "--dump-dom")
	for _, want := range []string{
		`<b id="served-by">` + sc.a.Name() + `</b>`,
		"<b>" + sc.a.Name() + "</b>", "<b>" + sc.b.Name() + "</b>",
		`<b id="healthy-nodes">2 / 2</b>`,
		`<b id="online-peers">3</b>`,
		`<h3 class="mesh">` + sc.meshName + " <small>",
		`<span class="badge bad">` + protocol.ReasonBadSignature + `</span>`,
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("the rendered page lacks %s", want)
		}
	}
	classes := map[string]string{"idle": "ok", "working": "warn", "dnd": "bad"}
	for peer, status := range sc.peers {
		if row := peerRow(t, dom, peer); !strings.Contains(row, `<span class="badge `+classes[status]+`">`+status+`</span>`) {
			t.Errorf("row of %s lacks its %s badge: %s", peer, status, row)
		}
	}
	if t.Failed() {
		t.Fatalf("rendered DOM:\n%s", dom)
	}

	shot := filepath.Join(t.TempDir(), "status.png")
	runChromium(t, bin, url, "--screenshot="+shot, "--window-size=1280,900", "--hide-scrollbars")
	f, err := os.Open(shot)
	if err != nil {
		t.Fatalf("no screenshot: %v", err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if b := img.Bounds(); b.Dx() != 1280 || b.Dy() != 900 {
		t.Fatalf("screenshot is %dx%d, want 1280x900", b.Dx(), b.Dy())
	}
	checkScreenshot(t, img, shot)
}

func hexColour(s string) color.RGBA {
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "#"), 16, 32)
	if err != nil {
		panic(err)
	}
	return color.RGBA{uint8(v >> 16), uint8(v >> 8), uint8(v), 255}
}

// checkScreenshot looks for the page's header band, for each status
// badge's colour (idle, working, dnd; the alive and ok badges are green
// too), and for enough drawn detail (text) to rule out a blank or an error
// page.
func checkScreenshot(t *testing.T, img image.Image, path string) {
	t.Helper()
	count := map[color.RGBA]int{}
	distinct := map[color.RGBA]bool{}
	ink := 0
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			r, g, bl, _ := img.At(x, y).RGBA()
			c := color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(bl >> 8), 255}
			count[c]++
			distinct[c] = true
			if c != (color.RGBA{0xf6, 0xf8, 0xfa, 255}) && c != (color.RGBA{0xff, 0xff, 0xff, 255}) {
				ink++
			}
		}
	}
	header := hexColour("#24292f")
	if r, g, bl, _ := img.At(b.Min.X+2, b.Min.Y+2).RGBA(); (color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(bl >> 8), 255}) != header {
		t.Errorf("the top of the screenshot is not the page header (%s)", path)
	}
	for name, hex := range map[string]string{"idle/ok green": "#1a7f37", "working amber": "#9a6700", "dnd/rejection red": "#cf222e"} {
		if n := count[hexColour(hex)]; n < 150 {
			t.Errorf("the screenshot has %d pixels of the %s badge colour %s, want at least 150 (%s)", n, name, hex, path)
		}
	}
	if len(distinct) < 40 {
		t.Errorf("the screenshot has only %d distinct colours: no rendered text (%s)", len(distinct), path)
	}
	if frac := float64(ink) / float64(b.Dx()*b.Dy()); frac < 0.08 {
		t.Errorf("only %.1f%% of the screenshot differs from the background (%s)", 100*frac, path)
	}
	// To look at the page: STATUS_SCREENSHOT_DIR=/some/dir go test -run InBrowser
	if keep := os.Getenv("STATUS_SCREENSHOT_DIR"); keep != "" {
		data, _ := os.ReadFile(path)
		_ = os.WriteFile(filepath.Join(keep, "status.png"), data, 0o644)
	}
}
