package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sort"
	"time"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/clientaddr"
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
	// A NUL would reach Postgres (a pending status) and be refused there.
	if err := protocol.CheckField("cwd", h.Cwd, protocol.MaxCwdLen); err != nil {
		return h, err
	}
	if err := protocol.CheckField("session_id", h.SessionID, protocol.MaxIDLen); err != nil {
		return h, err
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
func (a *API) serveHook(w http.ResponseWriter, r *http.Request) {
	a.hook(w, r, a.addrs.Request(r), !a.cfg.RequireHookSignature())
}

// serveLocalHook is POST /hook/set-status on HOOK_LOCAL_ADDR, a loopback
// listener: hooks of this machine, signed or not.
func (a *API) serveLocalHook(w http.ResponseWriter, r *http.Request) {
	ip, ok := localPeer(r)
	if !ok {
		writeJSON(w, http.StatusForbidden, HookResponse{Error: "the local hook port takes requests from this machine only"})
		return
	}
	a.hook(w, r, clientaddr.Addr{IP: ip, Peer: ip}, true)
}

func (a *API) hook(w http.ResponseWriter, r *http.Request, addr clientaddr.Addr, unsignedOK bool) {
	a.m.HookRequests.Inc()
	body, err := readBody(r, a.cfg.MaxMessageBytes)
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
	if !a.helloRate.Allow("hook/" + addr.Key()) {
		a.m.HookRateLimited.Inc()
		writeJSON(w, http.StatusTooManyRequests, HookResponse{Error: "rate limited"})
		return
	}
	var meshID, pubkey string
	if signed {
		var status int
		if meshID, pubkey, status, err = a.verifyHook(r, body); err != nil {
			writeJSON(w, status, HookResponse{Error: err.Error()})
			return
		}
	}
	var pid int64
	if h.PID != nil {
		pid = *h.PID
	}
	target, ok := a.resolveHook(h, pid, meshID, pubkey)
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
	if !a.hookRate.Allow(who + "/" + about) {
		a.m.HookRateLimited.Inc()
		a.logger.Warn("hook rate limited", "remote", addr.String(), "cwd", h.Cwd, "pid", pid)
		writeJSON(w, http.StatusTooManyRequests, HookResponse{Error: "rate limited"})
		return
	}
	if !ok {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		err := a.store.AddPendingStatus(ctx, pid, h.Cwd, h.Status, meshID, pubkey)
		cancel()
		if err != nil {
			writeJSON(w, http.StatusServiceUnavailable, HookResponse{Error: "database unavailable"})
			return
		}
		a.logger.Info("hook", "remote", addr.String(), "cwd", h.Cwd, "pid", pid, "status", h.Status, "pending", true)
		writeJSON(w, http.StatusOK, HookResponse{OK: true, Pending: true})
		return
	}
	if target.Owner == a.node.Name() {
		a.node.SetStatus(target.PresenceID, h.Status, protocol.SourceHook)
	} else if err := a.cluster.Send(target.Owner, presence.Command{Kind: "hook", PresenceID: target.PresenceID, Status: h.Status}); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, HookResponse{Error: "owning node unreachable: " + err.Error()})
		return
	}
	a.logger.Info("hook", "remote", addr.String(), "cwd", h.Cwd, "pid", pid, "status", h.Status, "presence_id", target.PresenceID, "owner", target.Owner)
	writeJSON(w, http.StatusOK, HookResponse{OK: true, PresenceID: target.PresenceID})
}

// errHookReplayed answers a signed hook whose signature was used before.
var errHookReplayed = errors.New("hook signature already used: sign each hook afresh")

// verifyHook checks a signed hook: the signature, the signer's membership
// and that this signature was not accepted before on any node (it is the
// hook's one-time id: it covers the timestamp and the body, and the
// timestamp window bounds how long it must be remembered). It returns the
// HTTP status to answer with on failure.
func (a *API) verifyHook(r *http.Request, body []byte) (meshID, pubkey string, status int, err error) {
	meshID, pubkey, err = auth.VerifyHook(r.Header, body, a.node.Now())
	if err != nil {
		return "", "", http.StatusUnauthorized, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	_, err = a.members.ByPubkey(ctx, meshID, pubkey)
	if errors.Is(err, store.ErrNotFound) {
		return "", "", http.StatusUnauthorized, errors.New("signer is not a member of the mesh")
	}
	if err != nil {
		return "", "", http.StatusServiceUnavailable, errors.New("database unavailable")
	}
	// Recorded like a hello's signature (same table and expiry); no
	// session takes a pending status through it (a hook's cwd is never
	// empty).
	res, err := a.node.AcceptSignature(ctx, store.HelloCheck{SigHash: auth.HookReplayKey(r.Header.Get(auth.HeaderSignature))})
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
func (a *API) resolveHook(h HookRequest, pid int64, meshID, pubkey string) (presence.Entry, bool) {
	matches := a.replica.Find(func(e *presence.Entry) bool {
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
