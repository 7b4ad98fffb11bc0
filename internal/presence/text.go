package presence

import (
	"bytes"
	"encoding/json"
	"unicode/utf8"
)

// Marshal renders v as JSON without HTML escaping: encoding/json's default
// writes each <, > and & as six bytes, which made peer-chosen text up to
// six times larger in gossip and in peers_list than the limits it was
// checked against.
func Marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte{'\n'}), nil
}

// runeJSONLen is how many bytes encoding/json (without HTML escaping)
// writes for the rune r, which takes size bytes of the input (an invalid
// byte has r == utf8.RuneError and size 1).
func runeJSONLen(r rune, size int) int {
	switch {
	case r == '"' || r == '\\' || r == '\n' || r == '\r' || r == '\t' || r == '\b' || r == '\f':
		return 2
	case r < 0x20:
		return 6 // \u00XX
	case r == utf8.RuneError && size == 1:
		return 6 // invalid UTF-8 becomes \ufffd
	case r == '\u2028' || r == '\u2029':
		return 6
	}
	return size
}

// JSONLen is the length of s once encoded as a JSON string by Marshal,
// without the quotes.
func JSONLen(s string) int {
	n := 0
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		n += runeJSONLen(r, size)
		i += size
	}
	return n
}

// TruncateJSON shortens s so that its JSON encoding (JSONLen) takes at
// most n bytes, without splitting a UTF-8 sequence.
func TruncateJSON(s string, n int) string {
	used := 0
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		w := runeJSONLen(r, size)
		if used+w > n {
			return s[:i]
		}
		used += w
		i += size
	}
	return s
}
