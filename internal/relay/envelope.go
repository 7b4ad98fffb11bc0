package relay

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
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

// envelopeVersion starts every envelope payload. e2 added the seal; a
// node of the e1 era reads e2 as a malformed wake-up, and its rows are
// claimed instead.
const envelopeVersion = "e2"

// envelopeIDRoom is the room left in a payload for what Postgres writes
// between prefix and suffix: the message id, the commit time and the seal.
const envelopeIDRoom = 48 + 1 + sha256.Size*2

// The payload of an envelope is made in two halves around what only the
// statement inserting its row knows:
//
//	payload = head || ' ' || seal || suffix
//	head    = prefix || <message id> || ' ' || <created_at in unix microseconds>
//	prefix  = "e2 " || <sent at in unix microseconds> || ' '
//	seal    = hex(HMAC-SHA256(key, head || ' ' || digest))
//	digest  = hex(SHA-256(suffix)), suffix = "\n" || <the fields as JSON>
//
// The sender renders the prefix and suffix (Pending); Postgres completes
// head and seal in the insert statement (EnvelopeHeadSQL,
// EnvelopePayloadSQL) from the key's HMAC pads (EnvelopeKey.Pads), in the
// same round trip; CompleteEnvelope is the same computation in Go, for a
// queue that is not Postgres. The seal covers only the ASCII head and the
// suffix's digest, so it does not depend on the database's encoding.
// DecodeEnvelope reads it back. This file is the format's only home.

// EnvelopePrefix is the head's first part: the version and the send time.
func EnvelopePrefix(sentAt time.Time) string {
	return envelopeVersion + " " + strconv.FormatInt(sentAt.UnixMicro(), 10) + " "
}

// EnvelopeSuffix renders the envelope's fields. ok is false when the payload
// would not fit under MaxPayload (the row then takes the claim path).
func EnvelopeSuffix(prefix string, e *Envelope) (suffix string, ok bool) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // <, > and & as themselves: six times less room than escaped
	if err := enc.Encode(e); err != nil {
		return "", false
	}
	suffix = "\n" + strings.TrimSuffix(buf.String(), "\n")
	return suffix, len(prefix)+envelopeIDRoom+len(suffix) <= MaxPayload
}

// Pending is an envelope whose head and seal are added as its row commits.
type Pending struct {
	Channel string // the recipient node's channel (NodeChannel)
	Prefix  string // EnvelopePrefix
	Suffix  string // EnvelopeSuffix
	Digest  string // hex SHA-256 of Suffix: what the seal covers of it
}

// NewPending renders e for the channel of its lease's node. ok is false
// when it would not fit in a notification.
func NewPending(channel, prefix string, e *Envelope) (Pending, bool) {
	suffix, ok := EnvelopeSuffix(prefix, e)
	if !ok {
		return Pending{}, false
	}
	return Pending{Channel: channel, Prefix: prefix, Suffix: suffix, Digest: digest(suffix)}, true
}

func digest(suffix string) string {
	d := sha256.Sum256([]byte(suffix))
	return hex.EncodeToString(d[:])
}

// head is the payload's first line up to the seal.
func head(prefix string, messageID int64, createdAt time.Time) string {
	return prefix + strconv.FormatInt(messageID, 10) + " " + strconv.FormatInt(createdAt.UnixMicro(), 10)
}

// CompleteEnvelope is the payload Postgres notifies for p once its row
// committed with messageID at createdAt: what EnvelopePayloadSQL computes,
// in Go. Without a key the envelope goes out unsealed (and nodes refuse
// it), as the statement does without pads.
func CompleteEnvelope(p Pending, messageID int64, createdAt time.Time, key *EnvelopeKey) string {
	h := head(p.Prefix, messageID, createdAt)
	if key == nil {
		return h + p.Suffix
	}
	return h + " " + hex.EncodeToString(key.sealDigest(h, p.Digest)) + p.Suffix
}

// EnvelopeHeadSQL is the SQL expression of the head, given SQL expressions
// for the prefix (text), the message id (int8) and its created_at
// (timestamptz).
func EnvelopeHeadSQL(prefix, messageID, createdAt string) string {
	return prefix + " || " + messageID + "::text || ' ' || (extract(epoch FROM " + createdAt + ") * 1000000)::bigint::text"
}

// EnvelopePayloadSQL is the SQL expression of the payload, given SQL
// expressions for the head (EnvelopeHeadSQL), the suffix and digest (text)
// and the HMAC pads (bytea; NULL pads leave the envelope unsealed):
// HMAC-SHA256 is sha256(outer || sha256(inner || message)), which needs
// only Postgres' built-in sha256().
func EnvelopePayloadSQL(head, suffix, digest, inner, outer string) string {
	return "CASE WHEN " + inner + " IS NULL THEN " + head + " ELSE " + head + " || ' ' || encode(sha256(" + outer +
		" || sha256(" + inner + " || convert_to(" + head + " || ' ' || " + digest + ", 'UTF8'))), 'hex') END || " + suffix
}

// EnvelopeKey seals and checks envelope notifications. Any role that can
// connect to the database may NOTIFY on any channel, and an envelope makes
// its node push a row to a session without reading it from Postgres: an
// unsealed one would let such a role push any text, as any sender, under
// the id of a real message that is then marked delivered and lost. The
// seal covers everything in the payload, the message id and commit time
// included, so it is computed by Postgres in the insert statement
// (store.SetEnvelopeKey) from the key's HMAC pads, in the same round trip;
// the node checks it before anything else. A replayed envelope is one
// whose row was pushed already (the engine's taken set), or too old to
// trust (LEASE_DURATION/2), and takes the claim path.
type EnvelopeKey struct {
	key []byte
}

// NewEnvelopeKey makes a key from secret bytes (at least 32).
func NewEnvelopeKey(secret []byte) (*EnvelopeKey, error) {
	if len(secret) < 32 {
		return nil, errors.New("relay: envelope key shorter than 32 bytes")
	}
	return &EnvelopeKey{key: append([]byte(nil), secret...)}, nil
}

// DeriveEnvelopeKey derives the envelope key from CLUSTER_SECRET, apart
// from the gossip key (SHA-256 of the secret): nodes that share the secret
// share the key, and nothing in the database reveals it.
func DeriveEnvelopeKey(clusterSecret string) []byte {
	m := hmac.New(sha256.New, []byte(clusterSecret))
	m.Write([]byte("claudemesh relay envelope key v1"))
	return m.Sum(nil)
}

// Pads returns HMAC-SHA256's inner and outer keys (key XOR ipad, key XOR
// opad, one block each), with which Postgres computes the seal using only
// its built-in sha256(): sha256(outer || sha256(inner || message)).
func (k *EnvelopeKey) Pads() (inner, outer []byte) {
	block := make([]byte, sha256.BlockSize)
	key := k.key
	if len(key) > sha256.BlockSize {
		sum := sha256.Sum256(key)
		key = sum[:]
	}
	copy(block, key)
	inner, outer = make([]byte, len(block)), make([]byte, len(block))
	for i, b := range block {
		inner[i], outer[i] = b^0x36, b^0x5c
	}
	return inner, outer
}

// Seal computes the seal of an envelope (for tests and tools; nodes let
// Postgres do it).
func (k *EnvelopeKey) Seal(head, suffix string) string {
	return hex.EncodeToString(k.seal(head, suffix))
}

func (k *EnvelopeKey) seal(head, suffix string) []byte { return k.sealDigest(head, digest(suffix)) }

func (k *EnvelopeKey) sealDigest(head, digest string) []byte {
	m := hmac.New(sha256.New, k.key)
	m.Write([]byte(head))
	m.Write([]byte{' '})
	m.Write([]byte(digest))
	return m.Sum(nil)
}

// ErrBadSeal is returned for an envelope not sealed with the node's key:
// forged, or from a node with another CLUSTER_SECRET.
var ErrBadSeal = errors.New("relay: envelope seal does not match")

// IsEnvelope reports whether a mesh-channel payload is an envelope.
func IsEnvelope(payload string) bool {
	return strings.HasPrefix(payload, envelopeVersion+" ")
}

// DecodeEnvelope checks the seal of an envelope payload as notified by
// Postgres (ErrBadSeal) and parses it.
func DecodeEnvelope(payload string, key *EnvelopeKey) (sentAt time.Time, e Envelope, err error) {
	if len(payload) > maxNotifyPayload {
		return sentAt, e, errors.New("relay: envelope longer than a notification can be")
	}
	line, body, ok := strings.Cut(payload, "\n")
	if !ok {
		return sentAt, e, errors.New("relay: envelope without body")
	}
	f := strings.Split(line, " ")
	if len(f) != 5 || f[0] != envelopeVersion {
		return sentAt, e, errors.New("relay: malformed envelope header")
	}
	seal, err := hex.DecodeString(f[4])
	if err != nil || len(seal) != sha256.Size {
		return sentAt, e, errors.New("relay: malformed envelope seal")
	}
	if !hmac.Equal(seal, key.seal(strings.Join(f[:4], " "), "\n"+body)) {
		return sentAt, e, ErrBadSeal
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
