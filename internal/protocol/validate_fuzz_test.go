package protocol_test

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strconv"
	"testing"

	"github.com/claudemesh/broker/internal/protocol"
)

// baseFrames are valid frames of every client type, keyed by type; the
// fuzzer replaces one field of one of them.
var baseFrames = map[string]map[string]any{
	protocol.TypeHello: {"type": "hello", "meshId": "m", "memberId": "u", "pubkey": hex64, "sessionId": "s", "pid": 1,
		"cwd": "/", "timestamp": 1764480000000, "signature": hex64 + hex64, "hostname": "h", "displayName": "d",
		"groups": []map[string]string{{"name": "g"}}, "capabilities": []string{"client_ack"}, "_reqId": "r"},
	protocol.TypeSend: {"type": "send", "id": "1", "targetSpec": "*", "priority": "now", "nonce": "n", "ciphertext": "c",
		"client_message_id": "k", "_reqId": "r"},
	protocol.TypeClientAck:     {"type": "client_ack", "brokerMessageId": "12", "_reqId": "r"},
	protocol.TypeSetStatus:     {"type": "set_status", "status": "idle", "source": "manual", "_reqId": "r"},
	protocol.TypeSetSummary:    {"type": "set_summary", "summary": "s", "_reqId": "r"},
	protocol.TypeJoinGroup:     {"type": "join_group", "name": "g", "_reqId": "r"},
	protocol.TypeLeaveGroup:    {"type": "leave_group", "name": "g", "_reqId": "r"},
	protocol.TypeMessageStatus: {"type": "message_status", "messageId": "12", "_reqId": "r"},
	protocol.TypeListPeers:     {"type": "list_peers", "_reqId": "r"},
}

// rawString renders b as a JSON string literal without repairing it: bytes
// that are not valid UTF-8 stay raw, and escape selects whether NUL and
// other control bytes are written as \u escapes (valid JSON) or raw.
func rawString(b []byte, escape bool) []byte {
	out := []byte{'"'}
	for _, c := range b {
		switch {
		case c == '"' || c == '\\':
			out = append(out, '\\', c)
		case c < 0x20 && escape:
			out = append(out, []byte(`\u00`+strconv.FormatUint(uint64(c)>>4, 16)+strconv.FormatUint(uint64(c)&15, 16))...)
		default:
			out = append(out, c)
		}
	}
	return append(out, '"')
}

// frameWith is base frame typ with field set to the string value (a new
// field when it has none).
func frameWith(typ, field string, value []byte, escape bool) []byte {
	base := baseFrames[typ]
	var buf bytes.Buffer
	buf.WriteByte('{')
	first := true
	put := func(k string, v []byte) {
		if !first {
			buf.WriteByte(',')
		}
		first = false
		kb, _ := json.Marshal(k)
		buf.Write(kb)
		buf.WriteByte(':')
		buf.Write(v)
	}
	for k, v := range base {
		if k == field {
			continue
		}
		vb, _ := json.Marshal(v)
		put(k, vb)
	}
	if field == "groups" {
		put(field, append(append([]byte(`[{"name":`), rawString(value, escape)...), "}]"...))
	} else if field == "capabilities" {
		put(field, append(append([]byte{'['}, rawString(value, escape)...), ']'))
	} else {
		put(field, rawString(value, escape))
	}
	buf.WriteByte('}')
	return buf.Bytes()
}

// decode decodes a frame the way the broker's read loop does.
func decode(data []byte) (any, error) {
	env, err := protocol.DecodeEnvelope(data)
	if err != nil {
		return nil, err
	}
	switch env.Type {
	case protocol.TypeHello:
		return protocol.DecodeHello(data)
	case protocol.TypeSend:
		s, err := protocol.DecodeSend(data)
		if err != nil {
			return nil, err
		}
		return s, nil
	}
	targets := map[string]any{
		protocol.TypeClientAck: &protocol.ClientAck{}, protocol.TypeSetStatus: &protocol.SetStatus{},
		protocol.TypeSetSummary: &protocol.SetSummary{}, protocol.TypeJoinGroup: &protocol.GroupOp{},
		protocol.TypeLeaveGroup: &protocol.GroupOp{}, protocol.TypeMessageStatus: &protocol.MessageStatus{},
		protocol.TypeListPeers: &protocol.ListPeers{},
	}
	v, ok := targets[env.Type]
	if !ok {
		return nil, nil
	}
	return v, protocol.Decode(data, v)
}

// bounds are the byte limits of the fields that have one.
var bounds = map[string]int{
	"ReqID": protocol.MaxIDLen, "ID": protocol.MaxIDLen, "ClientMessageID": protocol.MaxIDLen,
	"MeshID": protocol.MaxIDLen, "MemberID": protocol.MaxIDLen, "SessionID": protocol.MaxIDLen,
	"BrokerMessageID": protocol.MaxIDLen, "MessageID": protocol.MaxIDLen, "Cwd": protocol.MaxCwdLen,
	"Hostname": protocol.MaxHostnameLen, "DisplayName": protocol.MaxDisplayName, "Pubkey": 128, "Signature": 256,
	"Name": protocol.MaxGroupNameLen,
}

// checkStrings fails when a decoded frame holds a string Postgres or the
// protocol refuses.
func checkStrings(t *testing.T, path string, v reflect.Value) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			checkStrings(t, path, v.Elem())
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				checkStrings(t, v.Type().Field(i).Name, v.Field(i))
			}
		}
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			checkStrings(t, path, v.Index(i))
		}
	case reflect.String:
		if err := protocol.CheckText(v.String(), bounds[path]); err != nil {
			t.Fatalf("accepted %s %q: %v", path, v.String(), err)
		}
	}
}

// Whatever a decoder accepts holds no NUL, no invalid UTF-8 and no field
// over its bound, whichever field of whichever frame carries the bad bytes.
func FuzzFrameFields(f *testing.F) {
	for _, s := range []struct {
		typ, field, value string
		escape            bool
	}{
		{"send", "ciphertext", "a\x00b", true},
		{"send", "nonce", "\x00", true},
		{"send", "client_message_id", "k\x00", true},
		{"send", "id", "x\xff", false},
		{"hello", "cwd", "/tmp/\x00", true},
		{"hello", "meshId", "m\x00", true},
		{"hello", "pubkey", string(bytes.Repeat([]byte("a"), 300)), false},
		{"hello", "groups", "g\x00", true},
		{"hello", "capabilities", "\x00", true},
		{"set_summary", "summary", "\x00", true},
		{"message_status", "messageId", "1\x00", true},
		{"client_ack", "_reqId", "\xc3\x28", false},
	} {
		f.Add(s.typ, s.field, []byte(s.value), s.escape)
	}
	f.Fuzz(func(t *testing.T, typ, field string, value []byte, escape bool) {
		if _, ok := baseFrames[typ]; !ok {
			return
		}
		v, err := decode(frameWith(typ, field, value, escape))
		if err != nil || v == nil {
			return
		}
		checkStrings(t, "", reflect.ValueOf(v))
	})
}

// The base frames themselves are accepted: the fuzz target above would
// otherwise prove nothing.
func TestBaseFramesDecode(t *testing.T) {
	for typ := range baseFrames {
		v, err := decode(frameWith(typ, "_reqId", []byte("ok"), true))
		if err != nil || v == nil {
			t.Errorf("base %s frame: %v", typ, err)
		}
	}
}

// Every string field of every client frame is refused with NUL in it.
func TestFrameFieldsRefuseNUL(t *testing.T) {
	fields := map[string][]string{
		protocol.TypeHello: {"_reqId", "meshId", "memberId", "pubkey", "sessionId", "cwd", "signature", "hostname",
			"displayName", "groups", "capabilities"},
		protocol.TypeSend:          {"_reqId", "id", "targetSpec", "priority", "nonce", "ciphertext", "client_message_id"},
		protocol.TypeClientAck:     {"_reqId", "brokerMessageId"},
		protocol.TypeSetStatus:     {"_reqId", "status", "source"},
		protocol.TypeSetSummary:    {"_reqId", "summary"},
		protocol.TypeJoinGroup:     {"_reqId", "name"},
		protocol.TypeLeaveGroup:    {"_reqId", "name"},
		protocol.TypeMessageStatus: {"_reqId", "messageId"},
		protocol.TypeListPeers:     {"_reqId"},
	}
	for typ, fs := range fields {
		for _, field := range fs {
			if _, err := decode(frameWith(typ, field, []byte("x\x00y"), true)); err == nil {
				t.Errorf("%s.%s with NUL accepted", typ, field)
			}
		}
	}
}
