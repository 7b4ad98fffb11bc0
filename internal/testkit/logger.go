package testkit

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
)

// Logger returns a logger for tests that renders every record as the
// broker does (JSON) and fails t on a line that repeats a key: parsers
// keep one of the two values, so the other is lost to the operator. It is
// silent unless BROKER_TEST_LOG=1 (then lines go to stderr too).
func Logger(t testing.TB) *slog.Logger {
	w := &checkWriter{t: t}
	if os.Getenv("BROKER_TEST_LOG") != "" {
		w.also = os.Stderr
	}
	// After the test, a late line is not checked: t may no longer be told.
	t.Cleanup(func() { w.done.Store(true) })
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// checkWriter receives one record per Write (slog's JSON handler writes a
// record at once).
type checkWriter struct {
	t    testing.TB
	also io.Writer
	mu   sync.Mutex
	done atomic.Bool
}

func (w *checkWriter) Write(p []byte) (int, error) {
	if key, err := DuplicateKey(p); !w.done.Load() {
		switch {
		case err != nil:
			w.t.Errorf("log line is not one JSON object (%v): %s", err, p)
		case key != "":
			w.t.Errorf("log line repeats the key %q: %s", key, p)
		}
	}
	if w.also != nil {
		w.mu.Lock()
		defer w.mu.Unlock()
		_, _ = w.also.Write(p)
	}
	return len(p), nil
}

// DuplicateKey returns the first key that a JSON object in line repeats
// (at any depth), or "".
func DuplicateKey(line []byte) (string, error) {
	dec := json.NewDecoder(bytes.NewReader(line))
	var walk func() (string, error)
	walk = func() (string, error) {
		tok, err := dec.Token()
		if err != nil {
			return "", err
		}
		switch tok {
		case json.Delim('{'):
			seen := map[string]bool{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return "", err
				}
				key, _ := k.(string)
				if seen[key] {
					return key, nil
				}
				seen[key] = true
				if dup, err := walk(); dup != "" || err != nil {
					return dup, err
				}
			}
			_, err = dec.Token() // '}'
			return "", err
		case json.Delim('['):
			for dec.More() {
				if dup, err := walk(); dup != "" || err != nil {
					return dup, err
				}
			}
			_, err = dec.Token() // ']'
			return "", err
		}
		return "", nil
	}
	return walk()
}
