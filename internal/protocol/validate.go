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
