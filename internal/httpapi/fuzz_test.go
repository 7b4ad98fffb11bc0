package httpapi_test

import (
	"testing"

	"github.com/claudemesh/broker/internal/httpapi"
	"github.com/claudemesh/broker/internal/protocol"
)

// Hook body parsing never panics and accepts only complete, bounded bodies.
func FuzzParseHook(f *testing.F) {
	for _, s := range []string{`{"cwd":"/x","pid":3,"status":"idle"}`, `{"cwd":"/x","status":"working","session_id":"s"}`,
		`{"cwd":"","status":"idle"}`, `{"cwd":"/x","pid":-1,"status":"dnd"}`, `{"cwd":1}`, `[]`, `{`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		h, err := httpapi.ParseHook(body)
		if err != nil {
			return
		}
		if h.Cwd == "" || len(h.Cwd) > protocol.MaxCwdLen || !protocol.ValidStatus(h.Status) || (h.PID != nil && *h.PID < 0) {
			t.Fatalf("accepted hook %+v", h)
		}
	})
}
