package server

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/clientaddr"
	"github.com/claudemesh/broker/internal/delivery"
	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// readBody reads at most limit bytes; errTooLarge when there is more.
func readBody(r *http.Request, limit int) ([]byte, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, int64(limit)+1))
	if err != nil {
		return nil, err
	}
	if len(body) > limit {
		return nil, errTooLarge
	}
	return body, nil
}

var errTooLarge = errors.New("body too large")

// HookRequest is the body of POST /hook/set-status.
type HookRequest struct {
	Cwd       string `json:"cwd"`
	PID       *int64 `json:"pid,omitempty"`
	Status    string `json:"status"`
	SessionID string `json:"session_id,omitempty"`
}

// HookResponse answers a hook.
type HookResponse struct {
	OK         bool   `json:"ok"`
	PresenceID string `json:"presence_id,omitempty"`
	Pending    bool   `json:"pending,omitempty"`
	Error      string `json:"error,omitempty"`
}

// ParseHook decodes and validates a hook body.
func ParseHook(body []byte) (HookRequest, error) {
	var h HookRequest
	if err := protocol.Decode(body, &h); err != nil {
		return h, err
	}
	if h.Cwd == "" || len(h.Cwd) > protocol.MaxCwdLen {
		return h, errors.New("cwd is required (at most 4096 bytes)")
	}
	if !protocol.ValidStatus(h.Status) {
		return h, errors.New("status must be idle, working or dnd")
	}
	if h.PID != nil && *h.PID < 0 {
		return h, errors.New("pid must not be negative")
	}
	if len(h.SessionID) > protocol.MaxIDLen {
		return h, errors.New("session_id too long")
	}
	return h, nil
}

// serveHook is POST /hook/set-status on the public port: signed hooks, and
// unsigned ones only when HOOK_REQUIRE_SIGNATURE=false. No address makes
// an unsigned hook trusted there: a proxy on this machine would make every
// public request look local.
func (s *Server) serveHook(w http.ResponseWriter, r *http.Request) {
	s.hook(w, r, s.clientAddr(r), !s.cfg.RequireHookSignature())
}

// serveLocalHook is POST /hook/set-status on HOOK_LOCAL_ADDR, a loopback
// listener: hooks of this machine, signed or not.
func (s *Server) serveLocalHook(w http.ResponseWriter, r *http.Request) {
	ip, ok := localPeer(r)
	if !ok {
		writeJSON(w, http.StatusForbidden, HookResponse{Error: "the local hook port takes requests from this machine only"})
		return
	}
	s.hook(w, r, clientaddr.Addr{IP: ip, Peer: ip}, true)
}

func (s *Server) hook(w http.ResponseWriter, r *http.Request, addr clientaddr.Addr, unsignedOK bool) {
	s.m.HookRequests.Inc()
	body, err := readBody(r, s.cfg.MaxMessageBytes)
	if errors.Is(err, errTooLarge) {
		writeJSON(w, http.StatusRequestEntityTooLarge, HookResponse{Error: "payload too large"})
		return
	}
	if err != nil {
		writeJSON(w, http.StatusBadRequest, HookResponse{Error: "cannot read body"})
		return
	}
	h, err := ParseHook(body)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, HookResponse{Error: err.Error()})
		return
	}
	signed := auth.HookSigned(r.Header)
	if !signed && !unsignedOK {
		writeJSON(w, http.StatusUnauthorized, HookResponse{Error: "unsigned hooks are not accepted on this port: sign it (X-Mesh-Signature), or post it to the broker's local hook address (HOOK_LOCAL_ADDR)"})
		return
	}
	// One budget per client address bounds what any hook costs before it
	// is known to be a member's: a signature check, a replica scan.
	if !s.helloRate.Allow("hook/" + addr.Key()) {
		s.m.HookRateLimited.Inc()
		writeJSON(w, http.StatusTooManyRequests, HookResponse{Error: "rate limited"})
		return
	}
	var meshID, pubkey string
	if signed {
		var status int
		if meshID, pubkey, status, err = s.verifyHook(r, body); err != nil {
			writeJSON(w, status, HookResponse{Error: err.Error()})
			return
		}
	}
	var pid int64
	if h.PID != nil {
		pid = *h.PID
	}
	target, ok := s.resolveHook(h, pid, meshID, pubkey)
	// The budget is the server's idea of who asks and about what: the
	// signer (or, unsigned, the client address) and the session the hook
	// resolves to. Neither is the client's choice, so it cannot mint
	// budgets by varying pid or cwd.
	who := "a/" + addr.Key()
	if signed {
		who = "m/" + meshID + "/" + pubkey
	}
	about := "pending"
	if ok {
		about = target.PresenceID
	}
	if !s.hookRate.Allow(who + "/" + about) {
		s.m.HookRateLimited.Inc()
		s.logger.Warn("hook rate limited", "remote", addr.String(), "cwd", h.Cwd, "pid", pid)
		writeJSON(w, http.StatusTooManyRequests, HookResponse{Error: "rate limited"})
		return
	}
	if !ok {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		err := s.store.AddPendingStatus(ctx, pid, h.Cwd, h.Status, meshID, pubkey)
		cancel()
		if err != nil {
			writeJSON(w, http.StatusServiceUnavailable, HookResponse{Error: "database unavailable"})
			return
		}
		s.logger.Info("hook", "remote", addr.String(), "cwd", h.Cwd, "pid", pid, "status", h.Status, "pending", true)
		writeJSON(w, http.StatusOK, HookResponse{OK: true, Pending: true})
		return
	}
	if target.Owner == s.node {
		s.setStatus(target.PresenceID, h.Status, protocol.SourceHook)
	} else if err := s.cluster.Send(target.Owner, presence.Command{Kind: "hook", PresenceID: target.PresenceID, Status: h.Status}); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, HookResponse{Error: "owning node unreachable: " + err.Error()})
		return
	}
	s.logger.Info("hook", "remote", addr.String(), "cwd", h.Cwd, "pid", pid, "status", h.Status, "presence_id", target.PresenceID, "owner", target.Owner)
	writeJSON(w, http.StatusOK, HookResponse{OK: true, PresenceID: target.PresenceID})
}

// errHookReplayed answers a signed hook whose signature was used before.
var errHookReplayed = errors.New("hook signature already used: sign each hook afresh")

// verifyHook checks a signed hook: the signature, the signer's membership
// and that this signature was not accepted before on any node (it is the
// hook's one-time id: it covers the timestamp and the body, and the
// timestamp window bounds how long it must be remembered). It returns the
// HTTP status to answer with on failure.
func (s *Server) verifyHook(r *http.Request, body []byte) (meshID, pubkey string, status int, err error) {
	meshID, pubkey, err = auth.VerifyHook(r.Header, body, s.now())
	if err != nil {
		return "", "", http.StatusUnauthorized, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	_, err = s.members.ByPubkey(ctx, meshID, pubkey)
	if errors.Is(err, store.ErrNotFound) {
		return "", "", http.StatusUnauthorized, errors.New("signer is not a member of the mesh")
	}
	if err != nil {
		return "", "", http.StatusServiceUnavailable, errors.New("database unavailable")
	}
	// Recorded like a hello's signature (same table and expiry); no
	// session takes a pending status through it (a hook's cwd is never
	// empty).
	res, err := s.hellos.accept(ctx, store.HelloCheck{SigHash: auth.HookReplayKey(r.Header.Get(auth.HeaderSignature))})
	if err != nil {
		return "", "", http.StatusServiceUnavailable, errors.New("database unavailable")
	}
	if !res.Fresh {
		return "", "", http.StatusUnauthorized, errHookReplayed
	}
	return meshID, pubkey, 0, nil
}

// resolveHook finds the session a hook is about: (pid, cwd) first, else the
// most recent session in that cwd; limited to the signer's sessions when
// the hook is signed.
func (s *Server) resolveHook(h HookRequest, pid int64, meshID, pubkey string) (presence.Entry, bool) {
	matches := s.replica.Find(func(e *presence.Entry) bool {
		if e.Cwd != h.Cwd || e.SendOnly {
			return false
		}
		if h.SessionID != "" && e.SessionID != h.SessionID {
			return false
		}
		if pubkey != "" && (e.MeshID != meshID || e.Pubkey != pubkey) {
			return false
		}
		return true
	})
	if len(matches) == 0 {
		return presence.Entry{}, false
	}
	sort.Slice(matches, func(i, j int) bool {
		pi, pj := matches[i].PID == pid, matches[j].PID == pid
		if pi != pj {
			return pi
		}
		return matches[i].ConnectedAt > matches[j].ConnectedAt
	})
	if pid != 0 && matches[0].PID != pid && h.SessionID == "" {
		// A pid was given and no session has it: the session may not
		// have connected yet.
		return presence.Entry{}, false
	}
	return matches[0], true
}

// JoinRequest is the body of POST /join: the original client's
// {invite_token, peer_pubkey, display_name}, plus signature, the joiner's
// proof that it holds the key it enrols (auth.SignJoin over the invite and
// display_name exactly as sent). A body without it is refused unless
// JOIN_REQUIRE_PROOF=false.
type JoinRequest struct {
	InviteToken string `json:"invite_token"`
	PeerPubkey  string `json:"peer_pubkey"`
	DisplayName string `json:"display_name"`
	Signature   string `json:"signature,omitempty"`
}

// JoinResponse answers /join.
type JoinResponse struct {
	OK            bool   `json:"ok"`
	MemberID      string `json:"memberId,omitempty"`
	MeshID        string `json:"meshId,omitempty"`
	MeshSlug      string `json:"meshSlug,omitempty"`
	MeshName      string `json:"meshName,omitempty"`
	Role          string `json:"role,omitempty"`
	AlreadyMember bool   `json:"alreadyMember,omitempty"`
	Error         string `json:"error,omitempty"`
	Message       string `json:"message,omitempty"`
}

func joinError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, JoinResponse{Error: code, Message: msg})
}

func (s *Server) serveJoin(w http.ResponseWriter, r *http.Request) {
	addr := s.clientAddr(r)
	body, err := readBody(r, s.cfg.MaxMessageBytes)
	if errors.Is(err, errTooLarge) {
		joinError(w, http.StatusRequestEntityTooLarge, "too_large", "body too large")
		return
	}
	var req JoinRequest
	if err != nil || protocol.Decode(body, &req) != nil {
		joinError(w, http.StatusBadRequest, "malformed", "body must be JSON {invite_token, peer_pubkey, display_name, signature}")
		return
	}
	req.PeerPubkey = strings.ToLower(req.PeerPubkey)
	if !auth.ValidPubkey(req.PeerPubkey) {
		// A key of small order would let anyone sign as the new member.
		joinError(w, http.StatusBadRequest, "malformed", "peer_pubkey must be an ed25519 public key as 64 hex characters")
		return
	}
	signedName := req.DisplayName
	req.DisplayName = strings.TrimSpace(req.DisplayName)
	if req.DisplayName == "" || len(req.DisplayName) > protocol.MaxDisplayName {
		joinError(w, http.StatusBadRequest, "malformed", "display_name must be 1..128 characters")
		return
	}
	if !s.helloRate.Allow("join/" + addr.Key()) {
		joinError(w, http.StatusTooManyRequests, "rate_limited", "too many joins from this address")
		return
	}
	inv, err := auth.ParseInvite(req.InviteToken)
	if err != nil {
		joinError(w, http.StatusBadRequest, "invite_malformed", err.Error())
		return
	}
	if err := inv.Verify(); err != nil {
		joinError(w, http.StatusBadRequest, "invite_bad_signature", err.Error())
		return
	}
	// Without the proof, anyone holding an invite could enrol someone
	// else's key under a name of their choosing. A proof that is there
	// but wrong is refused even when proofs are optional.
	switch err := auth.VerifyJoin(req.PeerPubkey, req.Signature, inv, signedName); {
	case errors.Is(err, auth.ErrJoinUnproven) && s.cfg.RequireJoinProof():
		joinError(w, http.StatusUnauthorized, "proof_required",
			"sign the join with the key being enrolled (signature over join|meshId|inviteId|peer_pubkey|display_name); this broker does not accept unsigned joins (JOIN_REQUIRE_PROOF)")
		return
	case err != nil && !errors.Is(err, auth.ErrJoinUnproven):
		joinError(w, http.StatusUnauthorized, "bad_proof", "the join's signature is not by peer_pubkey over this invite and display_name")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	mesh, err := s.store.GetMesh(ctx, inv.MeshID)
	if errors.Is(err, store.ErrNotFound) {
		joinError(w, http.StatusNotFound, "mesh_not_found", "the invite's mesh does not exist")
		return
	}
	if err != nil {
		joinError(w, http.StatusServiceUnavailable, "unavailable", "database unavailable")
		return
	}
	if mesh.OwnerPubkey != inv.OwnerPubkey {
		joinError(w, http.StatusBadRequest, "invite_owner_mismatch", "the invite is not signed by the mesh owner")
		return
	}
	row, err := s.store.InviteByToken(ctx, auth.InviteTokenKey(req.InviteToken))
	if errors.Is(err, store.ErrNotFound) {
		joinError(w, http.StatusNotFound, "invite_not_found", "the broker does not know this invite")
		return
	}
	if err != nil {
		joinError(w, http.StatusServiceUnavailable, "unavailable", "database unavailable")
		return
	}
	if row.MeshID != inv.MeshID {
		joinError(w, http.StatusBadRequest, "invite_mesh_mismatch", "the invite belongs to another mesh")
		return
	}
	// The invite must be usable before membership is looked at: an
	// expired, revoked or used-up invite must not tell who is a member.
	// (Redemption checks again, by compare-and-set.)
	if code, msg := inviteUnusable(row, s.now()); code != "" {
		joinError(w, http.StatusGone, code, msg)
		return
	}
	m, already, err := s.store.RedeemInvite(ctx, row, req.PeerPubkey, req.DisplayName)
	switch {
	case errors.Is(err, store.ErrInviteExpired):
		joinError(w, http.StatusGone, "invite_expired", "the invite has expired; ask for a new one")
		return
	case errors.Is(err, store.ErrInviteRevoked):
		joinError(w, http.StatusGone, "invite_revoked", "the invite was revoked")
		return
	case errors.Is(err, store.ErrInviteExhausted):
		joinError(w, http.StatusGone, "invite_exhausted", "the invite has no uses left")
		return
	case errors.Is(err, store.ErrNameTaken):
		joinError(w, http.StatusConflict, "name_taken", "another member of the mesh is called "+strconv.Quote(req.DisplayName)+"; choose another display name")
		return
	case err != nil:
		joinError(w, http.StatusServiceUnavailable, "unavailable", "database unavailable")
		return
	}
	if !already {
		s.audit.Add(store.AuditEvent{MeshID: m.MeshID, Type: store.EventInviteUsed, Actor: m.ID, Target: row.ID})
		s.audit.Add(store.AuditEvent{MeshID: m.MeshID, Type: store.EventMemberJoined, Actor: m.ID,
			Metadata: map[string]any{"display_name": m.DisplayName, "role": m.Role, "remote": addr.String(),
				"proven": req.Signature != ""}})
		s.members.Invalidate(m.MeshID)
	}
	s.logger.Info("join", "remote", addr.String(), "mesh_id", m.MeshID, "member_id", m.ID, "already_member", already, "proven", req.Signature != "")
	writeJSON(w, http.StatusOK, JoinResponse{OK: true, MemberID: m.ID, MeshID: m.MeshID, MeshSlug: mesh.Slug,
		MeshName: mesh.Name, Role: m.Role, AlreadyMember: already})
}

// inviteUnusable returns the error code and message of an invite that can
// enrol nobody at now, or "".
func inviteUnusable(row store.Invite, now time.Time) (code, msg string) {
	switch {
	case row.RevokedAt != nil:
		return "invite_revoked", "the invite was revoked"
	case !row.ExpiresAt.After(now):
		return "invite_expired", "the invite has expired; ask for a new one"
	case row.UsedCount >= row.MaxUses:
		return "invite_exhausted", "the invite has no uses left"
	}
	return "", ""
}

// Health is the body of GET /health.
type Health struct {
	Status      string  `json:"status"`
	DB          string  `json:"db"`
	Version     string  `json:"version"`
	GitSHA      string  `json:"gitSha"`
	Uptime      float64 `json:"uptime"`
	Node        string  `json:"node"`
	ClusterSize int     `json:"clusterSize"`
	Sessions    int     `json:"sessions"`
}

func (s *Server) serveHealth(w http.ResponseWriter, _ *http.Request) {
	h := Health{Status: "ok", DB: "up", Version: Version, GitSHA: s.cfg.GitSHA,
		Uptime: time.Since(s.started).Round(time.Millisecond).Seconds(), Node: s.node, ClusterSize: s.cluster.NumMembers()}
	if h.GitSHA == "" {
		h.GitSHA = "unknown"
	}
	s.mu.RLock()
	h.Sessions = len(s.byPresence)
	s.mu.RUnlock()
	status := http.StatusOK
	if !s.dbHealthy.Load() {
		h.Status, h.DB, status = "degraded", "down", http.StatusServiceUnavailable
	}
	writeJSON(w, status, h)
}

// healthLoop pings Postgres and logs transitions.
func (s *Server) healthLoop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		err := s.syncClock(ctx)
		if ctx.Err() != nil {
			return
		}
		was := s.dbHealthy.Load()
		switch {
		case err == nil && !was:
			s.dbHealthy.Store(true)
			s.m.DBHealthy.Set(1)
			s.logger.Info("db healthy")
			// Work that failed while Postgres was away may be waiting.
			s.engine.WakeAll(delivery.ReasonSweep)
		case err != nil && was:
			s.dbHealthy.Store(false)
			s.m.DBHealthy.Set(0)
			s.logger.Error("db ping failed", "err", err)
		}
	}
}

// syncClock asks Postgres for its time and records this node's offset
// from it; the error is Postgres'.
func (s *Server) syncClock(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	t0 := s.clock()
	dbNow, err := s.store.Now(cctx)
	t1 := s.clock()
	if err != nil {
		return err
	}
	s.noteClock(dbNow, t0, t1)
	return nil
}

// clockWarn is the clock offset from Postgres beyond which the node warns.
const clockWarn = 2 * time.Second

// noteClock records this node's offset from Postgres' clock, measured by a
// query sent at t0 and answered at t1 (local clock).
func (s *Server) noteClock(dbNow, t0, t1 time.Time) {
	rtt := t1.Sub(t0)
	if rtt > time.Second {
		return // too slow to measure anything useful
	}
	offset := dbNow.Sub(t0.Add(rtt / 2))
	prev := time.Duration(s.clockOffset.Swap(int64(offset)))
	s.m.ClockOffset.Set(offset.Seconds())
	if abs(offset) > clockWarn && abs(prev-offset) > clockWarn/2 {
		s.logger.Warn("node clock differs from Postgres; using Postgres time for hellos and hooks", "offset", offset.Round(time.Millisecond))
	}
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}
