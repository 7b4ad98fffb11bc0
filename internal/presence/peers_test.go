package presence_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/presence"
	"github.com/claudemesh/broker/internal/protocol"
)

func peerEntries(n, text int) []presence.Entry {
	out := make([]presence.Entry, n)
	for i := range out {
		out[i] = presence.Entry{
			PresenceID: fmt.Sprint("p", i), Owner: "node-a", MeshID: "mesh", MemberID: fmt.Sprint("m", i),
			Pubkey: strings.Repeat("a", 64), DisplayName: fmt.Sprint("peer ", i), SessionID: fmt.Sprint("s", i),
			Status: protocol.StatusIdle, StatusSource: protocol.SourceJSONL,
			Cwd: strings.Repeat("c", text), Summary: strings.Repeat("<", text), Hostname: strings.Repeat("h", text),
			Groups: []string{"g1", "g2", "g3"},
		}
	}
	return out
}

func decodePeers(t *testing.T, frame []byte) protocol.PeersList {
	t.Helper()
	var pl protocol.PeersList
	if err := json.Unmarshal(frame, &pl); err != nil {
		t.Fatalf("peers_list is not JSON: %v", err)
	}
	if pl.Type != protocol.TypePeersList {
		t.Fatalf("type %q", pl.Type)
	}
	return pl
}

// A list that fits is rendered in full, with the _reqId echoed.
func TestEncodePeersListFits(t *testing.T) {
	entries := peerEntries(3, 10)
	frame, how := presence.EncodePeersList(`r"1`, entries, 1<<20)
	if how != "" {
		t.Fatalf("how %q for a list that fits", how)
	}
	pl := decodePeers(t, frame)
	if pl.ReqID != `r"1` || len(pl.Peers) != 3 {
		t.Fatalf("_reqId %q, %d peers", pl.ReqID, len(pl.Peers))
	}
	for i, p := range pl.Peers {
		want := entries[i].Peer()
		if p.Cwd != want.Cwd || p.Summary != want.Summary || p.Hostname != want.Hostname || len(p.Groups) != 3 {
			t.Fatalf("peer %d shortened: %+v", i, p)
		}
	}
	// Without a request id there is no _reqId.
	frame, _ = presence.EncodePeersList("", entries[:1], 1<<20)
	if strings.Contains(string(frame), "_reqId") {
		t.Fatalf("frame without a request id: %s", frame)
	}
	// No peers: an empty list.
	frame, how = presence.EncodePeersList("", nil, 1<<20)
	if string(frame) != `{"type":"peers_list","peers":[]}` || how != "" {
		t.Fatalf("empty list: %s (%q)", frame, how)
	}
}

// Over the limit, every peer is still listed, shortened in order (cwd,
// summary, hostname, then groups), and the frame fits.
func TestEncodePeersListTrimmed(t *testing.T) {
	const limit = 8 << 10
	entries := peerEntries(10, 2000)
	frame, how := presence.EncodePeersList("r", entries, limit)
	if how != "trimmed" {
		t.Fatalf("how %q, want trimmed", how)
	}
	if len(frame) > limit {
		t.Fatalf("frame of %d bytes over %d", len(frame), limit)
	}
	pl := decodePeers(t, frame)
	if len(pl.Peers) != len(entries) {
		t.Fatalf("%d peers of %d", len(pl.Peers), len(entries))
	}
	for i, p := range pl.Peers {
		if p.PresenceID != entries[i].PresenceID || p.Pubkey != entries[i].Pubkey {
			t.Fatalf("peer %d lost its identity: %+v", i, p)
		}
		if len(p.Cwd) >= 2000 || (p.Summary != "" && p.Cwd != "") {
			t.Fatalf("peer %d: cwd %d bytes, summary %d: cwd is shortened first", i, len(p.Cwd), len(p.Summary))
		}
	}
	// A share that leaves room for one group drops all free text and the
	// other groups, from the last.
	tight := peerEntries(4, 300)
	bare := tight[0]
	bare.Cwd, bare.Summary, bare.Hostname, bare.Groups = "", "", "", nil
	minimal, _ := presence.Marshal(bare.Peer())
	share := len(minimal) + len(`"g1"`)
	tightLimit := len(`{"type":"peers_list","peers":[`) + len("]}") + len(tight) - 1 + len(tight)*share
	frame, how = presence.EncodePeersList("", tight, tightLimit)
	pl = decodePeers(t, frame)
	if how != "trimmed" || len(pl.Peers) != 4 || len(frame) > tightLimit {
		t.Fatalf("how %q, %d peers, %d bytes", how, len(pl.Peers), len(frame))
	}
	for i, p := range pl.Peers {
		if p.Cwd != "" || p.Summary != "" || p.Hostname != "" || len(p.Groups) != 1 {
			t.Fatalf("peer %d not shortened to fit a tight share: %+v", i, p)
		}
		if p.Groups[0] != "g1" {
			t.Fatalf("peer %d kept groups %v: the last go first", i, p.Groups)
		}
	}
}

// When even minimal peers do not fit, the list is cut but stays valid.
func TestEncodePeersListCut(t *testing.T) {
	const limit = 2 << 10
	frame, how := presence.EncodePeersList("r", peerEntries(50, 100), limit)
	if how != "cut" {
		t.Fatalf("how %q, want cut", how)
	}
	if len(frame) > limit {
		t.Fatalf("frame of %d bytes over %d", len(frame), limit)
	}
	pl := decodePeers(t, frame)
	if len(pl.Peers) == 0 || len(pl.Peers) >= 50 {
		t.Fatalf("%d peers of 50 in a cut list", len(pl.Peers))
	}
}
