package httpapi

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/protocol"
	"github.com/claudemesh/broker/internal/store"
)

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

// check refuses what Postgres or the protocol would: a NUL, invalid UTF-8
// or an oversized field (a display name with a NUL failed the insert and
// answered 503 instead of 400).
func (req *JoinRequest) check() error {
	for _, f := range []struct {
		name, v string
		max     int
	}{
		{"invite_token", req.InviteToken, 8192},
		{"peer_pubkey", req.PeerPubkey, 128},
		{"display_name", req.DisplayName, protocol.MaxDisplayName},
		{"signature", req.Signature, 256},
	} {
		if err := protocol.CheckField(f.name, f.v, f.max); err != nil {
			return err
		}
	}
	return nil
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

func (a *API) serveJoin(w http.ResponseWriter, r *http.Request) {
	addr := a.addrs.Request(r)
	body, err := readBody(r, a.cfg.MaxMessageBytes)
	if errors.Is(err, errTooLarge) {
		joinError(w, http.StatusRequestEntityTooLarge, "too_large", "body too large")
		return
	}
	var req JoinRequest
	if err != nil || protocol.Decode(body, &req) != nil {
		joinError(w, http.StatusBadRequest, "malformed", "body must be JSON {invite_token, peer_pubkey, display_name, signature}")
		return
	}
	if err := req.check(); err != nil {
		joinError(w, http.StatusBadRequest, "malformed", err.Error())
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
	if !a.helloRate.Allow("join/" + addr.Key()) {
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
	case errors.Is(err, auth.ErrJoinUnproven) && a.cfg.RequireJoinProof():
		joinError(w, http.StatusUnauthorized, "proof_required",
			"sign the join with the key being enrolled (signature over join|meshId|inviteId|peer_pubkey|display_name); this broker does not accept unsigned joins (JOIN_REQUIRE_PROOF)")
		return
	case err != nil && !errors.Is(err, auth.ErrJoinUnproven):
		joinError(w, http.StatusUnauthorized, "bad_proof", "the join's signature is not by peer_pubkey over this invite and display_name")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	mesh, err := a.store.GetMesh(ctx, inv.MeshID)
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
	row, err := a.store.InviteByToken(ctx, auth.InviteTokenKey(req.InviteToken))
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
	if code, msg := inviteUnusable(row, a.node.Now()); code != "" {
		joinError(w, http.StatusGone, code, msg)
		return
	}
	m, already, err := a.store.RedeemInvite(ctx, row, req.PeerPubkey, req.DisplayName)
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
		a.audit.Add(store.AuditEvent{MeshID: m.MeshID, Type: store.EventInviteUsed, Actor: m.ID, Target: row.ID})
		a.audit.Add(store.AuditEvent{MeshID: m.MeshID, Type: store.EventMemberJoined, Actor: m.ID,
			Metadata: map[string]any{"display_name": m.DisplayName, "role": m.Role, "remote": addr.String(),
				"proven": req.Signature != ""}})
		a.members.Invalidate(m.MeshID)
	}
	a.logger.Info("join", "remote", addr.String(), "mesh_id", m.MeshID, "member_id", m.ID, "already_member", already, "proven", req.Signature != "")
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
