package protocol

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Reasons a string cannot be stored or relayed.
var (
	// ErrNUL: Postgres refuses U+0000 in text and jsonb, so one such value
	// would fail a whole batch of other users' rows.
	ErrNUL = errors.New("contains a NUL character")
	// ErrInvalidUTF8: Postgres refuses it too, and JSON would rewrite it.
	ErrInvalidUTF8 = errors.New("is not valid UTF-8")
)

// CheckText reports why s cannot be stored or relayed: a NUL, invalid UTF-8,
// or more than max bytes (max <= 0 means no length limit). Every string a
// client, a member or another node sends is checked with it where it enters.
func CheckText(s string, max int) error {
	if max > 0 && len(s) > max {
		return fmt.Errorf("longer than %d bytes", max)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return ErrNUL
	}
	if !utf8.ValidString(s) {
		return ErrInvalidUTF8
	}
	return nil
}

// CheckField is CheckText naming the field in its error.
func CheckField(field, s string, max int) error {
	if err := CheckText(s, max); err != nil {
		return fieldErr(field, err.Error())
	}
	return nil
}

// Bounds of hello fields that have no limit of their own.
const (
	MaxCapabilities  = 16
	MaxCapabilityLen = 64
	// A pubkey or signature more than twice its length is junk, not a
	// mistyped key: it is refused at the shape check (step 0), before the
	// timestamp, so that it is never verified, logged or stored. A key of a
	// merely wrong length still fails at step 2, after the timestamp, as the
	// handshake order says.
	maxPubkeyField    = 2 * 64
	maxSignatureField = 2 * 128
)

// validator is a frame that checks its decoded fields (Decode calls it).
type validator interface{ validate() error }

// validate checks every string of a hello (check 0 of the handshake).
func (h *Hello) validate() error {
	for _, f := range []struct {
		name, v  string
		max      int
		required bool
	}{
		{"_reqId", h.ReqID, MaxIDLen, false},
		{"meshId", h.MeshID, MaxIDLen, true},
		{"memberId", h.MemberID, MaxIDLen, true},
		{"sessionId", h.SessionID, MaxIDLen, true},
		{"pubkey", h.Pubkey, maxPubkeyField, false},
		{"signature", h.Signature, maxSignatureField, false},
		{"cwd", h.Cwd, MaxCwdLen, false},
		{"hostname", h.Hostname, MaxHostnameLen, false},
		{"displayName", h.DisplayName, MaxDisplayName, false},
	} {
		if f.required && f.v == "" {
			return fieldErr(f.name, fmt.Sprintf("must be 1..%d characters", f.max))
		}
		if err := CheckField(f.name, f.v, f.max); err != nil {
			return err
		}
	}
	if len(h.Groups) > MaxGroups {
		return fieldErr("groups", fmt.Sprintf("more than %d", MaxGroups))
	}
	for _, g := range h.Groups {
		if err := ValidateGroupName(g.Name); err != nil && g.Name != "" {
			return fieldErr("groups", err.Error())
		}
	}
	if len(h.Capabilities) > MaxCapabilities {
		return fieldErr("capabilities", fmt.Sprintf("more than %d", MaxCapabilities))
	}
	for _, c := range h.Capabilities {
		if err := CheckField("capabilities", c, MaxCapabilityLen); err != nil {
			return err
		}
	}
	return nil
}

// validate checks the strings of a send that every later step trusts. The
// sizes of nonce and ciphertext are the broker's to judge (too_large).
func (s *Send) validate() error {
	for _, f := range []struct {
		name, v string
		max     int
	}{
		{"_reqId", s.ReqID, MaxIDLen},
		{"id", s.ID, MaxIDLen},
		{"client_message_id", s.ClientMessageID, MaxIDLen},
		{"targetSpec", s.TargetSpec, 0},
		{"priority", s.Priority, 0},
		{"nonce", s.Nonce, 0},
		{"ciphertext", s.Ciphertext, 0},
	} {
		if err := CheckField(f.name, f.v, f.max); err != nil {
			return err
		}
	}
	return nil
}

func (m *ClientAck) validate() error {
	if err := CheckField("_reqId", m.ReqID, MaxIDLen); err != nil {
		return err
	}
	return CheckField("brokerMessageId", m.BrokerMessageID, MaxIDLen)
}

func (m *SetStatus) validate() error {
	if err := CheckField("_reqId", m.ReqID, MaxIDLen); err != nil {
		return err
	}
	if err := CheckField("status", m.Status, 0); err != nil {
		return err
	}
	return CheckField("source", m.Source, 0)
}

// validate leaves the summary's length to the broker (too_large).
func (m *SetSummary) validate() error {
	if err := CheckField("_reqId", m.ReqID, MaxIDLen); err != nil {
		return err
	}
	return CheckField("summary", m.Summary, 0)
}

func (m *GroupOp) validate() error {
	if err := CheckField("_reqId", m.ReqID, MaxIDLen); err != nil {
		return err
	}
	if err := ValidateGroupName(m.Name); err != nil {
		return fieldErr("name", err.Error())
	}
	return nil
}

func (m *MessageStatus) validate() error {
	if err := CheckField("_reqId", m.ReqID, MaxIDLen); err != nil {
		return err
	}
	return CheckField("messageId", m.MessageID, MaxIDLen)
}

func (m *ListPeers) validate() error { return CheckField("_reqId", m.ReqID, MaxIDLen) }
