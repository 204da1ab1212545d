package authmail

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzVerifyRequests feeds arbitrary bodies to /verify/otp and
// /verify/token. Every answer is a JSON object with a known status and
// error code; a 422 names its field (or is a wrong code with
// attempts_left), and nothing unknown is ever valid.
func FuzzVerifyRequests(f *testing.F) {
	for _, s := range []string{
		`{"challenge_id":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","code":"123456"}`,
		`{"challenge_id":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","code":"1","ip":"2001:db8::1"}`,
		`{"challenge_id":"____________________________________________","code":" "}`,
		`{"challenge_id":"x","code":"1","ip":"fe80::1%eth0"}`,
		`{"token":"t0k","flow":"magic-link"}`,
		`{"token":"t0k","flow":"email-change","ip":"203.0.113.9"}`,
		`{"token":"","flow":"otp"}`,
		`{"token":"\u0000","flow":"verify-email","extra":true}`,
		`{"code":"` + strings.Repeat("9", 65) + `"}`,
		`[]`, `null`, `{"token":1}`, ``, `{"challenge_id":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","code":"1"} {}`,
	} {
		f.Add(s)
	}
	h := provisionedHandler(f, withCodes(f), withoutLimits, func(h *Handler) { h.AuthFailures = "off" })
	f.Fuzz(func(t *testing.T, body string) {
		for _, path := range []string{"/authmail/verify/otp", "/authmail/verify/token"} {
			rec := httptest.NewRecorder()
			if err := h.ServeHTTP(rec, apiRequest("POST", path, strings.NewReader(body)), nil); err != nil {
				t.Fatal(err)
			}
			var out map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
				t.Fatalf("%s: answer is not a JSON object: %q", path, rec.Body)
			}
			code, _ := out["error_code"].(string)
			switch rec.Code {
			case 400:
				if code != "invalid_json" && code != "invalid_request" {
					t.Fatalf("%s: 400 %v", path, out)
				}
			case 404:
				if code != "not_found" {
					t.Fatalf("%s: 404 %v", path, out)
				}
			case 422:
				if code != "invalid_request" || out["field"] == nil {
					t.Fatalf("%s: 422 %v for %q", path, out, body)
				}
			default:
				t.Fatalf("%s: %d %v for %q (nothing was issued, so nothing can be valid)", path, rec.Code, out, body)
			}
		}
	})
}

// FuzzIssuedRequests feeds arbitrary bodies to the flows that can issue
// a code or token. A request is refused with a 4xx and a field, or its
// issued value is in the rendered message, drawn from the alphabet (a
// code) or 43 URL-safe characters (a token), with a valid purpose.
func FuzzIssuedRequests(f *testing.F) {
	for _, s := range []string{
		`{"to":"a@example.com","code":"auto"}`,
		`{"to":"a@example.com","code":"auto","purpose":"2fa_setup","expires_in_minutes":3}`,
		`{"to":"a@example.com","code":"auto","purpose":"Login!"}`,
		`{"to":"a@example.com","code":"424242","purpose":"login"}`,
		`{"to":"a@example.com","token":"auto"}`,
		`{"to":"a@example.com","token":"auto","old_email":"old@example.com"}`,
		`{"to":"a@example.com","token":"auto","link":"https://app.example.com/x"}`,
		`{"to":"a@example.com","token":"auto","base_url":"https://app.example.com/in"}`,
		`{"to":"a@example.com"}`, `{"to":"a@example.com","code":"AUTO"}`,
	} {
		f.Add(s)
	}
	h := provisionedHandler(f, withCodes(f, func(c *Codes) { c.Alphabet = "ABCDEFGHJK" }))
	eps := []*endpoint{endpoints["/send/otp"], endpoints["/send/magic-link"], endpoints["/send/password-reset"],
		endpoints["/send/verify-email"], endpoints["/send/email-change"]}
	f.Fuzz(func(t *testing.T, body string) {
		for _, ep := range eps {
			msgs, _, aerr := h.prepare(ep, []byte(body))
			if aerr != nil {
				if aerr.Status == 422 && aerr.Field == "" || aerr.Status != 400 && aerr.Status != 422 {
					t.Fatalf("%s: %d %v", ep.path, aerr.Status, aerr)
				}
				continue
			}
			v := issuedOf(msgs)
			if v == nil {
				continue
			}
			if !strings.Contains(msgs[0].text, v.value) {
				t.Fatalf("%s: the issued value is not in the message", ep.path)
			}
			for _, m := range msgs[1:] {
				if strings.Contains(m.text, v.value) || strings.Contains(m.html, v.value) {
					t.Fatalf("%s: the issued value is in the notice", ep.path)
				}
			}
			if v.otp {
				if len(v.value) != 6 || strings.Trim(v.value, "ABCDEFGHJK") != "" || !purposePattern.MatchString(v.purpose) {
					t.Fatalf("%s: issued code %q purpose %q", ep.path, v.value, v.purpose)
				}
			} else if len(v.value) != 43 || strings.Trim(v.value, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") != "" || v.flow != ep.flow {
				t.Fatalf("%s: issued token %q flow %q", ep.path, v.value, v.flow)
			}
		}
	})
}
