// Package redacttest finds a secret in a text in any of the encodings
// internal/redact promises to remove. It computes them itself, with the
// standard library's encoders, so that a test of the redaction does not
// check it against its own idea of the encodings.
package redacttest

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"mime/quotedprintable"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// Encodings returns the forms of secret that Leak looks for: raw; URL,
// query and path encoded; base64 in both alphabets, padded or not, and
// the part that depends on the secret alone when it sits one or two
// bytes into a longer base64 text; JSON-escaped (Go's, with \/, every
// character as \uXXXX); quoted-printable. The forms with hex escapes
// come with their digits in lower and in upper case. Forms shorter than
// 6 bytes, but the raw secret, are left out: they would match ordinary
// text, and the redaction looks for the secret itself there.
func Encodings(s string) []string {
	out := []string{s}
	add := func(v string) {
		if len(v) >= 6 && !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	// hex adds v with the digits of its escapes in either case; esc
	// rewrites them (of the form's kind only: a literal "=4d" in a JSON
	// form is no escape)
	hex := func(esc func(string, func(string) string) string, v string) {
		add(v)
		add(esc(v, strings.ToLower))
		add(esc(v, strings.ToUpper))
	}
	q := url.QueryEscape(s)
	hex(percent, q)
	hex(percent, strings.ReplaceAll(q, "+", "%20"))
	hex(percent, url.PathEscape(s))
	b := []byte(s)
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		add(enc.EncodeToString(b))
		// b behind pad bytes of a longer base64 text: the characters
		// that depend on b alone
		for pad := 1; pad < 3; pad++ {
			e := enc.EncodeToString(append(bytes.Repeat([]byte{0xA5}, pad), b...))
			if from, to := (pad+2)/3*4, (pad+len(b))/3*4; to > from {
				add(e[from:to])
			}
		}
	}
	unquote := func(j string) string { return strings.TrimSuffix(strings.TrimPrefix(j, `"`), `"`) }
	j, _ := json.Marshal(s)
	hex(jsonEsc, unquote(string(j)))
	hex(jsonEsc, strings.ReplaceAll(unquote(string(j)), "/", `\/`))
	var plain bytes.Buffer
	enc := json.NewEncoder(&plain)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	hex(jsonEsc, unquote(strings.TrimSuffix(plain.String(), "\n")))
	if utf8.ValidString(s) {
		// every character escaped (surrogate pairs above the BMP); of
		// invalid UTF-8 this would not be an encoding: \ufffd stands for
		// any invalid byte
		var all strings.Builder
		for _, r := range s {
			for _, u := range utf16.Encode([]rune{r}) {
				fmt.Fprintf(&all, `\u%04x`, u)
			}
		}
		hex(jsonEsc, all.String())
	}
	for _, binary := range []bool{false, true} {
		var qp bytes.Buffer
		w := quotedprintable.NewWriter(&qp)
		w.Binary = binary
		_, _ = w.Write(b)
		_ = w.Close()
		hex(qpEsc, qp.String())
	}
	return out
}

// percent, qpEsc and jsonEsc rewrite the hex digits of the escapes of
// a form with c: %XX (a literal % is %25), =XX (a literal = is =3D),
// \uXXXX after an even number of backslashes (a literal backslash is
// \\).
func percent(v string, c func(string) string) string { return hexEscapes(percentEscape, v, c) }

func qpEsc(v string, c func(string) string) string { return hexEscapes(qpEscape, v, c) }

var percentEscape, qpEscape = regexp.MustCompile(`%[0-9A-Fa-f]{2}`), regexp.MustCompile(`=[0-9A-Fa-f]{2}`)

// hexEscapes rewrites the two hex digits of each escape re finds with c.
func hexEscapes(re *regexp.Regexp, v string, c func(string) string) string {
	return re.ReplaceAllStringFunc(v, func(e string) string { return e[:1] + c(e[1:]) })
}

func jsonEsc(v string, c func(string) string) string {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		if v[i] != '\\' || i+1 == len(v) {
			b.WriteByte(v[i])
			continue
		}
		if v[i+1] == 'u' && i+6 <= len(v) {
			b.WriteString(`\u` + c(v[i+2:i+6]))
			i += 5
			continue
		}
		b.WriteString(v[i : i+2])
		i++
	}
	return b.String()
}

// Leak returns the first form of a secret that text holds, or "".
// Secrets shorter than 4 bytes are not looked for (redact.MinSecret).
func Leak(text string, secrets ...string) string {
	for _, s := range secrets {
		if len(s) < 4 {
			continue
		}
		for _, e := range Encodings(s) {
			if strings.Contains(text, e) {
				return e
			}
		}
	}
	return ""
}
