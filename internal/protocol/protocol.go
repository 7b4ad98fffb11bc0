// Package protocol defines the claudemesh broker wire protocol: frame types,
// error codes and close codes. It has no dependencies outside the standard
// library so that the broker, the Go client, the CLI and the load generator
// all share one definition.
//
// # Handshake
//
// The client opens a WebSocket on /ws and sends a Hello within the hello
// timeout. The broker checks, in order: the frame is a well-formed hello
// (malformed), the timestamp is within ±60 s of the broker clock
// (timestamp_skew), pubkey and signature are hex of the right length
// (malformed), the ed25519 signature over
// "meshId|memberId|pubkey|timestamp" verifies (bad_signature), a non-revoked
// member with that pubkey exists in the mesh and has that id (unauthorized),
// the mesh is below its connection cap (capacity) and the signature was not
// accepted before (replayed). The first failure is answered with an Error
// frame and close 1008 with the reason. On success the broker answers
// HelloAck; frames sent after the hello are processed in order once it has
// succeeded.
//
// # Versions
//
//   - v0.1: hello, send, set_status from the client; hello_ack, ack, push,
//     error from the broker. Clients of the original broker speak only this.
//   - v1 (this package): adds _reqId echo, client_message_id idempotency,
//     client_ack leases (capability "client_ack"), system events (capability
//     "system_events"), set_summary, join_group/leave_group, list_peers,
//     message_status, the node field of hello_ack, and set_status.source.
//     A v0.1 client never receives a frame it did not ask for.
package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Version is the protocol version this package implements.
const Version = 1

// Client → broker frame types.
const (
	TypeHello          = "hello"
	TypeSend           = "send"
	TypeClientAck      = "client_ack"
	TypeSetStatus      = "set_status"
	TypeSetSummary     = "set_summary"
	TypeJoinGroup      = "join_group"
	TypeLeaveGroup     = "leave_group"
	TypeListPeers      = "list_peers"
	TypeMessageStatus  = "message_status"
	TypePing           = "ping" // application-level keepalive; answered with pong
	TypeHelloAck       = "hello_ack"
	TypeAck            = "ack"
	TypePush           = "push"
	TypeError          = "error"
	TypePeersList      = "peers_list"
	TypeMessageStatusR = "message_status_result"
	TypePong           = "pong"
)

// Capabilities a client may announce in its hello.
const (
	CapClientAck    = "client_ack"
	CapSystemEvents = "system_events"
	// CapEphemeral marks a short-lived connection (a CLI command): it is
	// not listed by list_peers, announces no join or leave, and does not
	// count toward the mesh's connection cap. It still receives messages.
	CapEphemeral = "ephemeral"
)

// Hello rejection reasons; each is also the close reason and the
// broker_connections_rejected_total label.
const (
	ReasonMalformed     = "malformed"
	ReasonTimestampSkew = "timestamp_skew"
	ReasonBadSignature  = "bad_signature"
	ReasonUnauthorized  = "unauthorized"
	ReasonCapacity      = "capacity"
	ReasonReplayed      = "replayed"
	ReasonHelloTimeout  = "hello_timeout"
	ReasonRateLimited   = "rate_limited" // too many hellos from one address
	ReasonUnavailable   = "unavailable"  // the broker cannot reach Postgres
	ReasonDraining      = "draining"     // the node is shutting down
)

// Error codes of error frames that do not close the connection, and of
// rejected sends (the ack's error field).
const (
	CodeNoHello          = "no_hello"
	CodeUnknownType      = "unknown_type"
	CodeMalformed        = "malformed"
	CodeUnknownRecipient = "unknown_recipient"
	CodeTooLarge         = "too_large"
	CodeRateLimited      = "rate_limited"
	CodeNoRecipients     = "no_recipients"
	CodeUnavailable      = "unavailable" // Postgres unreachable: nothing was committed
	CodeNotFound         = "not_found"
	CodeInternal         = "internal"
)

// Close codes and reasons.
const (
	CloseNormal             = 1000 // session_replaced
	CloseGoingAway          = 1001 // shutdown or drain
	ClosePolicy             = 1008 // hello rejections, slow_consumer, stale, unauthorized (revoked)
	CloseTooBig             = 1009 // frame over MAX_MESSAGE_BYTES
	CloseTryAgain           = 1013 // Postgres unreachable during hello
	CloseReasonReplaced     = "session_replaced"
	CloseReasonShutdown     = "shutdown"
	CloseReasonSlowConsumer = "slow_consumer"
	CloseReasonStale        = "stale"
	CloseReasonRevoked      = ReasonUnauthorized
)

// Priorities. Lower rank is more urgent.
const (
	PriorityNow  = "now"
	PriorityNext = "next"
	PriorityLow  = "low"
)

// PriorityRank maps a priority to its rank (now=0, next=1, low=2).
// ok is false for an unknown priority.
func PriorityRank(p string) (rank int, ok bool) {
	switch p {
	case PriorityNow:
		return 0, true
	case PriorityNext, "":
		return 1, true
	case PriorityLow:
		return 2, true
	}
	return 0, false
}

// PriorityName is the inverse of PriorityRank.
func PriorityName(rank int) string {
	switch rank {
	case 0:
		return PriorityNow
	case 2:
		return PriorityLow
	}
	return PriorityNext
}

// Statuses and their sources.
const (
	StatusIdle    = "idle"
	StatusWorking = "working"
	StatusDND     = "dnd"

	SourceHook   = "hook"
	SourceManual = "manual"
	SourceJSONL  = "jsonl"
)

// ValidStatus reports whether s is idle, working or dnd.
func ValidStatus(s string) bool {
	return s == StatusIdle || s == StatusWorking || s == StatusDND
}

// ValidSource reports whether s is hook, manual or jsonl.
func ValidSource(s string) bool {
	return s == SourceHook || s == SourceManual || s == SourceJSONL
}

// MaxPriorityRank is the least urgent priority a session in status may
// receive: idle receives everything, working and dnd only "now".
func MaxPriorityRank(status string) int {
	if status == StatusIdle {
		return 2
	}
	return 0
}

// System event names (push frames with subtype "system").
const (
	SubtypeSystem   = "system"
	EventPeerJoined = "peer_joined"
	EventPeerLeft   = "peer_left"
	EventPeerStatus = "peer_status"
	SystemSender    = "system"
)

// Delivery states reported by message_status.
const (
	StateQueued    = "queued"
	StateHeld      = "held"
	StateLeased    = "leased"
	StateDelivered = "delivered"
	StateExpired   = "expired"
)

// Limits on fields the broker stores and gossips.
const (
	MaxSummaryLen   = 512
	MaxGroupNameLen = 64
	MaxGroups       = 64
	MaxCwdLen       = 4096
	MaxIDLen        = 128 // meshId, memberId, sessionId, id, client_message_id, _reqId
	MaxHostnameLen  = 255
	MaxDisplayName  = 128
	HelloSkew       = 60 * time.Second
)

// Group is one entry of hello.groups. Extra fields are ignored.
type Group struct {
	Name string `json:"name"`
}

// Hello is the first client frame.
type Hello struct {
	Type         string      `json:"type"`
	ReqID        string      `json:"_reqId,omitempty"`
	MeshID       string      `json:"meshId"`
	MemberID     string      `json:"memberId"`
	Pubkey       string      `json:"pubkey"`
	SessionID    string      `json:"sessionId"`
	PID          int64       `json:"pid"`
	Cwd          string      `json:"cwd"`
	Timestamp    json.Number `json:"timestamp"`
	Signature    string      `json:"signature"`
	Hostname     string      `json:"hostname,omitempty"`
	DisplayName  string      `json:"displayName,omitempty"`
	Groups       []Group     `json:"groups,omitempty"`
	Capabilities []string    `json:"capabilities,omitempty"`

	// GroupsSet records whether the frame had a "groups" field: a
	// reattaching session then takes exactly these groups, otherwise it
	// keeps the ones it had.
	GroupsSet bool `json:"-"`
}

// TimestampMillis returns the hello timestamp as integer milliseconds.
func (h *Hello) TimestampMillis() (int64, error) {
	return strconv.ParseInt(h.Timestamp.String(), 10, 64)
}

// HasCapability reports whether the hello announced capability c.
func (h *Hello) HasCapability(c string) bool {
	for _, x := range h.Capabilities {
		if x == c {
			return true
		}
	}
	return false
}

// GroupNames returns the names of hello.groups, dropping empty names.
func (h *Hello) GroupNames() []string {
	out := make([]string, 0, len(h.Groups))
	for _, g := range h.Groups {
		if g.Name != "" {
			out = append(out, g.Name)
		}
	}
	return out
}

// CanonicalHello is the byte string a hello signature covers.
func CanonicalHello(meshID, memberID, pubkey string, timestampMillis int64) string {
	return meshID + "|" + memberID + "|" + pubkey + "|" + strconv.FormatInt(timestampMillis, 10)
}

// Send asks the broker to queue an envelope.
type Send struct {
	Type            string `json:"type"`
	ReqID           string `json:"_reqId,omitempty"`
	ID              string `json:"id,omitempty"`
	TargetSpec      string `json:"targetSpec"`
	Priority        string `json:"priority,omitempty"`
	Nonce           string `json:"nonce"`
	Ciphertext      string `json:"ciphertext"`
	ClientMessageID string `json:"client_message_id,omitempty"`
}

// ClientAck acknowledges a push (capability client_ack).
type ClientAck struct {
	Type            string `json:"type"`
	ReqID           string `json:"_reqId,omitempty"`
	BrokerMessageID string `json:"brokerMessageId"`
}

// SetStatus is a manual (or, with Source, jsonl-inferred) status report.
type SetStatus struct {
	Type   string `json:"type"`
	ReqID  string `json:"_reqId,omitempty"`
	Status string `json:"status"`
	Source string `json:"source,omitempty"` // manual (default) or jsonl
}

// SetSummary sets the session's free-text summary.
type SetSummary struct {
	Type    string `json:"type"`
	ReqID   string `json:"_reqId,omitempty"`
	Summary string `json:"summary"`
}

// GroupOp is join_group or leave_group.
type GroupOp struct {
	Type  string `json:"type"`
	ReqID string `json:"_reqId,omitempty"`
	Name  string `json:"name"`
}

// ListPeers asks for every live session of the mesh.
type ListPeers struct {
	Type  string `json:"type"`
	ReqID string `json:"_reqId,omitempty"`
}

// MessageStatus asks for the delivery state of a message the caller can see.
type MessageStatus struct {
	Type      string `json:"type"`
	ReqID     string `json:"_reqId,omitempty"`
	MessageID string `json:"messageId"`
}

// HelloAck answers a successful hello.
type HelloAck struct {
	Type              string `json:"type"`
	ReqID             string `json:"_reqId,omitempty"`
	PresenceID        string `json:"presenceId"`
	MemberDisplayName string `json:"memberDisplayName"`
	Node              string `json:"node"`
	Reattached        bool   `json:"reattached,omitempty"`
}

// Ack answers a send once it is durably committed, or rejects it.
type Ack struct {
	Type      string `json:"type"`
	ReqID     string `json:"_reqId,omitempty"`
	ID        string `json:"id"`
	MessageID string `json:"messageId"`
	Queued    bool   `json:"queued"`
	Duplicate bool   `json:"duplicate,omitempty"`
	Error     string `json:"error,omitempty"`
}

// Push delivers an envelope, or a system event when Subtype is "system".
type Push struct {
	Type            string          `json:"type"`
	Subtype         string          `json:"subtype,omitempty"`
	Event           string          `json:"event,omitempty"`
	MessageID       string          `json:"messageId,omitempty"`
	MeshID          string          `json:"meshId"`
	SenderPubkey    string          `json:"senderPubkey"`
	Priority        string          `json:"priority,omitempty"`
	Nonce           string          `json:"nonce,omitempty"`
	Ciphertext      string          `json:"ciphertext"`
	CreatedAt       string          `json:"createdAt,omitempty"`
	SenderMemberID  string          `json:"senderMemberId,omitempty"`
	SenderName      string          `json:"senderName,omitempty"`
	TargetSpec      string          `json:"targetSpec,omitempty"`
	ClientMessageID string          `json:"client_message_id,omitempty"`
	EventData       json.RawMessage `json:"eventData,omitempty"`
}

// ErrorFrame reports a problem; after a hello rejection the socket closes.
type ErrorFrame struct {
	Type    string `json:"type"`
	ReqID   string `json:"_reqId,omitempty"`
	Code    string `json:"code"`
	Message string `json:"message"`
	ID      string `json:"id,omitempty"`
}

// Peer is one live session in peers_list.
type Peer struct {
	Pubkey       string   `json:"pubkey"`
	MemberID     string   `json:"memberId"`
	DisplayName  string   `json:"displayName"`
	SessionID    string   `json:"sessionId"`
	PresenceID   string   `json:"presenceId"`
	Status       string   `json:"status"`
	StatusSource string   `json:"statusSource"`
	Summary      string   `json:"summary"`
	Groups       []string `json:"groups"`
	Cwd          string   `json:"cwd"`
	Hostname     string   `json:"hostname"`
	ConnectedAt  string   `json:"connectedAt"`
	Node         string   `json:"node"`
}

// PeersList answers list_peers.
type PeersList struct {
	Type  string `json:"type"`
	ReqID string `json:"_reqId,omitempty"`
	Peers []Peer `json:"peers"`
}

// RecipientState is one recipient in message_status_result.
type RecipientState struct {
	MemberID    string `json:"memberId"`
	DisplayName string `json:"displayName"`
	State       string `json:"state"`
}

// MessageStatusResult answers message_status.
type MessageStatusResult struct {
	Type       string           `json:"type"`
	ReqID      string           `json:"_reqId,omitempty"`
	MessageID  string           `json:"messageId"`
	Recipients []RecipientState `json:"recipients"`
	Error      string           `json:"error,omitempty"`
}

// Pong answers an application-level ping.
type Pong struct {
	Type  string `json:"type"`
	ReqID string `json:"_reqId,omitempty"`
}

// PeerEvent is the eventData of a system push.
type PeerEvent struct {
	Pubkey       string `json:"pubkey"`
	MemberID     string `json:"memberId"`
	DisplayName  string `json:"displayName"`
	SessionID    string `json:"sessionId"`
	PresenceID   string `json:"presenceId"`
	Status       string `json:"status,omitempty"`
	StatusSource string `json:"statusSource,omitempty"`
	Summary      string `json:"summary,omitempty"`
	Node         string `json:"node,omitempty"`
}

// Envelope carries the fields every client frame may have.
type Envelope struct {
	Type  string
	ReqID string
}

// ErrNotObject is returned for frames that are not a JSON object.
var ErrNotObject = errors.New("frame is not a JSON object")

// DecodeEnvelope reads the type and _reqId of a frame. Both must be strings
// when present; the frame must be a single JSON object.
func DecodeEnvelope(data []byte) (Envelope, error) {
	var raw struct {
		Type  json.RawMessage `json:"type"`
		ReqID json.RawMessage `json:"_reqId"`
	}
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return Envelope{}, ErrNotObject
	}
	if err := json.Unmarshal(trimmed, &raw); err != nil {
		return Envelope{}, fmt.Errorf("invalid JSON: %w", err)
	}
	var env Envelope
	if len(raw.Type) > 0 && string(raw.Type) != "null" {
		if err := json.Unmarshal(raw.Type, &env.Type); err != nil {
			return Envelope{}, errors.New("type must be a string")
		}
	}
	if len(raw.ReqID) > 0 && string(raw.ReqID) != "null" {
		if err := json.Unmarshal(raw.ReqID, &env.ReqID); err != nil {
			return Envelope{}, errors.New("_reqId must be a string")
		}
		if err := CheckField("_reqId", env.ReqID, MaxIDLen); err != nil {
			return Envelope{}, err
		}
	}
	if env.Type == "" {
		return env, errors.New("missing type")
	}
	if err := CheckField("type", env.Type, 0); err != nil {
		return env, err
	}
	return env, nil
}

// FieldError names the field that made a frame invalid.
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Reason }

func fieldErr(field, reason string) error { return &FieldError{Field: field, Reason: reason} }

// DecodeHello decodes and shape-checks a hello frame: every required field
// present and of the right JSON type, and every string free of NUL and
// within its bound (check 0 of the handshake; a pubkey or signature only
// within twice its length). It does not check the timestamp window, hex
// lengths or the signature.
func DecodeHello(data []byte) (*Hello, error) {
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	for _, f := range []string{"meshId", "memberId", "pubkey", "sessionId", "pid", "cwd", "timestamp", "signature"} {
		v, ok := probe[f]
		if !ok || string(v) == "null" {
			return nil, fieldErr(f, "required")
		}
	}
	var h Hello
	if err := json.Unmarshal(data, &h); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return nil, fieldErr(ute.Field, "wrong JSON type")
		}
		return nil, err
	}
	if h.Type != TypeHello {
		return nil, fieldErr("type", "not hello")
	}
	if g, ok := probe["groups"]; ok && string(g) != "null" {
		h.GroupsSet = true
	}
	if _, err := h.TimestampMillis(); err != nil {
		return nil, fieldErr("timestamp", "must be an integer number of milliseconds")
	}
	if err := h.validate(); err != nil {
		return nil, err
	}
	return &h, nil
}

// isHex reports whether s is n hex digits (either case). A loop, not a
// regular expression: every send's target is checked (a regexp was 3% of
// a node's CPU in a burst).
func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case '0' <= c && c <= '9', 'a' <= c && c <= 'f', 'A' <= c && c <= 'F':
		default:
			return false
		}
	}
	return true
}

// IsPubkeyHex reports whether s is 64 hex characters.
func IsPubkeyHex(s string) bool { return isHex(s, 64) }

// LowerHex lowercases the hex digits A-F of s, and nothing else (a
// pubkey as the store keeps it).
func LowerHex(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'F' {
			b[i] = c + ('a' - 'A')
		}
	}
	return string(b)
}

// IsSignatureHex reports whether s is 128 hex characters.
func IsSignatureHex(s string) bool { return isHex(s, 128) }

// ValidateGroupName checks a group name: 1..64 bytes, printable, no '@'
// prefix (the '@' belongs to the target spec, not the name).
func ValidateGroupName(name string) error {
	if name == "" || CheckText(name, MaxGroupNameLen) != nil {
		return fmt.Errorf("group name must be 1..%d bytes of UTF-8 text", MaxGroupNameLen)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f || r == 0xfffd {
			return errors.New("group name has a control or invalid character")
		}
	}
	if strings.HasPrefix(name, "@") {
		return errors.New("group name must not start with @")
	}
	return nil
}

// TargetKind classifies a targetSpec.
type TargetKind int

// Target kinds.
const (
	TargetInvalid TargetKind = iota
	TargetPubkey
	TargetBroadcast
	TargetGroup
)

// ParseTarget classifies a targetSpec and returns its argument (lowercased
// pubkey, or group name). #channel and tag:x are reserved and invalid.
func ParseTarget(spec string) (TargetKind, string) {
	switch {
	case spec == "*":
		return TargetBroadcast, ""
	case strings.HasPrefix(spec, "@"):
		if ValidateGroupName(spec[1:]) != nil {
			return TargetInvalid, ""
		}
		return TargetGroup, spec[1:]
	case IsPubkeyHex(spec):
		return TargetPubkey, strings.ToLower(spec)
	}
	return TargetInvalid, ""
}

// DecodeSend decodes and validates a send frame.
func DecodeSend(data []byte) (*Send, error) {
	var s Send
	if err := json.Unmarshal(data, &s); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return nil, fieldErr(ute.Field, "wrong JSON type")
		}
		return nil, err
	}
	return CheckSend(&s)
}

// DecodeFrame decodes a frame's envelope, parsing the frame once when it
// can: the frame is read as a Send, whose type and _reqId are the
// envelope's, and for a send frame that Send (unchecked: see CheckSend) is
// returned too. A frame that does not read as a Send (a field of its type
// that a send also has, in another JSON type) or whose envelope is not
// valid is decoded by DecodeEnvelope, with its errors.
func DecodeFrame(data []byte) (Envelope, *Send, error) {
	var s Send
	if json.Unmarshal(data, &s) == nil && s.Type != "" && CheckField("type", s.Type, 0) == nil &&
		(s.ReqID == "" || CheckField("_reqId", s.ReqID, MaxIDLen) == nil) {
		env := Envelope{Type: s.Type, ReqID: s.ReqID}
		if s.Type == TypeSend {
			return env, &s, nil
		}
		return env, nil, nil
	}
	env, err := DecodeEnvelope(data)
	return env, nil, err
}

// CheckSend checks a decoded send frame as DecodeSend does. On an error
// the send is returned when its id may be echoed in the ack.
func CheckSend(s *Send) (*Send, error) {
	if err := CheckField("id", s.ID, MaxIDLen); err != nil {
		return nil, err // not echoed in the ack
	}
	if err := s.validate(); err != nil {
		return s, err
	}
	if s.Priority == "" {
		s.Priority = PriorityNext
	}
	if _, ok := PriorityRank(s.Priority); !ok {
		return s, fieldErr("priority", "must be now, next or low")
	}
	if kind, _ := ParseTarget(s.TargetSpec); kind == TargetInvalid {
		return s, fieldErr("targetSpec", "must be a 64-hex pubkey, * or @group")
	}
	if s.Ciphertext == "" {
		return s, fieldErr("ciphertext", "required")
	}
	return s, nil
}

// Decode unmarshals a frame of a known type into v, mapping JSON type
// errors to FieldError, and checks the frame's strings (NUL, invalid
// UTF-8, lengths) as its type defines.
func Decode(data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return fieldErr(ute.Field, "wrong JSON type")
		}
		return err
	}
	if v, ok := v.(validator); ok {
		return v.validate()
	}
	return nil
}

// FormatTime renders a timestamp the way push.createdAt and peers use it:
// RFC 3339 in UTC with millisecond precision, like JavaScript's toISOString.
func FormatTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z")
}
