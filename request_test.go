package authmail

import (
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestParseAddress(t *testing.T) {
	good := map[string]mailAddr{
		"jane@example.com":                      {Addr: "jane@example.com"},
		"  jane@example.com ":                   {Addr: "jane@example.com"},
		"Jane Doe <jane@example.com>":           {Name: "Jane Doe", Addr: "jane@example.com"},
		`"Doe, Jane" <jane@example.com>`:        {Name: "Doe, Jane", Addr: "jane@example.com"},
		"jane@EXAMPLE.com":                      {Addr: "jane@example.com"},
		"jörg@xn--bcher-kva.example":            {},
		"jane@bücher.example":                   {Addr: "jane@xn--bcher-kva.example"},
		"Jörg <j@example.com>":                  {Name: "Jörg", Addr: "j@example.com"},
		"ops+alerts@example.com":                {Addr: "ops+alerts@example.com"},
		`"quoted"@example.com`:                  {Addr: "quoted@example.com"}, // needs no quotes
		"o'brien&co@example.com":                {Addr: "o'brien&co@example.com"},
		"user@[192.0.2.1]":                      {Addr: "user@[192.0.2.1]"},
		"=?utf-8?q?J=C3=B6rg?= <j@example.com>": {Name: "Jörg", Addr: "j@example.com"},
		`"CORP\\jane" <jane@example.com>`:       {Name: `CORP\jane`, Addr: "jane@example.com"}, // ASCII: quoted, fine
	}
	for in, want := range good {
		got, problem := parseAddress(in)
		if want.Addr == "" { // expected to fail (non-ASCII local part)
			if problem == "" {
				t.Errorf("%q: accepted as %+v, want a refusal", in, got)
			}
			continue
		}
		if problem != "" || got != want {
			t.Errorf("%q: got %+v %q, want %+v", in, got, problem, want)
		}
	}
	bad := map[string]string{
		"":                                       "must not be empty",
		"   ":                                    "must not be empty",
		"not-an-address":                         "not a valid email address",
		"a@x.com, b@y.com":                       "exactly one address",
		"a@x.com\r\nBcc: evil@evil.example":      "line breaks",
		"a@x.com\nX: y":                          "line breaks",
		"=?utf-8?b?RXZpbA0KQmNjOiB4?= <a@x.com>": "display name with line breaks",
		"Evil\r\n <a@x.com>":                     "line breaks",
		"a\x00@x.com":                            "control characters",
		"a b@example.com":                        "not a valid email address",
		// found by FuzzParseAddress: net/mail unquotes the local part
		`" "@0`:                            "needs quoting",
		`"john doe"@example.com`:           "needs quoting",
		`"john..doe"@example.com`:          "needs quoting",
		`"a\"b"@example.com`:               "needs quoting",
		"a@-bad-.example":                  "invalid domain",
		strings.Repeat("a", 65) + "@x.com": "longer than 64",
		"user@[300.1.1.1]":                 "",
		// found by FuzzParseAddress: the name decodes to invalid UTF-8
		"=?utf-8?B?0000XC00?=<0@0>": "display name that is not valid UTF-8",
		// net/mail would write it as a Q-encoded word with a raw backslash
		`"CORP\\Jürgen" <j@example.com>`:           "backslash together with non-ASCII",
		"=?utf-8?q?CORP=5CJ=C3=BCrgen?= <j@x.com>": "backslash together with non-ASCII",
		"a@" + strings.Repeat("b", 250) + ".com":   "",
		// encoded words net/mail leaves as they are, which clients decode
		`"=?UTF-8?B?SGkNCkJjYzogZXZpbA==?=" <a@x.com>`:           "encoded word (=?…?=) that decodes to line breaks",
		"=?UTF-8?B?SGkNCkJjYzogZXZpbA?= <a@x.com>":               "encoded word (=?…?=) that decodes to line breaks",
		"=?UTF-8?B?PT9VVEYtOD9RP0hpPTBEPTBBQmM/PQ==?= <a@x.com>": "encoded word",
		"Jane\u2028Doe <a@x.com>":                                "line or paragraph separators",
	}
	for in, want := range bad {
		_, problem := parseAddress(in)
		if problem == "" || !strings.Contains(problem, want) {
			t.Errorf("%q: problem %q, want one containing %q", in, problem, want)
		}
	}
}

func TestDecodeJSONErrors(t *testing.T) {
	type req = otpRequest
	cases := map[string]struct {
		body   string
		status int
		code   string
		field  string
	}{
		"empty":          {"", 400, "invalid_json", ""},
		"malformed":      {`{"to": }`, 400, "invalid_json", ""},
		"truncated":      {`{"to":"a@x.com"`, 400, "invalid_json", ""},
		"not an object":  {`["a"]`, 400, "invalid_json", ""},
		"trailing data":  {`{"to":"a@x.com"}{}`, 400, "invalid_json", ""},
		"unknown field":  {`{"to":"a@x.com","cc":"b@x.com"}`, 422, "invalid_request", "cc"},
		"wrong type":     {`{"to":"a@x.com","code":123456}`, 422, "invalid_request", "code"},
		"wrong to type":  {`{"to":{"a":1}}`, 422, "invalid_request", "to"},
		"float expiry":   {`{"expires_in_minutes":1.5}`, 422, "invalid_request", "expires_in_minutes"},
		"list of number": {`{"to":["a@x.com",1]}`, 422, "invalid_request", "to"},
		// encoding/json keeps the last of duplicate keys and matches
		// field names case-insensitively
		"duplicate key":      {`{"to":"a@x.com","to":"b@evil.example"}`, 400, "invalid_json", "to"},
		"escaped duplicate":  {`{"to":"a@x.com","\u0074o":"b@evil.example"}`, 400, "invalid_json", "to"},
		"case variant":       {`{"to":"a@x.com","TO":"b@evil.example"}`, 400, "invalid_json", "TO"},
		"lone case variant":  {`{"Code":"1"}`, 400, "invalid_json", "Code"},
		"kelvin sign":        {`{"to":"a@x.com","code":"1","webhoo\u212a_url":"https://h.example/"}`, 400, "invalid_json", "webhoo\u212a_url"},
		"embedded field":     {`{"webhook_secret":"a","WEBHOOK_SECRET":"b"}`, 400, "invalid_json", "WEBHOOK_SECRET"},
		"nested duplicate":   {`{"to":["a@x.com",{"k":1,"k":2}]}`, 400, "invalid_json", "k"},
		"duplicate value ok": {`{"to":"to","code":"to"}`, 0, "", ""},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			var r req
			err := decodeJSON([]byte(tc.body), &r)
			if tc.status == 0 {
				if err != nil {
					t.Fatalf("refused: %+v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("expected an error")
			}
			if err.Status != tc.status || err.Code != tc.code || err.Field != tc.field {
				t.Fatalf("got %d %s field %q (%s), want %d %s field %q", err.Status, err.Code, err.Field, err.Message, tc.status, tc.code, tc.field)
			}
		})
	}
	var r sendRequest
	if err := decodeJSON([]byte(`{"to":["a@x.com","b@y.com"],"cc":"c@z.com","bcc":null}`), &r); err != nil {
		t.Fatal(err)
	}
	if len(r.To) != 2 || len(r.Cc) != 1 || r.Bcc != nil {
		t.Fatalf("decoded %+v", r)
	}
}

func TestAddressListLimits(t *testing.T) {
	many := make(addressList, maxAddressesPerField+1)
	for i := range many {
		many[i] = "a@example.com"
	}
	if _, err := many.addresses("to", true); err == nil || !strings.Contains(err.Message, "at most 100") {
		t.Fatalf("101 addresses: %v", err)
	}
	if _, err := (addressList{"a@x.com", "b@y.com"}).single("to"); err == nil || err.Field != "to" {
		t.Fatalf("two addresses for a single field: %v", err)
	}
	if _, err := (addressList{"a@x.com", "bad"}).addresses("cc", false); err == nil || !strings.Contains(err.Message, "entry 2") {
		t.Fatalf("bad second entry: %v", err)
	}
	if _, err := (addressList(nil)).addresses("to", true); err == nil || err.Message != "to is required" {
		t.Fatalf("missing: %v", err)
	}
}

func TestCheckCodeAndToken(t *testing.T) {
	for _, ok := range []string{"1", "123456", "ABC-DEF", "1234 5678", strings.Repeat("x", 64), "ünï"} {
		if err := checkCode(ok); err != nil {
			t.Errorf("code %q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", strings.Repeat("x", 65), "12\n34", "12\t34", " 1234", "12\x0034"} {
		if err := checkCode(bad); err == nil {
			t.Errorf("code %q accepted", bad)
		}
	}
	for _, bad := range []string{"a\tb", "a\nb", strings.Repeat("x", maxTokenBytes+1)} {
		if err := checkToken(bad); err == nil {
			t.Errorf("token %q accepted", bad)
		}
	}
}

func TestOrigin(t *testing.T) {
	cases := map[string]string{
		"https://App.Example.com":         "https://app.example.com",
		"https://app.example.com:443/x?y": "https://app.example.com",
		"http://app.example.com:80":       "http://app.example.com",
		"http://localhost:8080/path":      "http://localhost:8080",
		"https://bücher.example/":         "https://xn--bcher-kva.example",
		"https://[::1]:8443/":             "https://[::1]:8443",
	}
	for in, want := range cases {
		u, p := parseHTTPURL(in)
		if p != "" {
			t.Fatalf("%s: %s", in, p)
		}
		if got := origin(u); got != want {
			t.Errorf("origin(%s) = %s, want %s", in, got, want)
		}
	}
	for _, bad := range []string{"ftp://x.example", "/relative", "https://user:pw@x.example/", "javascript:alert(1)", "https://x.example/a b", "https:///nohost"} {
		if _, p := parseHTTPURL(bad); p == "" {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestBuildLink(t *testing.T) {
	h := &Handler{baseURL: "https://app.example.com/auth", baseOrigin: "https://app.example.com", origins: []string{"https://app.example.com"},
		Links: map[string]string{"password-reset": "https://app.example.com/reset?x=1&t={token}"}}
	cases := []struct {
		flow, token, link, base string
		want, code, field       string
	}{
		{"magic-link", "a b/c+d&e", "", "", "https://app.example.com/auth/magic-link?token=a+b%2Fc%2Bd%26e", "", ""},
		{"password-reset", "tok", "", "", "https://app.example.com/reset?x=1&t=tok", "", ""},
		{"verify-email", "tok", "", "https://APP.example.com:443/other/", "https://APP.example.com:443/other/verify-email?token=tok", "", ""},
		{"magic-link", "", "https://app.example.com/m?k=1", "", "https://app.example.com/m?k=1", "", ""},
		{"magic-link", "", "https://evil.example/m", "", "", "link_not_allowed", "link"},
		{"magic-link", "", "http://app.example.com/m", "", "", "link_not_allowed", "link"},
		{"magic-link", "", "https://app.example.com.evil.example/m", "", "", "link_not_allowed", "link"},
		{"magic-link", "tok", "", "https://evil.example", "", "link_not_allowed", "base_url"},
		{"magic-link", "tok", "https://app.example.com/m", "", "", "invalid_request", "link"},
		{"magic-link", "", "", "", "", "invalid_request", "token"},
		{"magic-link", "", "javascript:alert(1)", "", "", "invalid_request", "link"},
		{"magic-link", "tok", "", "https://app.example.com/?q=1", "", "invalid_request", "base_url"},
	}
	for _, tc := range cases {
		got, err := h.buildLink(tc.flow, tc.token, tc.link, tc.base)
		if tc.code == "" {
			if err != nil || got != tc.want {
				t.Errorf("%+v: got %q %v, want %q", tc, got, err, tc.want)
			}
			continue
		}
		if err == nil || err.Code != tc.code || err.Field != tc.field {
			t.Errorf("%+v: got %q %+v, want %s on %s", tc, got, err, tc.code, tc.field)
		}
	}
	// no base_url and no template: a clear message naming the settings
	bare := &Handler{}
	_, err := bare.buildLink("verify-email", "tok", "", "")
	if err == nil || err.Code != "invalid_request" || !strings.Contains(err.Message, "base_url") || !strings.Contains(err.Message, "link verify-email") {
		t.Fatalf("bare handler: %+v", err)
	}
	_, err = bare.buildLink("verify-email", "", "https://app.example.com/x", "")
	if err == nil || err.Code != "link_not_allowed" {
		t.Fatalf("bare handler with caller link: %+v", err)
	}
	// the token is query-escaped and cannot change the link's structure
	got, _ := h.buildLink("magic-link", "x#frag?y=1", "", "")
	if u, perr := url.Parse(got); perr != nil || u.Query().Get("token") != "x#frag?y=1" || u.Fragment != "" {
		t.Fatalf("escaped token link %q", got)
	}
}

func TestParsePrefer(t *testing.T) {
	for in, want := range map[string]preference{
		"respond-async":                   {async: true},
		"wait=5":                          {wait: 5 * time.Second, hasWait: true},
		`wait="7"`:                        {wait: 7 * time.Second, hasWait: true},
		"respond-async, wait=3":           {async: true, wait: 3 * time.Second, hasWait: true},
		"Wait = 2 ; x=y":                  {wait: 2 * time.Second, hasWait: true},
		"wait=301":                        {wait: maxPreferWait, hasWait: true},
		"wait=99999999999999999":          {wait: maxPreferWait, hasWait: true}, // no overflow
		"wait=9223372036854775807":        {wait: maxPreferWait, hasWait: true},
		"wait=-1":                         {},
		"wait=abc":                        {},
		"return=minimal, handling=strict": {},
		"":                                {},
	} {
		if got := parsePrefer([]string{in}); got != want {
			t.Errorf("Prefer %q: got %+v, want %+v", in, got, want)
		}
	}
}

// TestUserNameThatCannotBeADisplayNameInEmailChange: a user_name that
// cannot be encoded as a display name (a backslash with non-ASCII) still
// greets the user, but neither the confirmation nor the notice to the
// old address carries it in To.
func TestUserNameThatCannotBeADisplayNameInEmailChange(t *testing.T) {
	h := provisionedHandler(t)
	msgs, _, aerr := h.prepare(endpoints["/send/email-change"], []byte(`{"to":"new@example.com","old_email":"old@example.com","user_name":"CORP\\Jürgen","token":"abc"}`))
	if aerr != nil {
		t.Fatal(aerr)
	}
	if len(msgs) != 2 {
		t.Fatalf("%d messages", len(msgs))
	}
	for _, m := range msgs {
		if m.to[0].Name != "" {
			t.Errorf("%s: display name %q", m.to[0].Addr, m.to[0].Name)
		}
		env, err := h.buildEnvelope(m, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		hdr, _, _ := strings.Cut(string(env.Data), "\r\n\r\n")
		if !strings.Contains(hdr, "\r\nTo: <"+m.to[0].Addr+">\r\n") {
			t.Errorf("To header of %s:\n%s", m.to[0].Addr, hdr)
		}
	}
}

func TestEncodedWordProblem(t *testing.T) {
	for in, want := range map[string]string{
		"plain text":                   "",
		"=?UTF-8?B?SGk=?= there":       "",
		"=?utf-8?q?J=C3=B6rg?=":        "",
		"=?ISO-8859-1?Q?J=F6rg?=":      "",
		"a=?b":                         "",
		"=?UTF-8?B?SGkNCkJjYzogeA==?=": "decodes to line breaks",
		"=?UTF-8?Q?Hi=0ABcc:_x?=":      "decodes to line breaks",
		"=?UTF-8?Q?a=7Fb?=":            "decodes to line breaks or control characters",
		"=?iso-8859-1?q?a=85b?=":       "decodes to line breaks or control characters", // C1
		"=?UTF-8?B?4oCp?=":             "decodes to line breaks or control characters", // U+2029
		"=?UTF-8?Q?a=0?=":              "does not decode",
		"=?UTF-8?B?@@@@?=":             "does not decode",
		"=?UTF-8?B?/w==?=":             "not valid UTF-8",
		"=?UTF-7?Q?a+AA0ACg-b?=":       `charset "UTF-7"`,
		"=?windows-1252?Q?caf=E9?=":    `charset "windows-1252"`,
	} {
		got := encodedWordProblem(in)
		if want == "" && got != "" || want != "" && !strings.Contains(got, want) {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
}

func TestLocalRecipientProblem(t *testing.T) {
	for in, want := range map[string]string{
		"a@example.com":           "",
		"a@xn--bcher-kva.example": "",
		"a@[127.0.0.1]":           "domain literal",
		"a@[192.0.2.1]":           "domain literal",
		"a@localhost":             "single-label domain",
		"a@LOCALHOST":             "single-label domain",
		"a@intranet":              "single-label domain",
		"a@127.0.0.1":             "does not start with a letter",
		"a@127.1":                 "does not start with a letter",
		"a@0x7f.0x1":              "does not start with a letter",
		"a@example.123":           "does not start with a letter",
	} {
		a, p := parseAddress(in)
		if p != "" {
			t.Fatalf("%s: %s", in, p)
		}
		got := localRecipientProblem(a)
		if want == "" && got != "" || want != "" && (!strings.Contains(got, want) || !strings.Contains(got, "allow_local_recipients")) {
			t.Errorf("%s: %q, want %q", in, got, want)
		}
	}
	// the setting lets them through; the field and entry are named otherwise
	h := &Handler{}
	err := h.checkRecipients("cc", []mailAddr{{Addr: "a@example.com"}, {Addr: "b@localhost"}})
	if err == nil || err.Field != "cc" || !strings.HasPrefix(err.Message, "cc entry 2 has a single-label domain") {
		t.Fatalf("%+v", err)
	}
	h.AllowLocalRecipients = true
	if err := h.checkRecipients("cc", []mailAddr{{Addr: "b@localhost"}, {Addr: "c@[127.0.0.1]"}}); err != nil {
		t.Fatal(err)
	}
}
