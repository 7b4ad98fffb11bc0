package testkit_test

import (
	"testing"

	"github.com/claudemesh/broker/internal/testkit"
)

func TestDuplicateKey(t *testing.T) {
	for line, want := range map[string]string{
		`{"a":1,"b":{"a":2},"c":[{"x":1},{"x":2}]}`: "",
		`{"a":1,"a":2}`:                     "a",
		`{"g":{"k":1,"k":2}}`:               "k",
		`{"l":[{"x":1,"y":{"z":1,"z":2}}]}`: "z",
	} {
		got, err := testkit.DuplicateKey([]byte(line))
		if err != nil || got != want {
			t.Errorf("DuplicateKey(%s) = %q, %v; want %q", line, got, err, want)
		}
	}
	if _, err := testkit.DuplicateKey([]byte(`{"a":`)); err == nil {
		t.Error("a cut line parsed")
	}
}

// The test logger fails the test on a line that repeats a key: the check
// runs on a fake testing.TB to see it fail.
func TestLoggerRefusesDuplicateKeys(t *testing.T) {
	rec := &recorder{TB: t}
	log := testkit.Logger(rec)
	log.With("mesh_id", "m").Info("fine", "presence_id", "p")
	if rec.failed {
		t.Fatalf("a clean line failed: %s", rec.msg)
	}
	log.With("mesh_id", "m").Info("ws close", "mesh_id", "m")
	if !rec.failed {
		t.Fatal("a line repeating mesh_id passed")
	}
}

type recorder struct {
	testing.TB
	failed bool
	msg    string
}

func (r *recorder) Errorf(format string, args ...any) {
	r.failed = true
	r.msg = format
}
