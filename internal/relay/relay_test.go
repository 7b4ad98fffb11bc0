package relay_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/relay"
)

func TestEncodeDecode(t *testing.T) {
	now := time.UnixMicro(1764480000123456)
	members := make([]string, 400)
	for i := range members {
		members[i] = fmt.Sprintf("01m8member%016d", i)
	}
	wakes := []relay.Wake{{MeshID: "a", Members: []string{"x", "y"}}, {MeshID: "b", All: true}, {MeshID: "c", Members: members}}
	payloads := relay.Encode(now, wakes)
	var got []relay.Wake
	for _, p := range payloads {
		if len(p) > relay.MaxPayload {
			t.Fatalf("payload of %d bytes exceeds %d", len(p), relay.MaxPayload)
		}
		at, w, err := relay.Decode(p)
		if err != nil || !at.Equal(now) {
			t.Fatalf("decode: %v %v", err, at)
		}
		got = append(got, w...)
	}
	// The 400-member mesh does not fit: it degrades to a mesh-wide wake.
	if len(got) != 3 || got[0].MeshID != "a" || strings.Join(got[0].Members, ",") != "x,y" || !got[1].All || !got[2].All || got[2].MeshID != "c" {
		t.Fatalf("round trip: %+v", got)
	}
}

func TestChannelFor(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range relay.AllChannels() {
		seen[c] = true
	}
	for i := 0; i < 1000; i++ {
		if !seen[relay.ChannelFor(fmt.Sprint("mesh-", i))] {
			t.Fatal("channel outside the listened set")
		}
	}
}

// Decoding arbitrary payloads never panics.
func FuzzDecode(f *testing.F) {
	f.Add("v1 1764480000000000\nmesh\ta,b")
	f.Add("v1 1\nm\t*")
	f.Add("v2 x")
	f.Add("")
	f.Fuzz(func(t *testing.T, p string) {
		_, wakes, err := relay.Decode(p)
		if err != nil {
			return
		}
		for _, w := range wakes {
			if w.MeshID == "" {
				t.Fatalf("accepted an empty mesh id")
			}
		}
	})
}

func TestNotifications(t *testing.T) {
	now := time.UnixMicro(1764480000000000)
	ch, pl := relay.Notifications(now, map[string][]string{"m1": {"b", "a", "b"}, "m2": {"c"}})
	if len(ch) != len(pl) || len(ch) == 0 {
		t.Fatalf("channels %v payloads %v", ch, pl)
	}
	got := map[string][]string{}
	for i, p := range pl {
		_, wakes, err := relay.Decode(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range wakes {
			if relay.ChannelFor(w.MeshID) != ch[i] {
				t.Fatalf("mesh %s sent on %s", w.MeshID, ch[i])
			}
			got[w.MeshID] = w.Members
		}
	}
	if strings.Join(got["m1"], ",") != "a,b" || strings.Join(got["m2"], ",") != "c" {
		t.Fatalf("got %v (members deduplicated and sorted)", got)
	}
	if c, p := relay.Notifications(now, nil); c != nil || p != nil {
		t.Fatal("notifications for nothing")
	}
}

func TestEnvelopeRoundTrip(t *testing.T) {
	sent := time.UnixMicro(1764480000123456)
	created := time.UnixMicro(1764480000120001)
	e := relay.Envelope{Node: "n1#7", Presence: "p", Conn: "c", MeshID: "m", MemberID: "r", Priority: 1,
		SenderMemberID: "s", SenderPubkey: "ab", SenderName: "tab\there \"quoted\"\nnewline", TargetSpec: "@g",
		Nonce: "bm9uY2U=", Ciphertext: "Y2lwaGVy", ClientMessageID: "k"}
	prefix := relay.EnvelopePrefix(sent)
	suffix, ok := relay.EnvelopeSuffix(prefix, &e)
	if !ok {
		t.Fatal("a small envelope does not fit")
	}
	// What the insert statement notifies.
	payload := prefix + "9223372036854775807" + " " + fmt.Sprint(created.UnixMicro()) + suffix
	if !relay.IsEnvelope(payload) || relay.IsEnvelope("v1 1\nm\t*") {
		t.Fatal("IsEnvelope")
	}
	at, got, err := relay.DecodeEnvelope(payload)
	if err != nil {
		t.Fatal(err)
	}
	want := e
	want.MessageID, want.CreatedAt = 9223372036854775807, created
	if !at.Equal(sent) || got != want {
		t.Fatalf("round trip:\n got %+v at %v\nwant %+v at %v", got, at, want, sent)
	}

	big := e
	big.Ciphertext = strings.Repeat("x", relay.MaxPayload)
	if _, ok := relay.EnvelopeSuffix(prefix, &big); ok {
		t.Fatal("an envelope over MaxPayload fits")
	}
	for _, bad := range []string{"e1 1 2 3", "e1 1 2\n{}", "e1 1 x 3\n{}", "e1 1 2 3\n{", "e1 1 0 3\n" + suffix[1:], "e1 1 2 3\n{\"n\":\"a\"}"} {
		if _, _, err := relay.DecodeEnvelope(bad); err == nil {
			t.Errorf("DecodeEnvelope(%q) accepted", bad)
		}
	}
}

func FuzzDecodeEnvelope(f *testing.F) {
	f.Add("e1 1764480000000000 42 1764480000000000\n{\"n\":\"a#1\",\"p\":\"p\",\"c\":\"c\",\"m\":\"m\",\"r\":\"r\",\"pr\":1}")
	f.Add("e1 1 2 3\n{}")
	f.Add("e1 x")
	f.Add("")
	f.Fuzz(func(t *testing.T, p string) {
		_, e, err := relay.DecodeEnvelope(p)
		if err != nil {
			return
		}
		if e.Node == "" || e.Conn == "" || e.MeshID == "" || e.MemberID == "" || e.MessageID <= 0 {
			t.Fatalf("accepted an envelope without its keys: %+v", e)
		}
	})
}

func TestNodeChannel(t *testing.T) {
	a, b := relay.NodeChannel("node-a"), relay.NodeChannel(strings.Repeat("n", 300))
	if a == b || a != relay.NodeChannel("node-a") || len(b) > 63 || !strings.HasPrefix(a, "cm_node_") {
		t.Fatalf("NodeChannel: %q %q", a, b)
	}
	for _, c := range relay.AllChannels() {
		if c == a {
			t.Fatalf("a node channel collides with mesh channel %s", c)
		}
	}
}
