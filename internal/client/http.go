package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/sanitize"
)

// HTTPBase turns a broker WebSocket URL (ws://host:port/ws) into the base
// URL of its HTTP routes (http://host:port). http and https URLs are taken
// as they are, minus a trailing /ws.
func HTTPBase(brokerURL string) (string, error) {
	u, err := url.Parse(strings.TrimSpace(brokerURL))
	if err != nil {
		return "", fmt.Errorf("broker URL %q: %w", brokerURL, err)
	}
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	case "http", "https":
	default:
		return "", fmt.Errorf("broker URL %q must start with ws://, wss://, http:// or https://", brokerURL)
	}
	if u.Host == "" {
		return "", fmt.Errorf("broker URL %q has no host", brokerURL)
	}
	u.Path = strings.TrimSuffix(strings.TrimSuffix(u.Path, "/"), "/ws")
	u.RawQuery, u.Fragment = "", ""
	return strings.TrimSuffix(u.String(), "/"), nil
}

// maxReply bounds the HTTP replies read from a broker.
const maxReply = 1 << 20

func postJSON(ctx context.Context, hc *http.Client, endpoint string, body []byte, sign func(http.Header)) (int, []byte, error) {
	if hc == nil {
		hc = http.DefaultClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if sign != nil {
		sign(req.Header)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxReply))
	if err != nil {
		return resp.StatusCode, nil, err
	}
	return resp.StatusCode, data, nil
}

// JoinResult is the broker's answer to a successful /join.
type JoinResult struct {
	MemberID      string `json:"memberId"`
	MeshID        string `json:"meshId"`
	MeshSlug      string `json:"meshSlug"`
	MeshName      string `json:"meshName"`
	Role          string `json:"role"`
	AlreadyMember bool   `json:"alreadyMember"`
}

// JoinError is a /join the broker refused.
type JoinError struct {
	Status  int
	Code    string // invite_expired, invite_revoked, invite_exhausted, …
	Message string
}

func (e *JoinError) Error() string {
	switch e.Code {
	case "invite_expired":
		return "the invite has expired; ask the mesh owner for a new one"
	case "invite_revoked":
		return "the invite was revoked; ask the mesh owner for a new one"
	case "invite_exhausted":
		return "the invite has been used as many times as it allows; ask the mesh owner for a new one"
	case "invite_not_found":
		return "the broker does not know this invite (was it created on another broker?)"
	case "mesh_not_found":
		return "the invite's mesh no longer exists on the broker"
	case "invite_owner_mismatch", "invite_bad_signature", "invite_mesh_mismatch":
		return "the invite is not validly signed by the mesh owner (" + e.Code + "); ask for a new one"
	case "invite_malformed":
		return "the invite is malformed; copy the whole link again"
	case "name_taken":
		return "another member of the mesh already has this display name; choose another with --name (names address members, so they are unique in a mesh)"
	case "rate_limited":
		return "the broker is rate limiting joins from this address; try again in a minute"
	case "proof_required", "bad_proof":
		return "the broker did not accept this client's proof that it holds the key (" + e.Code + "): " + e.Message
	case "unavailable":
		return "the broker cannot reach its database right now; try again shortly"
	}
	if e.Message != "" {
		return fmt.Sprintf("join refused (%s): %s", sanitize.Clip(e.Code, 64), sanitize.Clip(e.Message, 200))
	}
	return fmt.Sprintf("join refused: HTTP %d %s", e.Status, sanitize.Clip(e.Code, 64))
}

// ErrInviteExpired is returned by Join, before any network traffic, for an
// invite whose expiry has passed.
var ErrInviteExpired = errors.New("the invite has expired; ask the mesh owner for a new one")

// Join enrols priv's public key in the invite's mesh through POST /join on
// the invite's broker (or on brokerURL when not empty), with the proof
// that it holds the key (auth.SignJoin). It checks the invite's signature
// and expiry first, so a tampered or stale link fails fast.
func Join(ctx context.Context, hc *http.Client, token, brokerURL string, priv ed25519.PrivateKey, displayName string, now time.Time) (*auth.Invite, *JoinResult, error) {
	inv, err := auth.ParseInvite(token)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: check that the whole invite was copied", err)
	}
	if err := inv.Verify(); err != nil {
		return nil, nil, fmt.Errorf("%w: the invite was altered or corrupted; ask for a new one", err)
	}
	if !now.Before(inv.Expires()) {
		return inv, nil, fmt.Errorf("%w (it expired %s)", ErrInviteExpired, inv.Expires().UTC().Format(time.RFC3339))
	}
	if brokerURL == "" {
		brokerURL = inv.BrokerURL
	}
	base, err := HTTPBase(brokerURL)
	if err != nil {
		return inv, nil, err
	}
	body, _ := json.Marshal(map[string]string{"invite_token": strings.TrimSpace(token), "peer_pubkey": auth.PubkeyHex(priv),
		"display_name": displayName, "signature": auth.SignJoin(priv, inv, displayName)})
	// A broker that is starting (or a node restarting behind the balancer)
	// refuses connections for a moment: try again until ctx ends.
	var status int
	var data []byte
	for attempt := 1; ; attempt++ {
		status, data, err = postJSON(ctx, hc, base+"/join", body, nil)
		if err == nil || ctx.Err() != nil || !errors.Is(err, syscall.ECONNREFUSED) {
			break
		}
		t := time.NewTimer(Backoff{Min: 200 * time.Millisecond, Max: 2 * time.Second}.Delay(attempt))
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
	if err != nil {
		return inv, nil, &JoinUnreachableError{URL: base, FromInvite: brokerURL == inv.BrokerURL, Err: err}
	}
	var reply struct {
		JoinResult
		OK      bool   `json:"ok"`
		Error   string `json:"error"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(data, &reply); err != nil {
		return inv, nil, fmt.Errorf("the broker at %s answered HTTP %d with something that is not a claudemesh reply", base, status)
	}
	if status != http.StatusOK || !reply.OK {
		return inv, nil, &JoinError{Status: status, Code: reply.Error, Message: reply.Message}
	}
	return inv, &reply.JoinResult, nil
}

// JoinUnreachableError: the broker the join went to did not answer.
type JoinUnreachableError struct {
	URL        string
	FromInvite bool // the URL came from the invite (not --broker)
	Err        error
}

func (e *JoinUnreachableError) Error() string {
	hint := "check the --broker URL"
	if e.FromInvite {
		hint = "the invite names this broker; if it runs elsewhere (another host or port, or behind a load balancer), pass its URL: claudemesh join <invite> --broker ws://host:port/ws"
	}
	return fmt.Sprintf("cannot reach the broker at %s: %v; %s (join --wait sets how long to keep trying)", e.URL, e.Err, hint)
}

func (e *JoinUnreachableError) Unwrap() error { return e.Err }

// HookStatus is the body of POST /hook/set-status.
type HookStatus struct {
	Cwd       string `json:"cwd"`
	PID       *int64 `json:"pid,omitempty"`
	Status    string `json:"status"`
	SessionID string `json:"session_id,omitempty"`
}

// HookResult is the broker's answer to a hook.
type HookResult struct {
	OK         bool   `json:"ok"`
	PresenceID string `json:"presence_id,omitempty"`
	Pending    bool   `json:"pending,omitempty"` // no session yet; applied if one connects within 10 s
	Error      string `json:"error,omitempty"`
}

// HookError is a hook the broker refused.
type HookError struct {
	Status  int
	Message string
}

func (e *HookError) Error() string {
	switch e.Status {
	case http.StatusTooManyRequests:
		return "hook rate limited by the broker"
	case http.StatusUnauthorized:
		return "hook not accepted: " + sanitize.Clip(e.Message, 200)
	}
	return fmt.Sprintf("hook refused: HTTP %d %s", e.Status, sanitize.Clip(e.Message, 200))
}

// PostHook reports a status through POST /hook/set-status, signed with the
// identity's key so the broker accepts it from any address.
func PostHook(ctx context.Context, hc *http.Client, brokerURL string, id Identity, h HookStatus) (*HookResult, error) {
	base, err := HTTPBase(brokerURL)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	status, data, err := postJSON(ctx, hc, base+"/hook/set-status", body, func(hd http.Header) {
		auth.SignHook(hd, id.Priv, id.MeshID, body, time.Now())
	})
	if err != nil {
		return nil, fmt.Errorf("cannot reach the broker at %s: %w", base, err)
	}
	var r HookResult
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, &HookError{Status: status, Message: "unexpected reply"}
	}
	if status != http.StatusOK || !r.OK {
		return nil, &HookError{Status: status, Message: r.Error}
	}
	return &r, nil
}
