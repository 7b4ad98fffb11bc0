package protocol

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// PushFields are the fields of an envelope push.
type PushFields struct {
	MessageID       int64
	MeshID          string
	SenderPubkey    string
	Priority        string
	Nonce           string
	Ciphertext      string
	CreatedAt       time.Time
	SenderMemberID  string
	SenderName      string
	TargetSpec      string
	ClientMessageID string
}

// AppendPush appends the JSON of an envelope push to b. It writes the same
// object encoding/json writes for Push, without reflection: pushes are the
// broker's hottest frame.
func AppendPush(b []byte, p *PushFields) []byte {
	b = append(b, `{"type":"push","messageId":"`...)
	b = strconv.AppendInt(b, p.MessageID, 10)
	b = append(b, `","meshId":`...)
	b = AppendString(b, p.MeshID)
	b = append(b, `,"senderPubkey":`...)
	b = AppendString(b, p.SenderPubkey)
	b = append(b, `,"priority":`...)
	b = AppendString(b, p.Priority)
	if p.Nonce != "" {
		b = append(b, `,"nonce":`...)
		b = AppendString(b, p.Nonce)
	}
	b = append(b, `,"ciphertext":`...)
	b = AppendString(b, p.Ciphertext)
	b = append(b, `,"createdAt":"`...)
	b = p.CreatedAt.UTC().AppendFormat(b, "2006-01-02T15:04:05.000Z")
	b = append(b, '"')
	if p.SenderMemberID != "" {
		b = append(b, `,"senderMemberId":`...)
		b = AppendString(b, p.SenderMemberID)
	}
	if p.SenderName != "" {
		b = append(b, `,"senderName":`...)
		b = AppendString(b, p.SenderName)
	}
	if p.TargetSpec != "" {
		b = append(b, `,"targetSpec":`...)
		b = AppendString(b, p.TargetSpec)
	}
	if p.ClientMessageID != "" {
		b = append(b, `,"client_message_id":`...)
		b = AppendString(b, p.ClientMessageID)
	}
	return append(b, '}')
}

const hexDigits = "0123456789abcdef"

// AppendString appends s as a JSON string: quotes, backslashes and control
// characters escaped, invalid UTF-8 replaced by U+FFFD, U+2028 and U+2029
// escaped (as encoding/json does, minus its HTML escaping).
func AppendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
