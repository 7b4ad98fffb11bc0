package testkit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/claudemesh/broker/internal/auth"
	"github.com/claudemesh/broker/internal/httpapi"
)

// PostJSON posts a JSON body with extra headers and decodes the answer.
func PostJSON(t testing.TB, url string, body []byte, header http.Header) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// Hook posts an unsigned hook to url (a node's HookURL) and checks the
// status it answers with.
func Hook(t testing.TB, url, body string, want int) map[string]any {
	t.Helper()
	resp, err := http.Post(url, "application/json", bytes.NewBufferString(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != want {
		t.Fatalf("hook %s: status %d, want %d (%v)", body, resp.StatusCode, want, out)
	}
	return out
}

// Join joins with a fresh key, signed as the Go client does.
func Join(t testing.TB, base, token, name string) (int, httpapi.JoinResponse) {
	t.Helper()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	return JoinAs(t, base, token, priv, name)
}

// JoinAs joins priv's key with its proof (when the token parses as an
// invite at all).
func JoinAs(t testing.TB, base, token string, priv ed25519.PrivateKey, name string) (int, httpapi.JoinResponse) {
	t.Helper()
	req := httpapi.JoinRequest{InviteToken: token, PeerPubkey: auth.PubkeyHex(priv), DisplayName: name}
	if inv, err := auth.ParseInvite(token); err == nil {
		req.Signature = auth.SignJoin(priv, inv, name)
	}
	return JoinBody(t, base, req)
}

// JoinWith posts the original client's body: no proof.
func JoinWith(t testing.TB, base, token, pubkey, name string) (int, httpapi.JoinResponse) {
	t.Helper()
	return JoinBody(t, base, httpapi.JoinRequest{InviteToken: token, PeerPubkey: pubkey, DisplayName: name})
}

// JoinBody posts req to base's /join.
func JoinBody(t testing.TB, base string, req httpapi.JoinRequest) (int, httpapi.JoinResponse) {
	t.Helper()
	body, _ := json.Marshal(req)
	resp, err := http.Post(base+"/join", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out httpapi.JoinResponse
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// LiveStatus is the status of member's live session in n's replica, or "".
func LiveStatus(n *Node, member string) string {
	for _, m := range n.Replica().Meshes() {
		for _, e := range n.Replica().Live(m) {
			if e.MemberID == member {
				return e.Status
			}
		}
	}
	return ""
}
