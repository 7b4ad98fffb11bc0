package sanitize_test

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/claudemesh/broker/internal/sanitize"
)

func TestLine(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"alice", "alice"},
		{"  alice  ", "alice"},
		{"alice\nbob: hi", "alice bob: hi"},
		{"a\r\nb\tc", "a b c"},
		{"\x1b[31mred\x1b[0m", "red"},
		{"\x1b]0;pwned title\x07name", "name"},
		{"\x1b]52;c;ZXZpbA==\x1b\\x", "x"},           // OSC 52 clipboard, ST-terminated
		{"\u009b31mred", "red"},                      // 8-bit CSI as UTF-8
		{"\u009d0;title\u009cok", "ok"},              // 8-bit OSC … ST
		{"a\x9bb", "a\ufffdb"},                       // a raw 0x9b byte is invalid UTF-8
		{"bell\x07\x08\x7fdone", "belldone"},         // BEL, BS, DEL
		{"\u202eevil\u202c \u2066x\u2069", "evil x"}, // bidi overrides and isolates
		{"al\u200bi\ufeffce", "alice"},
		{"line\u2028sep\u2029par\u0085nel", "line sep par nel"},
		{"\x1b]unterminated rest", "unterminated rest"}, // only the introducer goes
		{"\x1b7saved\x1bc", "saved"},
		{"\x1b(Bascii", "ascii"},
		{"Zoe\u0301 👩\u200d💻", "Zoe\u0301 👩\u200d💻"}, // combining marks and ZWJ emoji stay
		{"", ""},
		{"\x1b", ""},
	} {
		if got := sanitize.Line(c.in); got != c.want {
			t.Errorf("Line(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestText(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"one\ntwo", "one\ntwo"},
		{"one\r\ntwo\rthree", "one\ntwo\nthree"},
		{"tab\there", "tab\there"},
		{"\x1b[2J\x1b[Hcleared", "cleared"},
		{"a\u2028b", "a\nb"},
		{"x\x00y", "xy"},
	} {
		if got := sanitize.Text(c.in); got != c.want {
			t.Errorf("Text(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestNameAndFingerprint(t *testing.T) {
	pk := "3F9A2C81" + strings.Repeat("0", 56)
	if got := sanitize.Name("alice", pk); got != "alice (3f9a2c81)" {
		t.Errorf("Name = %q", got)
	}
	if got := sanitize.Name("\x1b[31malice\nbob", pk); got != "alice bob (3f9a2c81)" {
		t.Errorf("Name = %q", got)
	}
	if got := sanitize.Name("alice", "not-hex-at-all"); got != "alice" {
		t.Errorf("Name without a key = %q", got)
	}
	long := strings.Repeat("x", 200)
	if got := sanitize.Name(long, pk); utf8.RuneCountInString(got) != sanitize.MaxNameRunes+len(" (3f9a2c81)") || !strings.HasSuffix(got, "… (3f9a2c81)") {
		t.Errorf("long name = %q", got)
	}
	if got := sanitize.Clip("héllo wörld", 5); got != "héll…" {
		t.Errorf("Clip = %q", got)
	}
}

func TestJSON(t *testing.T) {
	v := map[string]string{"name": "a\u009b31mb\u202ec"}
	raw, _ := json.Marshal(v)
	out := sanitize.JSON(raw)
	if strings.ContainsRune(string(out), 0x9b) || strings.ContainsRune(string(out), 0x202e) {
		t.Fatalf("raw runes left: %q", out)
	}
	var back map[string]string
	if err := json.Unmarshal(out, &back); err != nil || back["name"] != v["name"] {
		t.Fatalf("round trip: %v %q", err, back)
	}
	plain := []byte(`{"a":"b"}`)
	if got := sanitize.JSON(plain); string(got) != string(plain) {
		t.Fatalf("plain changed: %q", got)
	}
}

// checkSafe asserts what every sanitized string satisfies.
func checkSafe(t *testing.T, in, out string, multiline bool) {
	t.Helper()
	if !utf8.ValidString(out) {
		t.Fatalf("%q → invalid UTF-8 %q", in, out)
	}
	for _, r := range out {
		switch {
		case r == '\n' || r == '\t':
			if !multiline {
				t.Fatalf("%q → line break or tab in a line: %q", in, out)
			}
		case r < 0x20, r == 0x7f, r >= 0x80 && r <= 0x9f:
			t.Fatalf("%q → control %U left in %q", in, r, out)
		case r == 0x2028, r == 0x2029, r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069, r == 0x200e, r == 0x200f, r == 0x061c, r == 0xfeff, r == 0x200b:
			t.Fatalf("%q → invisible %U left in %q", in, r, out)
		}
	}
	// Every output byte comes from the input, or is a replacement or a
	// line break: the output never grows past three bytes per input byte.
	if len(out) > 3*len(in) {
		t.Fatalf("%q → %q grew", in, out)
	}
}

func FuzzSanitize(f *testing.F) {
	for _, s := range []string{
		"alice", "\x1b[31mred", "\x1b]0;t\x07x", "\u009b1m", "a\r\nb", "\u202eabc", "\xff\xfe", "\x1b]52;c;" + strings.Repeat("A", 5000),
		"\x1bP1$r\x1b\\", "\x1b", "\u0085", "👩\u200d💻",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		line, text := sanitize.Line(in), sanitize.Text(in)
		checkSafe(t, in, line, false)
		checkSafe(t, in, text, true)
		if again := sanitize.Line(line); again != line {
			t.Fatalf("Line not idempotent: %q → %q → %q", in, line, again)
		}
		if again := sanitize.Text(text); again != text {
			t.Fatalf("Text not idempotent: %q → %q → %q", in, text, again)
		}
		if strings.HasPrefix(line, " ") || strings.HasSuffix(line, " ") || strings.Contains(line, "  ") {
			t.Fatalf("Line spacing: %q", line)
		}
		name := sanitize.Name(in, "0123456789abcdef")
		checkSafe(t, in+"0123456789abcdef", name, false)
		raw, _ := json.Marshal(in)
		esc := sanitize.JSON(raw)
		var back string
		if err := json.Unmarshal(esc, &back); err != nil {
			t.Fatalf("JSON(%q) does not decode: %v", raw, err)
		}
		var orig string
		_ = json.Unmarshal(raw, &orig)
		if back != orig {
			t.Fatalf("JSON changed the data: %q vs %q", back, orig)
		}
	})
}
