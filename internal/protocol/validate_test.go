package protocol_test

import (
	"errors"
	"regexp"
	"strings"
	"testing"

	"github.com/claudemesh/broker/internal/protocol"
)

func TestCheckText(t *testing.T) {
	cases := []struct {
		in   string
		max  int
		want error // nil, ErrNUL, ErrInvalidUTF8, or errLong for a length error
	}{
		{"plain", 10, nil},
		{"", 10, nil},
		{"héllo", 0, nil},
		{"a\x00b", 0, protocol.ErrNUL},
		{"\xff\xfe", 0, protocol.ErrInvalidUTF8},
		{"abcdef", 5, errLong},
		{"abcde", 5, nil},
	}
	for _, c := range cases {
		err := protocol.CheckText(c.in, c.max)
		switch {
		case c.want == nil && err != nil:
			t.Errorf("CheckText(%q, %d) = %v, want nil", c.in, c.max, err)
		case c.want == errLong && err == nil:
			t.Errorf("CheckText(%q, %d) = nil, want a length error", c.in, c.max)
		case c.want != nil && c.want != errLong && !errors.Is(err, c.want):
			t.Errorf("CheckText(%q, %d) = %v, want %v", c.in, c.max, err, c.want)
		}
	}
	var fe *protocol.FieldError
	if err := protocol.CheckField("cwd", "x\x00", 0); !errors.As(err, &fe) || fe.Field != "cwd" {
		t.Errorf("CheckField error %v does not name the field", err)
	}
}

var errLong = errors.New("long")

func TestLowerHex(t *testing.T) {
	for in, want := range map[string]string{
		"":         "",
		"ABCDEF09": "abcdef09",
		"aBcDeF":   "abcdef",
		"GHXYZ-É":  "GHXYZ-É", // only A-F
	} {
		if got := protocol.LowerHex(in); got != want {
			t.Errorf("LowerHex(%q) = %q, want %q", in, got, want)
		}
	}
}

// The hex checks agree with the regular expressions they replaced.
func FuzzHexChecks(f *testing.F) {
	pub := regexp.MustCompile(`^[0-9a-fA-F]{64}$`)
	sig := regexp.MustCompile(`^[0-9a-fA-F]{128}$`)
	for _, s := range []string{"", strings.Repeat("a", 64), strings.Repeat("F", 64), strings.Repeat("0", 128), strings.Repeat("g", 64), strings.Repeat("a", 63) + "\n", strings.Repeat("é", 32)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		cands := []string{s}
		for _, n := range []int{64, 128} { // also s cut or padded to the lengths that matter
			c := s
			if len(c) < n {
				c += strings.Repeat("a", n-len(c))
			}
			cands = append(cands, c[:n])
		}
		for _, c := range cands {
			if protocol.IsPubkeyHex(c) != pub.MatchString(c) || protocol.IsSignatureHex(c) != sig.MatchString(c) {
				t.Fatalf("%q: IsPubkeyHex %v, IsSignatureHex %v", c, protocol.IsPubkeyHex(c), protocol.IsSignatureHex(c))
			}
		}
	})
}
