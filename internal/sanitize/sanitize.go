// Package sanitize makes text that other members control safe to show: on
// a terminal (escape sequences could move the cursor, rewrite the title,
// set a clipboard through OSC 52 or hide what follows) and to Claude (a
// forged line break in a name or a summary reads like a new line of the
// CLI's own output; bidirectional overrides make text read differently
// from what it is). Everything a peer chose — display names, cwd,
// hostnames, summaries, groups, node names, message text — goes through
// Line or Text before the CLI prints it or hands it to Claude.
//
// No library fit: terminal-escape strippers (such as charmbracelet/x/ansi's
// Strip) keep C0 controls and line breaks and know nothing of bidi
// controls, so this is one careful pass over the runes, fuzzed for its
// invariants.
package sanitize

import (
	"strings"
	"unicode/utf8"
)

// Line returns s as one safe line: escape sequences removed, every control
// character and line or paragraph separator turned into a space, runs of
// spaces collapsed, bidirectional controls and invisible characters
// removed, invalid UTF-8 replaced by U+FFFD, leading and trailing spaces
// trimmed.
func Line(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	space := false // a space is pending
	walk(s, func(r rune) {
		if r == ' ' || r == '\n' || r == '\t' {
			space = b.Len() > 0
			return
		}
		if space {
			b.WriteByte(' ')
			space = false
		}
		b.WriteRune(r)
	}, ' ')
	return b.String()
}

// Text returns s as safe multi-line text: like Line, but newlines and tabs
// are kept, and CR, CRLF, NEL and the Unicode line and paragraph
// separators become a newline. Other control characters are removed.
func Text(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	walk(s, func(r rune) { b.WriteRune(r) }, '\n')
	return b.String()
}

// Clip is Line cut to at most n runes, with "…" when it was longer.
func Clip(s string, n int) string {
	s = Line(s)
	if n <= 0 || utf8.RuneCountInString(s) <= n {
		return s
	}
	i, count := 0, 0
	for i = range s {
		if count == n-1 {
			break
		}
		count++
	}
	return strings.TrimRight(s[:i], " ") + "…"
}

// FingerprintLen is how many hex digits of a pubkey name a member next to
// its display name: 32 bits, so a key with a chosen prefix takes billions
// of key generations to find, while staying short enough to read.
const FingerprintLen = 8

// Fingerprint is the start of a pubkey, lowercased; "" when pubkey is not
// hex.
func Fingerprint(pubkey string) string {
	if len(pubkey) < FingerprintLen {
		return ""
	}
	fp := strings.ToLower(pubkey[:FingerprintLen])
	if strings.Trim(fp, "0123456789abcdef") != "" {
		return ""
	}
	return fp
}

// MaxNameRunes bounds a display name as shown (the broker allows 128
// bytes; a name that fills a terminal line is a way to push the
// fingerprint out of sight).
const MaxNameRunes = 48

// Name shows a member as "alice (3f9a2c81)": the sanitized display name and
// the key fingerprint, which another member cannot copy.
func Name(name, pubkey string) string {
	n := Clip(name, MaxNameRunes)
	fp := Fingerprint(pubkey)
	switch {
	case fp == "":
		return n
	case n == "":
		return "(" + fp + ")"
	}
	return n + " (" + fp + ")"
}

// walk decodes s and calls emit for every rune that may be shown, with
// line breaks as '\n' (emitted as brk) and controls dropped or, for tabs
// and line breaks, passed on.
func walk(s string, emit func(rune), brk rune) {
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size <= 1 {
			// Invalid UTF-8: a lone 0x9b byte is CSI to an 8-bit terminal.
			emit(utf8.RuneError)
			i++
			continue
		}
		switch {
		case r == 0x1b:
			i += 1 + escapeLen(s[i+1:])
			continue
		case r >= 0x80 && r <= 0x9f:
			i += size
			switch {
			case r == 0x85: // NEL
				emit(brk)
			case r == 0x9b: // CSI
				i += csiLen(s[i:])
			case isStringIntro(r):
				i += stringLen(s[i:])
			}
			continue
		case r == '\r':
			emit(brk)
			if i+1 < len(s) && s[i+1] == '\n' {
				i++
			}
		case r == '\n':
			emit(brk)
		case r == '\t':
			if brk == ' ' {
				emit(' ')
			} else {
				emit('\t')
			}
		case r < 0x20 || r == 0x7f:
			// other C0 controls and DEL: dropped
		case r == 0x2028 || r == 0x2029:
			emit(brk)
		case invisible(r):
		default:
			emit(r)
		}
		i += size
	}
}

// isStringIntro reports C1 controls that open a control string ended by
// ST: DCS, SOS, OSC, PM, APC.
func isStringIntro(r rune) bool {
	return r == 0x90 || r == 0x98 || r == 0x9d || r == 0x9e || r == 0x9f
}

// escapeLen is how many bytes of rest belong to the escape sequence whose
// ESC came just before it. An unterminated control string only loses its
// introducer, so a stray OSC cannot hide the rest of a message.
func escapeLen(rest string) int {
	if rest == "" {
		return 0
	}
	c := rest[0]
	switch {
	case c == '[':
		return 1 + csiLen(rest[1:])
	case c == ']' || c == 'P' || c == 'X' || c == '^' || c == '_':
		return 1 + stringLen(rest[1:])
	case c >= 0x20 && c <= 0x2f: // nF: intermediates, then a final byte
		n := 0
		for n < len(rest) && rest[n] >= 0x20 && rest[n] <= 0x2f {
			n++
		}
		if n < len(rest) && rest[n] >= 0x30 && rest[n] <= 0x7e {
			n++
		}
		return n
	case c >= 0x30 && c <= 0x7e: // two-byte escape (ESC 7, ESC c, …)
		return 1
	}
	return 0
}

// csiLen is the length of a CSI sequence's parameters, intermediates and
// final byte.
func csiLen(s string) int {
	n := 0
	for n < len(s) && s[n] >= 0x30 && s[n] <= 0x3f {
		n++
	}
	for n < len(s) && s[n] >= 0x20 && s[n] <= 0x2f {
		n++
	}
	if n < len(s) && s[n] >= 0x40 && s[n] <= 0x7e {
		n++
	}
	return n
}

// maxControlString bounds how far a control string is looked for its end:
// a real title or hyperlink is short; past that it is text.
const maxControlString = 4096

// stringLen is the length of a control string's body and terminator (BEL,
// ESC \ or U+009C), or 0 when it is not terminated within reach.
func stringLen(s string) int {
	limit := min(len(s), maxControlString)
	for n := 0; n < limit; n++ {
		switch {
		case s[n] == 0x07:
			return n + 1
		case s[n] == 0x1b && n+1 < len(s) && s[n+1] == '\\':
			return n + 2
		case s[n] == 0xc2 && n+1 < len(s) && s[n+1] == 0x9c:
			return n + 2
		}
	}
	return 0
}

// invisible reports characters that change how text reads without being
// seen: bidirectional embeddings, overrides, isolates and marks, zero-width
// spaces, the word joiner and invisible operators, the BOM.
func invisible(r rune) bool {
	switch {
	case r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069:
		return true // bidi embeddings, overrides, isolates
	case r == 0x200e || r == 0x200f || r == 0x061c:
		return true // bidi marks
	case r == 0x200b, r >= 0x2060 && r <= 0x2064, r == 0xfeff, r == 0x180e, r == 0x00ad:
		return true // zero-width space, word joiner, invisible operators, BOM, Mongolian vowel separator, soft hyphen
	}
	return false
}

// JSON escapes, in encoded JSON, the runes encoding/json leaves raw that a
// terminal or a reader may act on: C1 controls (an 8-bit CSI) and the
// invisible characters of invisible. The data is unchanged once decoded;
// only its printed form is safe. Such runes can only occur inside JSON
// strings, where \uXXXX means the same rune.
func JSON(b []byte) []byte {
	var out []byte
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		if (r >= 0x80 && r <= 0x9f) || invisible(r) {
			if out == nil {
				out = append(make([]byte, 0, len(b)+16), b[:i]...)
			}
			out = append(out, `\u`...)
			out = append(out, hexDigits[r>>12&0xf], hexDigits[r>>8&0xf], hexDigits[r>>4&0xf], hexDigits[r&0xf])
		} else if out != nil {
			out = append(out, b[i:i+size]...)
		}
		i += size
	}
	if out == nil {
		return b
	}
	return out
}

const hexDigits = "0123456789abcdef"
