package bench

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/broker/internal/e2e"
	"github.com/claudemesh/broker/internal/protocol"
)

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i))
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{0, 1}, {1, 1}, {50, 50}, {95, 95}, {99, 99}, {99.9, 100}, {100, 100}, {150, 100}} {
		if got := Percentile(s, c.p); got != c.want {
			t.Errorf("p%v of 1..100 = %d, want %d", c.p, got, c.want)
		}
	}
	// 1000 samples: p99.9 is the 999th, not rounded up to the maximum.
	s = s[:0]
	for i := 1; i <= 1000; i++ {
		s = append(s, time.Duration(i))
	}
	if got := Percentile(s, 99.9); got != 999 {
		t.Errorf("p99.9 of 1..1000 = %d, want 999", got)
	}
	if got := Percentile([]time.Duration{7}, 50); got != 7 {
		t.Errorf("single sample: %d", got)
	}
	if got := Percentile(nil, 50); got != 0 {
		t.Errorf("empty: %d", got)
	}
}

func TestSummarize(t *testing.T) {
	// Unsorted input, in milliseconds: 10 samples 1..10.
	s := []time.Duration{7, 3, 10, 1, 5, 9, 2, 8, 4, 6}
	for i := range s {
		s[i] *= time.Millisecond
	}
	l := Summarize(s)
	want := Latency{Count: 10, MinMs: 1, MeanMs: 5.5, P50Ms: 5, P95Ms: 10, P99Ms: 10, P999Ms: 10, MaxMs: 10}
	if l != want {
		t.Errorf("got %+v, want %+v", l, want)
	}
	if !slices.IsSorted(s) {
		t.Error("samples not sorted in place")
	}
	if (Summarize(nil) != Latency{}) {
		t.Error("empty summary not zero")
	}
}

func keys(t *testing.T, n int) []ed25519.PrivateKey {
	t.Helper()
	out := make([]ed25519.PrivateKey, n)
	for i := range out {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = priv
	}
	return out
}

// nonceOf returns the nonce of prepared message i.
func nonceOf(t *testing.T, w *workload, i int32) string {
	t.Helper()
	for n, j := range w.byNonce {
		if j == i {
			return n
		}
	}
	t.Fatalf("no nonce for message %d", i)
	return ""
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestLedgerDirect(t *testing.T) {
	w, err := prepare(plan{keys: keys(t, 3), perPeer: 2, size: 64, seed: 7})
	if err != nil {
		t.Fatal(err)
	}
	if w.messages() != 6 || w.fanout() != 1 {
		t.Fatalf("%d messages, fanout %d", w.messages(), w.fanout())
	}
	l := newLedger(w)
	l.begin()
	for i := range int32(6) {
		l.markSent(i, l.now())
	}
	// Message 0: ack after its push (the push may win the race).
	n0 := nonceOf(t, w, 0)
	if got := l.push(int(w.target[0]), n0, w.ciphertext[0], l.now()); got != pushFirst {
		t.Errorf("first push: %v", got)
	}
	first := l.pushAt[0].Load()
	if got := l.push(int(w.target[0]), n0, w.ciphertext[0], first+int64(5*time.Millisecond)); got != pushDuplicate {
		t.Errorf("second push: %v", got)
	}
	l.ack("0", l.now(), true, "")
	l.ack("0", l.now(), true, "") // a second ack is stray
	// Message 1: pushed to the wrong peer, with a changed ciphertext, and
	// an envelope that is not ours.
	n1 := nonceOf(t, w, 1)
	wrong := (int(w.target[1]) + 1) % 3
	if wrong == int(w.sender[1]) {
		wrong = (wrong + 1) % 3
	}
	if got := l.push(wrong, n1, w.ciphertext[1], l.now()); got != pushMisrouted {
		t.Errorf("misrouted: %v", got)
	}
	if got := l.push(int(w.target[1]), n1, w.ciphertext[1]+"x", l.now()); got != pushCorrupted {
		t.Errorf("corrupted: %v", got)
	}
	if got := l.push(0, "not-a-nonce", "c", l.now()); got != pushUnknown {
		t.Errorf("unknown: %v", got)
	}
	l.ack("1", l.now(), true, "")
	// Message 2 rejected, message 3 never acked nor pushed, 4 and 5 fine.
	l.ack("2", l.now(), false, protocol.CodeRateLimited)
	for _, i := range []int32{4, 5} {
		l.ack(strconv.Itoa(int(i)), l.now(), true, "")
		l.push(int(w.target[i]), nonceOf(t, w, i), w.ciphertext[i], l.now())
	}
	l.ack("99", l.now(), true, "")  // unknown id
	l.ack("abc", l.now(), true, "") // not an id
	if closed(l.Done()) {
		t.Fatal("done before messages 1 and 3 were settled")
	}
	l.markUnsent(3) // pretend message 3 never left
	if closed(l.Done()) {
		t.Fatal("done while message 1's push is outstanding")
	}
	l.push(int(w.target[1]), n1, w.ciphertext[1], l.now())
	if !closed(l.Done()) {
		t.Fatal("not done once everything is settled")
	}

	d := l.delivery()
	want := Delivery{Messages: 6, Sent: 6, Unsent: 1, Acked: 4, Rejected: map[string]int64{protocol.CodeRateLimited: 1},
		NotAcked: 1, Expected: 6, Delivered: 4, DeliveredPct: float64(4) / float64(6) * 100, Duplicates: 1, Missing: 2,
		Unknown: 1, Misrouted: 1, Corrupted: 1, StrayAcks: 3, ErrorFrames: map[string]int64{}, Disconnects: map[string]int64{}}
	if !reflect.DeepEqual(d, want) {
		t.Errorf("delivery\n got %+v\nwant %+v", d, want)
	}
	lat := l.latencies(2)
	if !slices.Equal(lat.dupAfter, []time.Duration{5 * time.Millisecond}) {
		t.Errorf("duplicate delays %v, want [5ms]", lat.dupAfter)
	}
	wantSame := 0
	for _, i := range []int32{0, 1, 4, 5} {
		if w.sender[i]%2 == w.target[i]%2 {
			wantSame++
		}
	}
	if len(lat.sameNode) != wantSame || len(lat.crossNode) != 4-wantSame {
		t.Errorf("node split: %d same, %d cross; want %d same", len(lat.sameNode), len(lat.crossNode), wantSame)
	}
	if lat1 := l.latencies(1); lat1.sameNode != nil || lat1.crossNode != nil {
		t.Error("one node split by node")
	}
	if len(lat.sendToAck) != 4 || len(lat.sendToPush) != 4 || lat.sendLag != nil {
		t.Errorf("samples: %d acks, %d pushes, %d lags", len(lat.sendToAck), len(lat.sendToPush), len(lat.sendLag))
	}
	for _, s := range append(lat.sendToAck, lat.sendToPush...) {
		if s <= 0 {
			t.Errorf("non-positive latency %v", s)
		}
	}
	if lat.firstSend <= 0 || lat.lastPush < lat.firstSend {
		t.Errorf("first send %d, last push %d", lat.firstSend, lat.lastPush)
	}
}

func TestLedgerBroadcastScheduled(t *testing.T) {
	meshKey := e2e.GenerateMeshKey()
	w, err := prepare(plan{keys: keys(t, 4), broadcast: true, meshKey: meshKey, rate: 4, duration: 2 * time.Second, size: 32, seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	if w.messages() != 8 || w.fanout() != 3 || !w.scheduled {
		t.Fatalf("%d messages, fanout %d, scheduled %v", w.messages(), w.fanout(), w.scheduled)
	}
	for i := range w.intended {
		if want := int64(i) * int64(250*time.Millisecond); w.intended[i] != want || w.sender[i] != int32(i%4) {
			t.Errorf("message %d: due %v from peer %d", i, time.Duration(w.intended[i]), w.sender[i])
		}
	}
	l := newLedger(w)
	l.begin()
	for i := range int32(8) {
		l.markSent(i, l.intendedAt(i)+int64(time.Millisecond))
		l.ack(strconv.Itoa(int(i)), l.intendedAt(i)+int64(2*time.Millisecond), true, "")
		n := nonceOf(t, w, i)
		for r := range 4 {
			got := l.push(r, n, w.ciphertext[i], l.intendedAt(i)+int64(3*time.Millisecond))
			if r == int(w.sender[i]) && got != pushMisrouted {
				t.Errorf("a broadcast pushed back to its sender: %v", got)
			} else if r != int(w.sender[i]) && got != pushFirst {
				t.Errorf("message %d to %d: %v", i, r, got)
			}
		}
	}
	if !closed(l.Done()) {
		t.Fatal("not done")
	}
	d := l.delivery()
	if d.Expected != 24 || d.Delivered != 24 || d.Missing != 0 || d.Misrouted != 8 {
		t.Errorf("delivery %+v", d)
	}
	// Latencies count from the intended send time.
	lat := l.latencies(4) // every peer on its own node
	if len(lat.sendToPush) != 24 || len(lat.sendLag) != 8 || len(lat.crossNode) != 24 || len(lat.sameNode) != 0 {
		t.Fatalf("samples: %d pushes, %d lags", len(lat.sendToPush), len(lat.sendLag))
	}
	for _, s := range lat.sendToPush {
		if s != 3*time.Millisecond {
			t.Errorf("send→push %v, want 3ms", s)
		}
	}
	for _, s := range lat.sendLag {
		if s != time.Millisecond {
			t.Errorf("send lag %v, want 1ms", s)
		}
	}
}

// The prepared envelopes are real: each opens with the recipient's key
// (crypto_box) or the mesh key (crypto_secretbox), carries a plaintext of
// the requested size naming its message, and sits in a well-formed send
// frame addressed to its recipient.
func TestPrepareEnvelopes(t *testing.T) {
	ks := keys(t, 4)
	w, err := prepare(plan{keys: ks, perPeer: 5, size: 300, seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	for i := range int32(w.messages()) {
		s, r := w.sender[i], w.target[i]
		if s == r || s != i/5 {
			t.Fatalf("message %d: %d → %d", i, s, r)
		}
		send, err := protocol.DecodeSend(w.frames[i])
		if err != nil {
			t.Fatal(err)
		}
		if send.ID != strconv.Itoa(int(i)) || send.TargetSpec != hex.EncodeToString(ks[r].Public().(ed25519.PublicKey)) || w.byNonce[send.Nonce] != i || w.ciphertext[i] != send.Ciphertext {
			t.Fatalf("frame %d: %+v", i, send)
		}
		pt, err := e2e.OpenDirect(send.Nonce, send.Ciphertext, ks[s].Public().(ed25519.PublicKey), ks[r])
		if err != nil {
			t.Fatalf("message %d does not open for its recipient: %v", i, err)
		}
		if len(pt) != 300 || !bytes.HasPrefix(pt, []byte("meshbench from=")) {
			t.Fatalf("plaintext %q", pt)
		}
	}

	meshKey := e2e.GenerateMeshKey()
	w, err = prepare(plan{keys: ks, broadcast: true, meshKey: meshKey, perPeer: 2, size: 16, seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	for i := range int32(w.messages()) {
		send, err := protocol.DecodeSend(w.frames[i])
		if err != nil || send.TargetSpec != "*" {
			t.Fatalf("frame %d: %+v %v", i, send, err)
		}
		if pt, err := e2e.OpenGroup(send.Nonce, send.Ciphertext, meshKey); err != nil || len(pt) != 16 {
			t.Fatalf("broadcast %d: %q %v", i, pt, err)
		}
	}

	if _, err := prepare(plan{keys: ks[:1], perPeer: 1, size: 1}); err == nil {
		t.Error("one peer accepted")
	}
	if _, err := prepare(plan{keys: ks, broadcast: true, perPeer: 1, size: 1}); err == nil {
		t.Error("broadcast without a mesh key accepted")
	}
}

func TestParseUsage(t *testing.T) {
	rss, err := vmRSS([]byte("Name:\tbroker\nVmPeak:\t  900 kB\nVmRSS:\t  12345 kB\nThreads: 9\n"))
	if err != nil || rss != 12345*1024 {
		t.Errorf("VmRSS: %d %v", rss, err)
	}
	if _, err := vmRSS([]byte("Name:\tzombie\n")); err == nil {
		t.Error("missing VmRSS accepted")
	}
	// A command name with spaces and parentheses; utime 250, stime 50 ticks.
	cpu, ppid, err := parseStat([]byte("4242 (post (gres) x) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 1 0 100 0 0\n"))
	if err != nil || cpu != 3 || ppid != 17 {
		t.Errorf("stat: cpu %v ppid %d %v", cpu, ppid, err)
	}
	if _, _, err := parseStat([]byte("4242 (x) S 1")); err == nil {
		t.Error("short stat accepted")
	}
	self, err := procProbe{pid: os.Getpid()}.read(context.Background())
	if err != nil || self.rss <= 0 || self.fds <= 0 {
		t.Errorf("own process: %+v %v", self, err)
	}
	u, err := parseProcessMetrics(strings.NewReader("# HELP process_open_fds x\n# TYPE process_open_fds gauge\n" +
		"process_open_fds 42\nprocess_resident_memory_bytes 1.2345678e+07\nprocess_max_fds 1024\nprocess_cpu_seconds_total 3.25\n"))
	if err != nil || u.fds != 42 || u.rss != 12345678 || u.cpu != 3.25 {
		t.Errorf("metrics: %+v %v", u, err)
	}
	if _, err := parseProcessMetrics(strings.NewReader("go_goroutines 3\n")); err == nil {
		t.Error("metrics without process gauges accepted")
	}
	for in, want := range map[string]string{
		"ws://127.0.0.1:7900/ws":           "http://127.0.0.1:7900/metrics",
		"wss://broker.example/ws?x=1#frag": "https://broker.example/metrics",
	} {
		if got, err := metricsURL(in); err != nil || got != want {
			t.Errorf("metricsURL(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := metricsURL("http://x/ws"); err == nil {
		t.Error("http URL accepted")
	}
}
