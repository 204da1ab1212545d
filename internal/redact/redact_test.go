package redact

import (
	"bytes"
	"encoding/base64"
	"mime/quotedprintable"
	"net/url"
	"strings"
	"testing"
	"unicode"

	"github.com/caddy-authmail/authmail/internal/redact/redacttest"
)

const (
	clientSecret = "ZQcsecretA1b2/C3d4+E5"
	googleToken  = "1//0gZQrefresh-Tok_en+42/xyz"
)

// form is a refresh request's body as x/oauth2 sends it.
func form() string {
	return url.Values{"client_id": {"app"}, "client_secret": {clientSecret}, "grant_type": {"refresh_token"},
		"refresh_token": {googleToken}, "scope": {"https://mail.google.com/"}}.Encode()
}

func leaks(out, secret string) string { return redacttest.Leak(out, secret) }

// TestLineRemovesEveryEncoding: a token endpoint's description that
// echoes the refresh form raw, URL-encoded, JSON-escaped, base64'd at
// every alignment and quoted-printable keeps none of the secrets, and
// says what it was about.
func TestLineRemovesEveryEncoding(t *testing.T) {
	f := form()
	jsonEscaped := strings.NewReplacer("/", `\/`, "+", `\u002B`, "&", `\u0026`).Replace(f)
	var qp bytes.Buffer
	w := quotedprintable.NewWriter(&qp)
	_, _ = w.Write([]byte(clientSecret + " " + googleToken))
	_ = w.Close()
	for name, text := range map[string]string{
		"raw":               "bad client " + clientSecret + " and token " + googleToken,
		"form":              "invalid request: " + f,
		"form lower hex":    "invalid request: " + strings.NewReplacer("%2F", "%2f", "%2B", "%2b").Replace(f),
		"form in a query":   "see https://example.com/err?req=" + url.QueryEscape(f),
		"json escaped":      `{"echo":"` + jsonEscaped + `"}`,
		"json of secrets":   `{"cs":"` + strings.ReplaceAll(clientSecret, "/", `\/`) + `","rt":"` + strings.ReplaceAll(googleToken, "/", `\u002f`) + `"}`,
		"base64 form":       "request was " + base64.StdEncoding.EncodeToString([]byte(f)),
		"base64 form 1":     "request was " + base64.StdEncoding.EncodeToString([]byte("x"+f)),
		"base64 form 2":     "request was " + base64.RawURLEncoding.EncodeToString([]byte("xy"+f)),
		"base64 secrets":    base64.StdEncoding.EncodeToString([]byte(clientSecret)) + " " + base64.RawURLEncoding.EncodeToString([]byte(googleToken)),
		"url-encoded b64":   url.QueryEscape(base64.StdEncoding.EncodeToString([]byte("\x00user\x00" + clientSecret))),
		"auth plain echo":   "535 5.7.8 AUTH " + base64.StdEncoding.EncodeToString([]byte("\x00mailer@example.com\x00"+clientSecret)),
		"xoauth2 echo":      "535 " + base64.StdEncoding.EncodeToString([]byte("user=mailer@example.com\x01auth=Bearer "+googleToken+"\x01\x01")),
		"quoted-printable":  "body: " + qp.String(),
		"control chars":     "ZQc\x1b[31m" + clientSecret + "\x00 " + googleToken[:4] + "\u202e" + googleToken[4:],
		"secret in the key": clientSecret + "=1",
	} {
		t.Run(name, func(t *testing.T) {
			out := Line(text, 2000, clientSecret, googleToken)
			for _, s := range []string{clientSecret, googleToken} {
				if e := leaks(out, s); e != "" {
					t.Fatalf("%q shows %q:\n%s", out, e, text)
				}
			}
			if !strings.Contains(out, Marker) {
				t.Fatalf("nothing redacted: %q", out)
			}
		})
	}
	// the names stay, so that the message still says what was wrong
	if out := Line("invalid request: "+f, 2000, clientSecret, googleToken); !strings.Contains(out, "client_secret=[redacted]") ||
		!strings.Contains(out, "refresh_token=[redacted]") || !strings.Contains(out, "grant_type=refresh_token") {
		t.Fatalf("%q", out)
	}
}

// TestLineRemovesSecretNamedValues: values of secret-named pairs go
// whatever they are, in the forms servers write them; prose and other
// pairs stay.
func TestLineRemovesSecretNamedValues(t *testing.T) {
	for in, want := range map[string]string{
		"client_secret=abc123&client_id=app":                               "client_secret=[redacted]&client_id=app",
		`{"refresh_token":"1//0g-xy","error":"x"}`:                         `{"refresh_token":"[redacted]","error":"x"}`,
		`{"access_token": "ya29.a0Af", "n": 1}`:                            `{"access_token": "[redacted]", "n": 1}`,
		`{\"password\":\"hunter22\"}`:                                      `{\"password\":\"[redacted]\"}`,
		"'client_assertion': 'eyJhbGc.eyJ.sig'":                            "'client_assertion': '[redacted]'",
		"code=4/0AX4XfWh&state=s":                                          "code=[redacted]&state=s",
		"X-Api-Key = k-123 rest":                                           "X-Api-Key = [redacted] rest",
		"user=u\x01auth=Bearer ya29.token\x01\x01":                         "user=u auth=[redacted]",
		"refresh_token%3D1%2F%2F0gxyz%26scope%3Dmail":                      "refresh_token%3D[redacted]%26scope%3Dmail",
		"smtp_password=p4ss; error_code=invalid_grant":                     "smtp_password=[redacted]; error_code=invalid_grant",
		"fetching an OAuth2 access token: the token endpoint answered 400": "fetching an OAuth2 access token: the token endpoint answered 400",
		"grant_type=refresh_token":                                         "grant_type=refresh_token",
		"the token is not valid; password: check it":                       "the token is not valid; password: check it",
		"client_secret=[redacted]":                                         "client_secret=[redacted]",
	} {
		if got := Line(in, 300); got != want {
			t.Errorf("%q\n got %q\nwant %q", in, got, want)
		}
	}
	// base64 of a form with an unknown secret: the value's characters go
	b64 := base64.StdEncoding.EncodeToString([]byte("grant_type=refresh_token&refresh_token=Unknown-Rotated-Token-0123456789&scope=x"))
	out := Line("echo "+b64, 300)
	if out == "echo "+b64 || strings.Contains(out, base64.StdEncoding.EncodeToString([]byte("Unknown-Rotated-Token-0123456789"))[4:20]) {
		t.Fatalf("%q", out)
	}
}

// TestLineIsOneBoundedLine: no control or format characters, at most
// max bytes, cut between characters, and plain text passes unchanged.
func TestLineIsOneBoundedLine(t *testing.T) {
	in := "  550 5.7.1\r\n  rejected:\x1b[2J \u202eevil\u200b é" + strings.Repeat("ü", 300) + "\xff"
	out := Line(in, 100, clientSecret)
	if len(out) > 100 || !strings.HasPrefix(out, "550 5.7.1 rejected: [2J evil é") {
		t.Fatalf("%d bytes: %q", len(out), out)
	}
	for _, r := range out {
		if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) {
			t.Fatalf("%q holds %U", out, r)
		}
	}
	plain := "the SMTP server rejected the message at rcpt: 550 5.1.1 <jane@example.org>: user unknown"
	if got := Line(plain, 300, clientSecret, googleToken); got != plain {
		t.Fatalf("%q", got)
	}
	if got := Line(strings.Repeat("a", 40000)+clientSecret, 300, clientSecret); len(got) != 300 {
		t.Fatalf("%d bytes", len(got))
	}
	// a secret cut in two by the input bound shows no half
	long := strings.Repeat("x ", (maxInput-10)/2) + base64.StdEncoding.EncodeToString([]byte(strings.Repeat(clientSecret, 3)))
	if got := Line(long, maxInput, clientSecret); strings.Contains(got, base64.StdEncoding.EncodeToString([]byte(clientSecret))[:8]) {
		t.Fatalf("half a secret shows at the cut: …%s", got[len(got)-40:])
	}
}

// TestLineWithholdsWhatItCannotClean: a secret that the marker, or the
// removal of a control character, would complete is not shown either.
func TestLineWithholdsWhatItCannotClean(t *testing.T) {
	for _, tc := range []struct{ text, secret string }{
		{"ted]abcdabcd", "ted]abcd"},
		{"abc\x00def\x00ghij", "abc def ghij"},
		{"xx[redacted]yy", "redacted"},
	} {
		out := Line(tc.text, 300, tc.secret)
		if leaks(out, tc.secret) != "" {
			t.Errorf("%q: %q", tc.text, out)
		}
	}
}

func TestCode(t *testing.T) {
	for code, want := range map[string]string{
		"invalid_grant":                   "invalid_grant",
		"invalid_client:" + clientSecret:  "other",
		"Invalid Grant":                   "other",
		"":                                "other",
		strings.Repeat("a", 65):           "other",
		"zqcsecret_lower_only":            "other",
		"temporarily_unavailable":         "temporarily_unavailable",
		"invalid_grant\nforged log entry": "other",
	} {
		if got := Code(code, "other", clientSecret, "zqcsecret_lower_only"); got != want {
			t.Errorf("%q: got %q, want %q", code, got, want)
		}
	}
}

// TestLineRemovesEachEncodingAlone: each form redacttest knows, of
// secrets with reserved, non-ASCII and binary bytes, inside prose and
// glued to base64-looking text.
func TestLineRemovesEachEncodingAlone(t *testing.T) {
	for _, secret := range []string{clientSecret, googleToken, "pass word&=?#%", "sécrét-ünïcode-€", "\x00\xff\x10binary\x7f\x80", "abcdefgh", "🔑-key-s3cret"} {
		for _, e := range redacttest.Encodings(secret) {
			for _, text := range []string{"pre " + e + " post", "QUJD" + e + "REVG", e, `"` + e + `"`} {
				out := Line(text, 1000, secret)
				if l := redacttest.Leak(out, secret); l != "" {
					t.Errorf("secret %q in %q: %q shows %q", secret, text, out, l)
				}
			}
		}
	}
}
