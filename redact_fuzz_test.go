package authmail

import (
	"encoding/base64"
	"net/url"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/caddy-authmail/authmail/internal/redact"
	"github.com/caddy-authmail/authmail/internal/redact/redacttest"
)

// FuzzRedact: for any secret of at least 8 bytes put, in one of its
// encodings (redacttest's, computed apart from the redaction: raw,
// URL-encoded, base64 at each alignment, JSON-escaped, quoted-printable),
// anywhere into any text, the redacted text holds the secret in none of
// them, and is one line of at most max bytes without control or format
// characters. It lives here, not in internal/redact, so that
// scripts/fuzz.sh (which runs this package's targets) runs it.
func FuzzRedact(f *testing.F) {
	form := url.Values{"client_secret": {"ZQcsecretA1b2/C3d4+E5"}, "refresh_token": {"1//0gZQ-refresh"}}.Encode()
	for _, s := range []struct {
		secret, text string
		which        uint8
		at           uint16
	}{
		{"ZQcsecretA1b2/C3d4+E5", "invalid_client: " + form, 0, 0},
		{"1//0gZQ-refresh", `{"error_description":"` + strings.ReplaceAll(form, "/", `\/`) + `"}`, 5, 3},
		{"1//0gZQ-refresh", "echo " + base64.StdEncoding.EncodeToString([]byte("x"+form)), 9, 7},
		{"s3cret-pass", "535 5.7.8 " + base64.StdEncoding.EncodeToString([]byte("\x00user\x00s3cret-pass")), 2, 40},
		{"ted]abcd", "ted]abcdabcd", 0, 0},
		{"abc def ghij", "abc\x00def\x00ghij", 0, 0},
		{"redacted", "xx[redacted]yy", 0, 2},
		{"sécrét-€-🔑", "\u202e\x1b[31m", 14, 1},
		{"\x00\xff\x10binary", "=\r\n%2", 17, 2},
	} {
		f.Add(s.secret, s.text, s.which, s.at)
	}
	f.Fuzz(func(t *testing.T, secret, text string, which uint8, at uint16) {
		if len(secret) < 8 || len(secret) > 256 || len(text) > 4096 {
			return
		}
		encs := redacttest.Encodings(secret)
		e := encs[int(which)%len(encs)]
		i := int(at) % (len(text) + 1)
		in := text[:i] + e + text[i:]
		for _, max := range []int{200, 10000} {
			out := redact.Line(in, max, secret, "client-s3cret-value")
			if l := redacttest.Leak(out, secret); l != "" {
				t.Fatalf("max %d: %q shows the secret %q as %q (input %q)", max, out, secret, l, in)
			}
			if len(out) > max || !utf8.ValidString(out) {
				t.Fatalf("max %d: %d bytes, valid UTF-8 %v: %q", max, len(out), utf8.ValidString(out), out)
			}
			for _, r := range out {
				if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) {
					t.Fatalf("%q holds %U", out, r)
				}
			}
		}
	})
}
