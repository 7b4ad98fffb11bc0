package relay

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Envelope is a delivery row carried whole by a notification: the sender's
// node wrote the row already leased to the recipient's only session, on
// another node, and that node pushes it without claiming it (the remote
// fast path). Node and Conn name the lease; the row is pushed only by
// that node incarnation, to that connection.
type Envelope struct {
	Node     string `json:"n"`  // lease node: name#incarnation
	Presence string `json:"p"`  // presence id of the session
	Conn     string `json:"c"`  // connection id (the lease)
	MeshID   string `json:"m"`  // mesh
	MemberID string `json:"r"`  // recipient member
	Priority int16  `json:"pr"` // priority rank

	SenderMemberID  string `json:"sm"`
	SenderPubkey    string `json:"sp"`
	SenderName      string `json:"sn"`
	TargetSpec      string `json:"t"`
	Nonce           string `json:"no"`
	Ciphertext      string `json:"ct"`
	ClientMessageID string `json:"ci,omitempty"`

	// Filled in by Postgres when the row commits (see EnvelopePrefix).
	MessageID int64     `json:"-"`
	CreatedAt time.Time `json:"-"`
}

// envelopeVersion starts every envelope payload.
const envelopeVersion = "e1"

// envelopeIDRoom is the room left in a payload for the message id and the
// commit time that Postgres writes between prefix and suffix.
const envelopeIDRoom = 48

// EnvelopePrefix and EnvelopeSuffix are the two halves of an envelope
// payload. The statement that inserts the row notifies
//
//	prefix || <message id> || ' ' || <created_at in unix microseconds> || suffix
//
// so the payload carries what only the insert knows.
func EnvelopePrefix(sentAt time.Time) string {
	return envelopeVersion + " " + strconv.FormatInt(sentAt.UnixMicro(), 10) + " "
}

// EnvelopeSuffix renders the envelope's fields. ok is false when the payload
// would not fit under MaxPayload (the row then takes the claim path).
func EnvelopeSuffix(prefix string, e *Envelope) (suffix string, ok bool) {
	b, err := json.Marshal(e)
	if err != nil {
		return "", false
	}
	suffix = "\n" + string(b)
	return suffix, len(prefix)+envelopeIDRoom+len(suffix) <= MaxPayload
}

// IsEnvelope reports whether a mesh-channel payload is an envelope.
func IsEnvelope(payload string) bool {
	return strings.HasPrefix(payload, envelopeVersion+" ")
}

// DecodeEnvelope parses an envelope payload as notified by Postgres.
func DecodeEnvelope(payload string) (sentAt time.Time, e Envelope, err error) {
	head, body, ok := strings.Cut(payload, "\n")
	if !ok {
		return sentAt, e, errors.New("relay: envelope without body")
	}
	f := strings.Fields(head)
	if len(f) != 4 || f[0] != envelopeVersion {
		return sentAt, e, errors.New("relay: malformed envelope header")
	}
	var n [3]int64
	for i := range n {
		if n[i], err = strconv.ParseInt(f[i+1], 10, 64); err != nil {
			return sentAt, e, fmt.Errorf("relay: envelope header: %w", err)
		}
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		return sentAt, e, fmt.Errorf("relay: envelope body: %w", err)
	}
	if e.Node == "" || e.Conn == "" || e.MeshID == "" || e.MemberID == "" || n[1] <= 0 {
		return sentAt, e, errors.New("relay: envelope lacks node, connection, mesh, member or id")
	}
	e.MessageID, e.CreatedAt = n[1], time.UnixMicro(n[2])
	return time.UnixMicro(n[0]), e, nil
}
