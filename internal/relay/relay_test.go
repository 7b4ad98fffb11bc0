package relay_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/protocol"
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
		at, w, skipped, err := relay.Decode(p)
		if err != nil || skipped != 0 || !at.Equal(now) {
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
		_, wakes, _, err := relay.Decode(p)
		if err != nil {
			return
		}
		for _, w := range wakes {
			if protocol.CheckText(w.MeshID, protocol.MaxIDLen) != nil || w.MeshID == "" {
				t.Fatalf("accepted mesh id %q", w.MeshID)
			}
			for _, m := range w.Members {
				if protocol.CheckText(m, protocol.MaxIDLen) != nil || m == "" {
					t.Fatalf("accepted member id %q", m)
				}
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
		_, wakes, _, err := relay.Decode(p)
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
	key := testKey(t)
	head := prefix + "9223372036854775807" + " " + fmt.Sprint(created.UnixMicro())
	payload := head + " " + key.Seal(head, suffix) + suffix
	if !relay.IsEnvelope(payload) || relay.IsEnvelope("v1 1\nm\t*") {
		t.Fatal("IsEnvelope")
	}
	at, got, err := relay.DecodeEnvelope(payload, key)
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
	sealed := func(head, body string) string { return head + " " + key.Seal(head, "\n"+body) + "\n" + body }
	for _, bad := range []string{"e2 1 2 3", "e2 1 2\n{}", sealed("e2 1 x 3", "{}"), sealed("e2 1 2 3", "{"),
		sealed("e2 1 0 3", suffix[1:]), sealed("e2 1 2 3", `{"n":"a"}`), "e2 1 2 3 zz\n{}", payload + strings.Repeat(" ", 8000)} {
		if _, _, err := relay.DecodeEnvelope(bad, key); err == nil {
			t.Errorf("DecodeEnvelope(%q) accepted", bad)
		}
	}
}

func testKey(t testing.TB) *relay.EnvelopeKey {
	t.Helper()
	k, err := relay.NewEnvelopeKey([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// An envelope is pushed only if its seal matches: a payload changed
// anywhere (the message id, the commit time, the recipient, the text), one
// sealed with another key, or with no seal at all, is refused as forged.
func TestEnvelopeSeal(t *testing.T) {
	key := testKey(t)
	other, _ := relay.NewEnvelopeKey(relay.DeriveEnvelopeKey("another cluster's secret"))
	prefix := relay.EnvelopePrefix(time.UnixMicro(1764480000123456))
	suffix, _ := relay.EnvelopeSuffix(prefix, &relay.Envelope{Node: "n#1", Presence: "p", Conn: "c", MeshID: "m",
		MemberID: "r", Priority: 1, SenderName: "alice", Ciphertext: "Y2lwaGVy"})
	head := prefix + "42 1764480000120001"
	good := head + " " + key.Seal(head, suffix) + suffix
	if _, e, err := relay.DecodeEnvelope(good, key); err != nil || e.MessageID != 42 {
		t.Fatalf("a sealed envelope: %+v %v", e, err)
	}
	for name, p := range map[string]string{
		"other message id":  strings.Replace(good, " 42 ", " 43 ", 1),
		"other commit time": strings.Replace(good, "120001", "120002", 1),
		"other recipient":   strings.Replace(good, `"r":"r"`, `"r":"s"`, 1),
		"other text":        strings.Replace(good, "Y2lwaGVy", "Zm9yZ2Vk", 1),
		"other key":         head + " " + other.Seal(head, suffix) + suffix,
		"no seal":           head + " " + suffix,
		"e1 format":         strings.Replace(prefix, "e2", "e1", 1) + "42 1764480000120001" + suffix,
	} {
		if _, _, err := relay.DecodeEnvelope(p, key); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, _, err := relay.DecodeEnvelope(head+" "+other.Seal(head, suffix)+suffix, key); !errors.Is(err, relay.ErrBadSeal) {
		t.Errorf("another key's seal: %v, want ErrBadSeal", err)
	}
}

// Postgres computes the seal with sha256() from the key's pads: that is
// HMAC-SHA256 with the key.
func TestEnvelopeKeyPads(t *testing.T) {
	for _, secret := range [][]byte{[]byte("0123456789abcdef0123456789abcdef"), bytes.Repeat([]byte{7}, 100)} {
		k, err := relay.NewEnvelopeKey(secret)
		if err != nil {
			t.Fatal(err)
		}
		inner, outer := k.Pads()
		msg := "e2 1 2 3 " + strings.Repeat("ab", 32)
		in := sha256.Sum256(append(append([]byte(nil), inner...), msg...))
		out := sha256.Sum256(append(append([]byte(nil), outer...), in[:]...))
		m := hmac.New(sha256.New, secret)
		m.Write([]byte(msg))
		if !hmac.Equal(out[:], m.Sum(nil)) {
			t.Fatalf("pads of a %d-byte key do not give HMAC-SHA256", len(secret))
		}
	}
	if _, err := relay.NewEnvelopeKey([]byte("short")); err == nil {
		t.Fatal("a short key accepted")
	}
}

// A bad line of a wake-up costs only itself; ids are bounded and clean.
func TestDecodeSkipsBadLines(t *testing.T) {
	long := strings.Repeat("x", protocol.MaxIDLen+1)
	p := "v1 1764480000000000\nm1\ta,b\n\tx\nm2\t*\nnotab\nm3\ta,,b\nm4\t" + long + "\n" + long + "\t*\nm5\ta\x00\nm6\t"
	_, wakes, skipped, err := relay.Decode(p)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, w := range wakes {
		got = append(got, fmt.Sprintf("%s:%v:%s", w.MeshID, w.All, strings.Join(w.Members, ",")))
	}
	if strings.Join(got, " ") != "m1:false:a,b m2:true: m6:false:" || skipped != 6 {
		t.Fatalf("wakes %v, skipped %d", got, skipped)
	}
	if _, _, _, err := relay.Decode("v1 1\nm\t" + strings.Repeat("a,", 4001)); err == nil {
		t.Fatal("a payload longer than Postgres allows accepted")
	}
}

func FuzzDecodeEnvelope(f *testing.F) {
	key := testKey(f)
	body := "\n{\"n\":\"a#1\",\"p\":\"p\",\"c\":\"c\",\"m\":\"m\",\"r\":\"r\",\"pr\":1}"
	head := "e2 1764480000000000 42 1764480000000000"
	f.Add(head + " " + key.Seal(head, body) + body)
	f.Add("e1 1764480000000000 42 1764480000000000" + body)
	f.Add("e2 1 2 3 00\n{}")
	f.Add("e2 x")
	f.Add("")
	f.Fuzz(func(t *testing.T, p string) {
		_, e, err := relay.DecodeEnvelope(p, key)
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

// The Notifier and Notifications share one encoder: the same wake-ups make
// the same notifications (but for the send time).
func TestNotifierBatchesAsNotifications(t *testing.T) {
	var got []string
	sent := make(chan struct{}, 8)
	n := relay.NewNotifier(func(_ context.Context, channels, payloads []string) error {
		for i := range channels {
			got = append(got, channels[i]+"|"+stripTime(payloads[i]))
		}
		sent <- struct{}{}
		return nil
	}, slog.New(slog.DiscardHandler), nil)
	// Queued before Start: sent once it runs.
	n.Notify("m1", []string{"b", "a"})
	n.Notify("m1", []string{"b"})
	n.Notify("m2", nil)
	n.Notify("m3", []string{"z"})
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sent:
	case <-time.After(5 * time.Second):
		t.Fatal("nothing sent")
	}
	n.Stop(context.Background())
	ch, pl := relay.Notifications(time.Now(), map[string][]string{"m1": {"a", "b"}, "m2": nil, "m3": {"z"}})
	var want []string
	for i := range ch {
		want = append(want, ch[i]+"|"+stripTime(pl[i]))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("Notifier sent\n%s\nNotifications makes\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func stripTime(payload string) string {
	_, rest, _ := strings.Cut(payload, "\n")
	return rest
}

// An envelope completed in Go (the twin of the insert statement's SQL)
// decodes, sealed, with its id and commit time.
func TestCompleteEnvelope(t *testing.T) {
	key, _ := relay.NewEnvelopeKey(bytes.Repeat([]byte{7}, 32))
	sent := time.UnixMicro(1764480000000001)
	p, ok := relay.NewPending("cm_node_x", relay.EnvelopePrefix(sent), &relay.Envelope{Node: "n#1", Presence: "p", Conn: "c",
		MeshID: "m", MemberID: "r", Priority: 1, SenderName: "Zoë <&>", Ciphertext: "x"})
	if !ok {
		t.Fatal("does not fit")
	}
	created := time.UnixMicro(1764480000000777)
	at, e, err := relay.DecodeEnvelope(relay.CompleteEnvelope(p, 42, created, key), key)
	if err != nil || !at.Equal(sent) || e.MessageID != 42 || !e.CreatedAt.Equal(created) || e.SenderName != "Zoë <&>" {
		t.Fatalf("decoded %v %+v %v", at, e, err)
	}
	if _, _, err := relay.DecodeEnvelope(relay.CompleteEnvelope(p, 42, created, nil), key); err == nil {
		t.Fatal("an unsealed envelope decoded")
	}
}
