package protocol_test

import (
	"errors"
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
