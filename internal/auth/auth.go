// Package auth signs and verifies the signed artefacts of claudemesh: the
// WebSocket hello, hook requests, mesh invites, and the joiner's proof that
// it holds the key it enrols. All signatures are
// ed25519 (libsodium crypto_sign_detached), hex encoded.
package auth

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"filippo.io/edwards25519"

	"github.com/claudemesh/broker/internal/protocol"
)

// strongPoint reports whether b is the canonical encoding of a curve point
// outside the small-order subgroup. libsodium's crypto_sign_verify_detached
// requires this of the public key and of R; Go's ed25519.Verify does not,
// and with a small-order key anyone can forge signatures (with the
// identity as key, R = identity and S = 0 verify for every message).
func strongPoint(b []byte) bool {
	p, err := new(edwards25519.Point).SetBytes(b)
	if err != nil || !bytes.Equal(p.Bytes(), b) {
		return false
	}
	return new(edwards25519.Point).MultByCofactor(p).Equal(edwards25519.NewIdentityPoint()) == 0
}

// verify is ed25519.Verify with libsodium's checks of the key and of R.
func verify(pub, msg, sig []byte) bool {
	return len(pub) == ed25519.PublicKeySize && len(sig) == ed25519.SignatureSize &&
		strongPoint(pub) && strongPoint(sig[:32]) && ed25519.Verify(pub, msg, sig)
}

// ValidPubkey reports whether pubkeyHex (64 hex characters) is a public key
// signatures can be checked against: one that only its private key's
// holder can sign for.
func ValidPubkey(pubkeyHex string) bool {
	if !protocol.IsPubkeyHex(pubkeyHex) {
		return false
	}
	pub, _ := hex.DecodeString(pubkeyHex)
	return strongPoint(pub)
}

// VerifyHello runs handshake checks 1–3 (timestamp window, hex shapes,
// signature) in protocol order and returns the rejection reason, or "" when
// the hello passes. Shape check 0 is protocol.DecodeHello's.
func VerifyHello(h *protocol.Hello, now time.Time) string {
	ts, err := h.TimestampMillis()
	if err != nil {
		return protocol.ReasonMalformed
	}
	skew := now.UnixMilli() - ts
	if skew > protocol.HelloSkew.Milliseconds() || skew < -protocol.HelloSkew.Milliseconds() {
		return protocol.ReasonTimestampSkew
	}
	if !protocol.IsPubkeyHex(h.Pubkey) || !protocol.IsSignatureHex(h.Signature) {
		return protocol.ReasonMalformed
	}
	pub, _ := hex.DecodeString(h.Pubkey)
	sig, _ := hex.DecodeString(h.Signature)
	msg := protocol.CanonicalHello(h.MeshID, h.MemberID, h.Pubkey, ts)
	if !verify(pub, []byte(msg), sig) {
		return protocol.ReasonBadSignature
	}
	return ""
}

// SignHello returns the hex signature of a hello.
func SignHello(priv ed25519.PrivateKey, meshID, memberID, pubkeyHex string, timestampMillis int64) string {
	msg := protocol.CanonicalHello(meshID, memberID, pubkeyHex, timestampMillis)
	return hex.EncodeToString(ed25519.Sign(priv, []byte(msg)))
}

// SignatureHash is the replay-protection key of an accepted signature.
func SignatureHash(sigHex string) []byte {
	sum := sha256.Sum256([]byte(strings.ToLower(sigHex)))
	return sum[:]
}

// Hook request headers.
const (
	HeaderMeshID    = "X-Mesh-Id"
	HeaderPubkey    = "X-Mesh-Pubkey"
	HeaderTimestamp = "X-Mesh-Timestamp"
	HeaderSignature = "X-Mesh-Signature"
)

// Hook verification failures.
var (
	ErrHookUnsigned  = errors.New("hook is not signed")
	ErrHookMalformed = errors.New("hook signature headers are malformed")
	ErrHookSkew      = errors.New("hook timestamp outside ±60s")
	ErrHookSignature = errors.New("hook signature does not verify")
)

// HookCanonical is what a hook signature covers:
// "hook|meshId|pubkey|timestamp|sha256hex(body)".
func HookCanonical(meshID, pubkeyHex string, timestampMillis int64, body []byte) string {
	sum := sha256.Sum256(body)
	return "hook|" + meshID + "|" + pubkeyHex + "|" + strconv.FormatInt(timestampMillis, 10) + "|" + hex.EncodeToString(sum[:])
}

// SignHook sets the signature headers of a hook request for body.
func SignHook(h http.Header, priv ed25519.PrivateKey, meshID string, body []byte, now time.Time) {
	pub := hex.EncodeToString(priv.Public().(ed25519.PublicKey))
	ts := now.UnixMilli()
	h.Set(HeaderMeshID, meshID)
	h.Set(HeaderPubkey, pub)
	h.Set(HeaderTimestamp, strconv.FormatInt(ts, 10))
	h.Set(HeaderSignature, hex.EncodeToString(ed25519.Sign(priv, []byte(HookCanonical(meshID, pub, ts, body)))))
}

// HookSigned reports whether the request carries any signature header.
func HookSigned(h http.Header) bool {
	return h.Get(HeaderSignature) != "" || h.Get(HeaderPubkey) != "" || h.Get(HeaderMeshID) != ""
}

// VerifyHook checks a hook's signature headers and returns the signer's
// mesh id and lowercase pubkey. It does not check membership.
func VerifyHook(h http.Header, body []byte, now time.Time) (meshID, pubkey string, err error) {
	meshID, pubkey = h.Get(HeaderMeshID), strings.ToLower(h.Get(HeaderPubkey))
	tsText, sigHex := h.Get(HeaderTimestamp), h.Get(HeaderSignature)
	if meshID == "" && pubkey == "" && tsText == "" && sigHex == "" {
		return "", "", ErrHookUnsigned
	}
	ts, err := strconv.ParseInt(tsText, 10, 64)
	// Header values may hold any byte but NUL: a mesh id that is not UTF-8
	// would fail the membership lookup in Postgres, not the signature.
	if err != nil || meshID == "" || protocol.CheckText(meshID, protocol.MaxIDLen) != nil ||
		!protocol.IsPubkeyHex(pubkey) || !protocol.IsSignatureHex(sigHex) {
		return "", "", ErrHookMalformed
	}
	if d := now.UnixMilli() - ts; d > protocol.HelloSkew.Milliseconds() || d < -protocol.HelloSkew.Milliseconds() {
		return "", "", ErrHookSkew
	}
	pub, _ := hex.DecodeString(pubkey)
	sig, _ := hex.DecodeString(sigHex)
	if !verify(pub, []byte(HookCanonical(meshID, pubkey, ts, body)), sig) {
		return "", "", ErrHookSignature
	}
	return meshID, pubkey, nil
}

// HookReplayKey is the replay-protection key of a signed hook: the
// signature is its one-time id (it covers the timestamp and the body). The
// prefix keeps it apart from hello signatures in the same table.
func HookReplayKey(sigHex string) []byte {
	sum := sha256.Sum256([]byte("hook|" + strings.ToLower(sigHex)))
	return sum[:]
}

// Join proof failures.
var (
	ErrJoinUnproven = errors.New("join is not signed by the key it enrols")
	ErrJoinProof    = errors.New("join signature does not verify")
)

// JoinCanonical is what a join proof covers:
// "join|meshId|inviteId|pubkey|displayName". The display name is last, so a
// "|" in it cannot shift the other fields.
func JoinCanonical(meshID, inviteID, pubkeyHex, displayName string) string {
	return "join|" + meshID + "|" + inviteID + "|" + strings.ToLower(pubkeyHex) + "|" + displayName
}

// SignJoin proves that the joiner holds the key it enrols through inv
// under displayName (exactly as sent in the body).
func SignJoin(priv ed25519.PrivateKey, inv *Invite, displayName string) string {
	return hex.EncodeToString(ed25519.Sign(priv, []byte(JoinCanonical(inv.MeshID, inv.InviteID, PubkeyHex(priv), displayName))))
}

// VerifyJoin checks a join proof: sigHex by pubkeyHex over the invite and
// the display name. An empty signature is ErrJoinUnproven.
func VerifyJoin(pubkeyHex, sigHex string, inv *Invite, displayName string) error {
	if sigHex == "" {
		return ErrJoinUnproven
	}
	if !protocol.IsPubkeyHex(pubkeyHex) || !protocol.IsSignatureHex(sigHex) {
		return ErrJoinProof
	}
	pub, _ := hex.DecodeString(pubkeyHex)
	sig, _ := hex.DecodeString(sigHex)
	if !verify(pub, []byte(JoinCanonical(inv.MeshID, inv.InviteID, pubkeyHex, displayName)), sig) {
		return ErrJoinProof
	}
	return nil
}

// InvitePrefix starts every invite token.
const InvitePrefix = "cm1."

// Invite is the signed content of an invite token. The owner signs
// Canonical(); the token is InvitePrefix + base64url(JSON of Invite).
type Invite struct {
	V           int    `json:"v"`
	InviteID    string `json:"invite_id"`
	MeshID      string `json:"mesh_id"`
	MeshSlug    string `json:"mesh_slug"`
	MeshName    string `json:"mesh_name"`
	BrokerURL   string `json:"broker_url"`
	ExpiresAt   int64  `json:"expires_at"` // unix milliseconds
	RootKey     string `json:"mesh_root_key,omitempty"`
	Role        string `json:"role"`
	OwnerPubkey string `json:"owner_pubkey"`
	Signature   string `json:"signature"`
}

// Invite failures.
var (
	ErrInviteMalformed    = errors.New("invite token is malformed")
	ErrInviteBadSignature = errors.New("invite signature does not verify")
)

// Canonical is the byte string the owner signs.
func (inv *Invite) Canonical() string {
	return strings.Join([]string{strconv.Itoa(inv.V), inv.InviteID, inv.MeshID, inv.MeshSlug, inv.MeshName,
		inv.BrokerURL, strconv.FormatInt(inv.ExpiresAt, 10), inv.RootKey, inv.Role, inv.OwnerPubkey}, "|")
}

// Sign fills OwnerPubkey and Signature.
func (inv *Invite) Sign(owner ed25519.PrivateKey) {
	inv.OwnerPubkey = hex.EncodeToString(owner.Public().(ed25519.PublicKey))
	inv.Signature = hex.EncodeToString(ed25519.Sign(owner, []byte(inv.Canonical())))
}

// Verify checks the signature against the embedded owner key. Callers must
// also check that OwnerPubkey is the mesh's owner.
func (inv *Invite) Verify() error {
	if !protocol.IsPubkeyHex(inv.OwnerPubkey) || !protocol.IsSignatureHex(inv.Signature) {
		return ErrInviteMalformed
	}
	pub, _ := hex.DecodeString(inv.OwnerPubkey)
	sig, _ := hex.DecodeString(inv.Signature)
	if !verify(pub, []byte(inv.Canonical()), sig) {
		return ErrInviteBadSignature
	}
	return nil
}

// Expires is ExpiresAt as a time.
func (inv *Invite) Expires() time.Time { return time.UnixMilli(inv.ExpiresAt) }

// Token encodes the invite.
func (inv *Invite) Token() string {
	b, _ := json.Marshal(inv)
	return InvitePrefix + base64.RawURLEncoding.EncodeToString(b)
}

// normalizeToken strips whitespace and any link prefix from a token.
func normalizeToken(token string) string {
	token = strings.TrimSpace(token)
	if i := strings.LastIndex(token, "/"); i >= 0 {
		token = token[i+1:]
	}
	return token
}

// InviteTokenKey is what the broker stores to find an invite: the SHA-256
// of the token, so the invite table holds no usable tokens.
func InviteTokenKey(token string) string {
	sum := sha256.Sum256([]byte(normalizeToken(token)))
	return hex.EncodeToString(sum[:])
}

// ParseInvite decodes a token (or a link ending in one, such as
// "claudemesh://join/<token>"). It does not verify the signature.
func ParseInvite(token string) (*Invite, error) {
	token = normalizeToken(token)
	if !strings.HasPrefix(token, InvitePrefix) || len(token) > 8192 {
		return nil, ErrInviteMalformed
	}
	raw, err := base64.RawURLEncoding.DecodeString(token[len(InvitePrefix):])
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInviteMalformed, err)
	}
	var inv Invite
	if err := json.Unmarshal(raw, &inv); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInviteMalformed, err)
	}
	if inv.V != 1 || inv.MeshID == "" || inv.InviteID == "" {
		return nil, ErrInviteMalformed
	}
	if inv.Role != "admin" && inv.Role != "member" {
		return nil, fmt.Errorf("%w: role must be admin or member", ErrInviteMalformed)
	}
	for _, f := range [][2]string{{"invite_id", inv.InviteID}, {"mesh_id", inv.MeshID}, {"mesh_slug", inv.MeshSlug},
		{"mesh_name", inv.MeshName}, {"broker_url", inv.BrokerURL}, {"mesh_root_key", inv.RootKey},
		{"owner_pubkey", inv.OwnerPubkey}, {"signature", inv.Signature}} {
		if err := protocol.CheckField(f[0], f[1], 0); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInviteMalformed, err)
		}
	}
	return &inv, nil
}

// PubkeyHex renders a key's public half as 64 lowercase hex characters.
func PubkeyHex(priv ed25519.PrivateKey) string {
	return hex.EncodeToString(priv.Public().(ed25519.PublicKey))
}
