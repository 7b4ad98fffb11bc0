package httpapi

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"html/template"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/store"
)

// The operator status page: GET /status (HTML, refreshes itself) and
// GET /status.json (the same report for scripts). It is off (404) unless
// ADMIN_TOKEN is set; then it takes "Authorization: Bearer <token>", or the
// HttpOnly cookie that POST /status/login sets for a browser (the page
// without credentials is that login form). The token is never taken from
// a URL: URLs end up in proxy logs and browser history.

const (
	statusCookie      = "cm_status"
	statusCookieAge   = 12 * time.Hour
	statusMaxMeshes   = 50  // meshes shown, most populated first
	statusMaxPeers    = 200 // peers shown per mesh
	statusRejections  = 20  // recent rejected hellos shown
	statusRegistered  = 30 * time.Second
	statusTimeout     = 3 * time.Second // to gather the whole report
	statusProbe       = 1500 * time.Millisecond
	statusNameQueries = 8    // concurrent mesh name lookups
	statusLoginBody   = 4096 // bytes of a login form
)

// statusProbeClient asks the other nodes for their /health. No keep-alive:
// the page refreshes every few seconds, idle connections would only wait.
var statusProbeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// StatusReport is the status page's content.
type StatusReport struct {
	GeneratedAt    time.Time        `json:"generatedAt"`
	Node           string           `json:"node"` // the node that answered
	Version        string           `json:"version"`
	GitSHA         string           `json:"gitSha"`
	DB             string           `json:"db"` // up | down, as this node sees it
	Nodes          []StatusNode     `json:"nodes"`
	HealthyNodes   int              `json:"healthyNodes"`
	Meshes         []StatusMesh     `json:"meshes"`
	MeshesNotShown int              `json:"meshesNotShown"`
	OnlinePeers    int              `json:"onlinePeers"`
	QueueDepth     *int64           `json:"queueDepth"` // null when Postgres did not answer
	Rejections     StatusRejections `json:"rejections"`
	Errors         []string         `json:"errors,omitempty"` // parts that could not be loaded
}

// StatusNode is one node of the cluster: a gossip member, or a node that
// registered in Postgres recently but is not in this node's gossip view.
type StatusNode struct {
	Name       string  `json:"name"`
	GossipAddr string  `json:"gossipAddr"`
	HTTPAddr   string  `json:"httpAddr"`
	State      string  `json:"state"` // alive | suspect | not in gossip
	Self       bool    `json:"self"`
	Health     *Health `json:"health,omitempty"` // its /health answer
	HealthErr  string  `json:"healthError,omitempty"`
}

// Healthy reports whether the node is alive in gossip and its /health said ok.
func (n StatusNode) Healthy() bool {
	return n.State == "alive" && n.Health != nil && n.Health.Status == "ok"
}

// StatusMesh is a mesh with live sessions.
type StatusMesh struct {
	ID            string       `json:"meshId"`
	Name          string       `json:"name"`
	Slug          string       `json:"slug"`
	Online        int          `json:"online"`
	Peers         []StatusPeer `json:"peers"`
	PeersNotShown int          `json:"peersNotShown"`
}

// StatusPeer is one live session. Names, summaries and paths come from
// peers: the page escapes them like any other untrusted text.
type StatusPeer struct {
	DisplayName  string    `json:"displayName"`
	MemberID     string    `json:"memberId"`
	Pubkey       string    `json:"pubkey"`
	SessionID    string    `json:"sessionId"`
	Status       string    `json:"status"`
	StatusSource string    `json:"statusSource"`
	StatusSince  time.Time `json:"statusSince"`
	Summary      string    `json:"summary,omitempty"`
	Groups       []string  `json:"groups,omitempty"`
	Node         string    `json:"node"`
	Hostname     string    `json:"hostname,omitempty"`
	Cwd          string    `json:"cwd,omitempty"`
	ConnectedAt  time.Time `json:"connectedAt"`
}

// StatusRejections are rejected hellos: this node's counters since it
// started, and the cluster's most recent ones from the audit log.
type StatusRejections struct {
	ByReason []ReasonCount     `json:"byReason"`
	Recent   []RecentRejection `json:"recent"`
	Total    float64           `json:"total"`
}

// ReasonCount is one value of broker_connections_rejected_total.
type ReasonCount struct {
	Reason string  `json:"reason"`
	Count  float64 `json:"count"`
}

// RecentRejection is one hello_rejected audit event.
type RecentRejection struct {
	At     time.Time `json:"at"`
	Reason string    `json:"reason"`
	Remote string    `json:"remote,omitempty"`
	MeshID string    `json:"meshId,omitempty"`
	Pubkey string    `json:"pubkey,omitempty"`
}

func (a *API) statusRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /status", a.serveStatusPage)
	mux.HandleFunc("GET /status.json", a.serveStatusJSON)
	mux.HandleFunc("POST /status/login", a.serveStatusLogin)
}

func (a *API) serveStatusJSON(w http.ResponseWriter, r *http.Request) {
	if !a.statusAuthorized(w, r, false) {
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, a.statusReport(r.Context()))
}

func (a *API) serveStatusPage(w http.ResponseWriter, r *http.Request) {
	if !a.statusAuthorized(w, r, true) {
		return
	}
	var buf bytes.Buffer
	if err := statusTemplate.Execute(&buf, a.statusReport(r.Context())); err != nil {
		a.logger.Error("render status page", "err", err)
		http.Error(w, "cannot render the status page", http.StatusInternalServerError)
		return
	}
	pageHeaders(w.Header(), "none")
	_, _ = buf.WriteTo(w)
}

// pageHeaders are the status and login pages' headers: inline styles
// only, no script, no external resource, no framing; forms may post to
// formAction ('none' or 'self').
func pageHeaders(h http.Header, formAction string) {
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action '"+formAction+"'; frame-ancestors 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
}

// statusAuthorized lets the request through or answers it: 404 when the
// page is off, 401 for missing or wrong credentials (with the login form
// when page is set), 429 when an address keeps guessing.
func (a *API) statusAuthorized(w http.ResponseWriter, r *http.Request, page bool) bool {
	token := a.cfg.AdminToken
	if token == "" {
		http.NotFound(w, r)
		return false
	}
	if bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok && secretEqual(strings.TrimSpace(bearer), token) {
		return true
	}
	if c, err := r.Cookie(statusCookie); err == nil && secretEqual(c.Value, statusCookieValue(token)) {
		return true
	}
	a.statusDenied(w, r, page, "")
	return false
}

func (a *API) statusDenied(w http.ResponseWriter, r *http.Request, page bool, problem string) {
	if !a.helloRate.Allow("status/" + a.addrs.Request(r).Key()) {
		http.Error(w, "too many attempts", http.StatusTooManyRequests)
		return
	}
	w.Header().Set("WWW-Authenticate", `Bearer realm="claudemesh status"`)
	if !page {
		http.Error(w, "unauthorized: send Authorization: Bearer <ADMIN_TOKEN>, or log in at /status", http.StatusUnauthorized)
		return
	}
	pageHeaders(w.Header(), "self")
	w.WriteHeader(http.StatusUnauthorized)
	_ = loginTemplate.Execute(w, problem)
}

// serveStatusLogin trades the token, posted by the login form, for the
// cookie, and sends the browser back to the page.
func (a *API) serveStatusLogin(w http.ResponseWriter, r *http.Request) {
	token := a.cfg.AdminToken
	if token == "" {
		http.NotFound(w, r)
		return
	}
	body, err := readBody(r, statusLoginBody)
	if err != nil {
		http.Error(w, "login form too large or unreadable", http.StatusBadRequest)
		return
	}
	form, err := url.ParseQuery(string(body))
	if err != nil || !secretEqual(form.Get("token"), token) {
		a.statusDenied(w, r, true, "That is not the ADMIN_TOKEN.")
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: statusCookie, Value: statusCookieValue(token), Path: "/",
		MaxAge: int(statusCookieAge / time.Second), HttpOnly: true, Secure: isHTTPS(r),
		SameSite: http.SameSiteLaxMode,
	})
	// A path of this server, never a host: no open redirect.
	http.Redirect(w, r, "/status", http.StatusSeeOther)
}

// secretEqual compares in constant time, whatever the lengths.
func secretEqual(got, want string) bool {
	a, b := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// statusCookieValue is derived from the token, so a leaked cookie does not
// reveal it; every node computes the same value.
func statusCookieValue(token string) string {
	m := hmac.New(sha256.New, []byte(token))
	_, _ = io.WriteString(m, "claudemesh status cookie v1")
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func isHTTPS(r *http.Request) bool {
	return r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
}

// statusReport gathers the report; a part that fails (Postgres down, a node
// not answering) is reported, not fatal.
func (a *API) statusReport(ctx context.Context) StatusReport {
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	rep := StatusReport{
		GeneratedAt: time.Now().UTC(), Node: a.node.Name(), Version: Version, GitSHA: a.cfg.GitSHA, DB: "up",
	}
	if rep.GitSHA == "" {
		rep.GitSHA = "unknown"
	}
	if !a.node.DBHealthy() {
		rep.DB = "down"
	}
	var mu sync.Mutex
	fail := func(what string, err error) {
		mu.Lock()
		rep.Errors = append(rep.Errors, what+": "+err.Error())
		mu.Unlock()
	}
	var wg sync.WaitGroup
	wg.Go(func() { rep.Nodes = a.statusNodes(ctx, fail) })
	wg.Go(func() {
		if n, err := a.store.QueueDepth(ctx); err != nil {
			fail("queue depth", err)
		} else {
			rep.QueueDepth = &n
		}
	})
	wg.Go(func() { rep.Rejections = a.statusRejections(ctx, fail) })
	rep.Meshes, rep.MeshesNotShown, rep.OnlinePeers = a.statusMeshes(ctx, fail)
	wg.Wait()
	for _, n := range rep.Nodes {
		if n.Healthy() {
			rep.HealthyNodes++
		}
	}
	sort.Strings(rep.Errors)
	return rep
}

// statusNodes lists the gossip members and the nodes registered in
// Postgres that gossip does not show (crashed, or cut off from this
// node), each with its /health answer.
func (a *API) statusNodes(ctx context.Context, fail func(string, error)) []StatusNode {
	var nodes []StatusNode
	seen := map[string]bool{}
	for _, m := range a.cluster.Members() {
		seen[m.Name] = true
		nodes = append(nodes, StatusNode{Name: m.Name, GossipAddr: m.Addr, HTTPAddr: m.HTTPAddr, State: m.State, Self: m.Self})
	}
	registered, err := a.store.RecentNodes(ctx, statusRegistered)
	if err != nil {
		fail("registered nodes", err)
	}
	for _, n := range registered {
		if !seen[n.Name] {
			seen[n.Name] = true
			nodes = append(nodes, StatusNode{Name: n.Name, GossipAddr: n.GossipAddr, HTTPAddr: n.HTTPAddr, State: "not in gossip"})
		}
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
	var wg sync.WaitGroup
	for i := range nodes {
		n := &nodes[i]
		if n.Self || n.Name == a.node.Name() {
			h := a.selfHealth()
			n.Health = &h
			continue
		}
		wg.Go(func() { n.Health, n.HealthErr = probeHealth(ctx, healthURL(n.HTTPAddr, n.GossipAddr)) })
	}
	wg.Wait()
	return nodes
}

// healthURL is where another node answers /health. A node listening on
// every interface advertises a wildcard address: its gossip host is the
// one that reaches it.
func healthURL(httpAddr, gossipAddr string) string {
	host, port, err := net.SplitHostPort(httpAddr)
	if err != nil {
		return ""
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		if host, _, err = net.SplitHostPort(gossipAddr); err != nil {
			return ""
		}
	}
	return "http://" + net.JoinHostPort(host, port) + "/health"
}

func probeHealth(ctx context.Context, url string) (*Health, string) {
	if url == "" {
		return nil, "no address to probe"
	}
	ctx, cancel := context.WithTimeout(ctx, statusProbe)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err.Error()
	}
	resp, err := statusProbeClient.Do(req)
	if err != nil {
		return nil, err.Error()
	}
	defer resp.Body.Close()
	var h Health
	// /health answers 503 with the same body while Postgres is away.
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&h); err != nil || h.Status == "" {
		return nil, "unexpected answer: " + resp.Status
	}
	return &h, ""
}

// statusMeshes lists the meshes with live sessions, most populated first.
func (a *API) statusMeshes(ctx context.Context, fail func(string, error)) (meshes []StatusMesh, notShown, online int) {
	type meshLive struct {
		id   string
		live []presence.Entry
	}
	var all []meshLive
	for _, id := range a.replica.Meshes() {
		if live := a.replica.Live(id); len(live) > 0 {
			all = append(all, meshLive{id, live})
			online += len(live)
		}
	}
	sort.Slice(all, func(i, j int) bool {
		if len(all[i].live) != len(all[j].live) {
			return len(all[i].live) > len(all[j].live)
		}
		return all[i].id < all[j].id
	})
	if len(all) > statusMaxMeshes {
		notShown = len(all) - statusMaxMeshes
		all = all[:statusMaxMeshes]
	}
	meshes = make([]StatusMesh, len(all))
	for i, ml := range all {
		sm := StatusMesh{ID: ml.id, Online: len(ml.live)}
		live := ml.live
		if len(live) > statusMaxPeers {
			sm.PeersNotShown = len(live) - statusMaxPeers
			live = live[:statusMaxPeers]
		}
		for _, e := range live {
			sm.Peers = append(sm.Peers, StatusPeer{
				DisplayName: e.DisplayName, MemberID: e.MemberID, Pubkey: e.Pubkey, SessionID: e.SessionID,
				Status: e.Status, StatusSource: e.StatusSource, StatusSince: time.UnixMilli(e.StatusUpdatedAt).UTC(),
				Summary: e.Summary, Groups: e.Groups, Node: e.Owner, Hostname: e.Hostname, Cwd: e.Cwd,
				ConnectedAt: time.UnixMilli(e.ConnectedAt).UTC(),
			})
		}
		meshes[i] = sm
	}
	// Names come from Postgres, one query per mesh: a few at a time, so a
	// node far from the primary still answers within statusTimeout.
	var g errgroup.Group
	g.SetLimit(statusNameQueries)
	for i := range meshes {
		g.Go(func() error {
			mesh, err := a.store.GetMesh(ctx, meshes[i].ID)
			if err != nil {
				return err
			}
			meshes[i].Name, meshes[i].Slug = mesh.Name, mesh.Slug
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		fail("mesh names", err)
	}
	return meshes, notShown, online
}

func (a *API) statusRejections(ctx context.Context, fail func(string, error)) StatusRejections {
	rej := StatusRejections{ByReason: []ReasonCount{}, Recent: []RecentRejection{}}
	mfs, err := a.gatherer.Gather()
	if err != nil {
		fail("metrics", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "broker_connections_rejected_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" {
					v := m.GetCounter().GetValue()
					rej.ByReason = append(rej.ByReason, ReasonCount{Reason: l.GetValue(), Count: v})
					rej.Total += v
				}
			}
		}
	}
	sort.Slice(rej.ByReason, func(i, j int) bool {
		if rej.ByReason[i].Count != rej.ByReason[j].Count {
			return rej.ByReason[i].Count > rej.ByReason[j].Count
		}
		return rej.ByReason[i].Reason < rej.ByReason[j].Reason
	})
	events, err := a.store.ListAudit(ctx, "", store.EventHelloRejected, statusRejections)
	if err != nil {
		fail("recent rejections", err)
	}
	for _, e := range events {
		reason, _ := e.Metadata["reason"].(string)
		remote, _ := e.Metadata["remote"].(string)
		rej.Recent = append(rej.Recent, RecentRejection{At: e.CreatedAt.UTC(), Reason: reason, Remote: remote, MeshID: e.MeshID, Pubkey: e.Actor})
	}
	return rej
}

// Badge colours; the browser test looks for them in the screenshot.
const (
	colourOK    = "#1a7f37"
	colourWarn  = "#9a6700"
	colourBad   = "#cf222e"
	colourMuted = "#6e7781"
)

var statusTemplate = template.Must(template.New("status").Funcs(template.FuncMap{
	"ago": func(t time.Time) string {
		d := time.Since(t)
		switch {
		case t.IsZero() || t.Unix() <= 0:
			return "–"
		case d < time.Minute:
			return d.Round(time.Second).String()
		case d < time.Hour:
			return d.Round(time.Minute).String()
		}
		return d.Round(time.Hour).String()
	},
	"uptime": func(sec float64) string { return time.Duration(sec * float64(time.Second)).Round(time.Second).String() },
	"short": func(s string) string {
		if len(s) <= 12 {
			return s
		}
		return s[:12] + "…"
	},
	"clip": func(n int, s string) string {
		if r := []rune(s); len(r) > n {
			return string(r[:n]) + "…"
		}
		return s
	},
	"ts": func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") },
	"statusClass": func(status string) string {
		switch status {
		case "idle":
			return "ok"
		case "working":
			return "warn"
		case "dnd":
			return "bad"
		}
		return "muted"
	},
	"nodeClass": func(n StatusNode) string {
		switch {
		case n.Healthy():
			return "ok"
		case n.State == "not in gossip" || n.Health == nil:
			return "bad"
		}
		return "warn"
	},
	"join": strings.Join,
}).Parse(statusHTML))

const statusHTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>claudemesh status · {{.Node}}</title>
<style>
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:14px 24px;display:flex;flex-wrap:wrap;gap:8px 24px;align-items:baseline}
header h1{font-size:18px;margin:0}
header span{color:#d0d7de;font-size:13px}
main{padding:16px 24px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:8px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 16px;min-width:170px}
.card b{display:block;font-size:24px}
.card small{color:` + colourMuted + `}
h2{font-size:16px;margin:20px 0 8px}
h3{font-size:14px;margin:14px 0 6px}
h3 small{color:` + colourMuted + `;font-weight:normal}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.wrap{max-width:360px;overflow-wrap:anywhere}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-size:12px;font-weight:600;white-space:nowrap}
.ok{background:` + colourOK + `}
.warn{background:` + colourWarn + `}
.bad{background:` + colourBad + `}
.muted{background:` + colourMuted + `}
.errors{background:#ffebe9;border:1px solid ` + colourBad + `;border-radius:6px;padding:8px 12px}
.cols{display:flex;flex-wrap:wrap;gap:16px}
.cols>div{flex:1 1 360px}
footer{padding:8px 24px 24px;color:` + colourMuted + `;font-size:12px}
</style>
</head>
<body>
<header>
<h1>claudemesh broker · cluster status</h1>
<span>served by <b id="served-by">{{.Node}}</b></span>
<span>version {{.Version}} ({{.GitSHA}})</span>
<span>Postgres <span class="badge {{if eq .DB "up"}}ok{{else}}bad{{end}}">{{.DB}}</span></span>
<span>{{ts .GeneratedAt}}</span>
</header>
<main>
{{with .Errors}}<div class="errors" id="errors"><b>Some parts could not be loaded:</b><ul>{{range .}}<li>{{.}}</li>{{end}}</ul></div>{{end}}
<div class="cards">
<div class="card"><small>healthy nodes</small><b id="healthy-nodes">{{.HealthyNodes}} / {{len .Nodes}}</b></div>
<div class="card"><small>online peers</small><b id="online-peers">{{.OnlinePeers}}</b></div>
<div class="card"><small>queue depth</small><b id="queue-depth">{{with .QueueDepth}}{{.}}{{else}}unknown{{end}}</b></div>
<div class="card"><small>rejected hellos (this node)</small><b id="rejected-total">{{printf "%.0f" .Rejections.Total}}</b></div>
</div>

<h2>Nodes</h2>
<table id="nodes">
<tr><th>node</th><th>gossip</th><th>health</th><th>Postgres</th><th>sessions</th><th>version</th><th>uptime</th><th>gossip address</th><th>HTTP address</th></tr>
{{range .Nodes}}<tr>
<td><b>{{.Name}}</b>{{if .Self}} <small>(this node)</small>{{end}}</td>
<td><span class="badge {{nodeClass .}}">{{.State}}</span></td>
{{with .Health}}<td><span class="badge {{if eq .Status "ok"}}ok{{else}}warn{{end}}">{{.Status}}</span></td><td>{{.DB}}</td><td>{{.Sessions}}</td><td>{{.Version}} <code>{{short .GitSHA}}</code></td><td>{{uptime .Uptime}}</td>
{{else}}<td><span class="badge bad">no answer</span></td><td colspan="4" class="wrap"><small>{{.HealthErr}}</small></td>{{end}}
<td><code>{{.GossipAddr}}</code></td><td><code>{{.HTTPAddr}}</code></td>
</tr>{{end}}
</table>

<h2>Meshes with online peers</h2>
{{range .Meshes}}
<h3 class="mesh">{{if .Name}}{{.Name}}{{else}}(unnamed){{end}} <small>{{.Slug}} · <code>{{.ID}}</code> · {{.Online}} online</small></h3>
<table class="peers">
<tr><th>peer</th><th>status</th><th>source</th><th>since</th><th>summary</th><th>groups</th><th>node</th><th>host</th><th>connected</th></tr>
{{range .Peers}}<tr>
<td class="wrap" title="{{.Pubkey}}"><b>{{.DisplayName}}</b> <code>{{short .Pubkey}}</code></td>
<td><span class="badge {{statusClass .Status}}">{{.Status}}</span></td>
<td>{{.StatusSource}}</td>
<td>{{ago .StatusSince}}</td>
<td class="wrap">{{clip 160 .Summary}}</td>
<td>{{join .Groups ", "}}</td>
<td>{{.Node}}</td>
<td class="wrap" title="{{.Cwd}}">{{.Hostname}}</td>
<td>{{ago .ConnectedAt}}</td>
</tr>{{end}}
{{if .PeersNotShown}}<tr><td colspan="9"><small>… and {{.PeersNotShown}} more</small></td></tr>{{end}}
</table>
{{else}}<p>No peer is online.</p>{{end}}
{{if .MeshesNotShown}}<p><small>… and {{.MeshesNotShown}} more meshes with fewer peers</small></p>{{end}}

<h2>Rejected hellos</h2>
<div class="cols">
<div>
<h3>By reason, on this node since it started</h3>
<table id="rejections-by-reason">
<tr><th>reason</th><th>count</th></tr>
{{range .Rejections.ByReason}}<tr><td>{{.Reason}}</td><td>{{printf "%.0f" .Count}}</td></tr>{{end}}
</table>
</div>
<div>
<h3>Most recent, cluster-wide</h3>
<table id="recent-rejections">
<tr><th>time</th><th>reason</th><th>remote address</th><th>mesh</th><th>pubkey</th></tr>
{{range .Rejections.Recent}}<tr><td>{{ts .At}}</td><td><span class="badge bad">{{.Reason}}</span></td><td><code>{{.Remote}}</code></td><td><code>{{short .MeshID}}</code></td><td><code>{{short .Pubkey}}</code></td></tr>
{{else}}<tr><td colspan="5">none</td></tr>{{end}}
</table>
</div>
</div>
</main>
<footer>Refreshes every 5 seconds · the same report as JSON: <a href="/status.json">/status.json</a></footer>
</body>
</html>
`

// loginTemplate is the status page's form for a browser without the
// cookie; its data is a problem to show (or "").
var loginTemplate = template.Must(template.New("login").Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>claudemesh broker · status login</title>
<style>
body{margin:0;font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:14px 24px}
h1{font-size:18px;margin:0}
main{padding:24px;max-width:420px}
input{font:inherit;padding:6px 8px;width:100%;box-sizing:border-box;margin:6px 0 12px}
button{font:inherit;padding:6px 16px}
.problem{color:#cf222e}
</style>
</head>
<body>
<header><h1>claudemesh broker · cluster status</h1></header>
<main>
<form method="post" action="/status/login">
<label for="token">Admin token (<code>ADMIN_TOKEN</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
{{with .}}<p class="problem">{{.}}</p>{{end}}
<button type="submit">Open the status page</button>
</form>
<p><small>Scripts send <code>Authorization: Bearer &lt;ADMIN_TOKEN&gt;</code> to <code>/status.json</code>.</small></p>
</main>
</body>
</html>
`))
