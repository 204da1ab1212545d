package authmail

import (
	"bytes"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"net/url"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"
	"golang.org/x/net/html"
	"golang.org/x/net/idna"
)

// provisionedHandler returns a handler provisioned the way Caddy does it,
// delivering into a capture directory, as a fresh instance with its own
// storage.
func provisionedHandler(t testing.TB, mods ...func(*Handler)) *Handler {
	t.Helper()
	return newInstance(t, "").handler(mods...)
}

// testInstance is a simulated Caddy instance: its own data directory (so
// its own instance id) and a storage, possibly shared with others.
type testInstance struct {
	t          testing.TB
	dataDir    string
	storageDir string
}

func newInstance(t testing.TB, storageDir string) *testInstance {
	if storageDir == "" {
		storageDir = t.TempDir()
	}
	return &testInstance{t: t, dataDir: t.TempDir(), storageDir: storageDir}
}

// handler provisions a handler of this instance.
func (in *testInstance) handler(mods ...func(*Handler)) *Handler {
	t := in.t
	t.Helper()
	t.Setenv("AUTHMAIL_UNIT_KEY", "0123456789abcdef0123")
	t.Setenv("XDG_DATA_HOME", in.dataDir) // the instance id lives there
	h := &Handler{
		Capture: t.TempDir(), From: "no-reply@example.com", FromName: "Example",
		BaseURL: "https://app.example.com", Keys: []Key{{ID: "app", Secret: "{env.AUTHMAIL_UNIT_KEY}"}},
		Links:           map[string]string{"password-reset": "https://app.example.com/reset?t={token}"},
		SecurityAlerts:  map[string]bool{"new_login": true},
		storageOverride: openStorage(t, in.storageDir),
	}
	for _, m := range mods {
		m(h)
	}
	provision(t, h)
	return h
}

// provision provisions h in a Caddy context whose storage is a temporary
// directory, and cleans it up at the end of the test.
func provision(t testing.TB, h *Handler) caddy.Context {
	t.Helper()
	storage := fmt.Sprintf(`{"module":"file_system","root":%q}`, t.TempDir())
	ctx, err := caddy.ProvisionContext(&caddy.Config{StorageRaw: json.RawMessage(storage)})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e, key := h.engine, h.sharedKey
		_ = h.Cleanup()
		// the last handler of an engine stops it in the background; wait,
		// so that its final writes land before the test's directories go
		if _, used := sharedPool.References(key); e != nil && key != "" && !used && e.Started() {
			select {
			case <-e.Done():
			case <-time.After(20 * time.Second):
				t.Error("the outbox engine did not stop")
			}
		}
	})
	if err := h.Validate(); err != nil {
		t.Fatal(err)
	}
	return ctx
}

// FuzzRequests feeds arbitrary bodies to every endpoint's validation and
// rendering. A request is either refused with a 4xx and a field, or it
// yields messages whose headers parse and hold no injected lines.
func FuzzRequests(f *testing.F) {
	for _, s := range []string{
		`{"to":"a@example.com","code":"123456","user_name":"Jane"}`,
		`{"to":["a@example.com","B <b@example.com>"],"cc":"c@example.com","subject":"Hi","html_body":"<p>x</p>"}`,
		`{"to":"a@example.com","token":"t0k","old_email":"old@example.com"}`,
		`{"to":"a@example.com","link":"https://app.example.com/x?y=1"}`,
		`{"to":"a@example.com","event":"new_login","ip":"::1","occurred_at":"2026-01-02T03:04:05Z"}`,
		`{"to":"a@example.com\r\nBcc: x@evil.example","subject":"s\nX: y","text_body":"b"}`,
		`{"to":"=?utf-8?q?a=0D=0AB?= <a@example.com>","user_name":"a\u2028b","code":"1"}`,
		`{"to":"a@example.com","user_name":"CORP\\Jürgen","code":"1"}`,
		`[]`, `null`, `{"to":1}`, ``,
		`{"to":"checked@example.com","to":"other@evil.example","code":"1"}`,
		`{"to":"checked@example.com","TO":"other@evil.example","subject":"s","text_body":"b"}`,
		`{"to":"a@example.com","code":"1","c\u006fde":"2","\u017fubject":"s"}`,
		`{"to":["a@example.com",{"x":1,"x":2}],"code":"1"}`,
		`{"to":"a@example.com","subject":"=?UTF-8?B?SGkNCkJjYzogZXZpbEBldmlsLmV4YW1wbGU=?=","text_body":"b"}`,
		`{"to":"a@example.com","user_name":"=?UTF-8?B?SGkNCkJjYzogZXZpbEBldmlsLmV4YW1wbGU=?=","code":"1"}`,
		`{"to":"a@example.com","subject":"` + strings.Repeat("a", 998) + `","text_body":"b"}`,
		`{"to":"user@[127.0.0.1]","cc":"b@localhost","code":"1"}`,
		`{"to":"a@example.com","code":"1","user_name":"홍길동","locale":"ko"}`,
		`{"to":"a@example.com","token":"t0k","old_email":"old@example.com","locale":"de-AT"}`,
		`{"to":"a@example.com","event":"account_locked","occurred_at":"2026-12-03T15:04:05Z","locale":"KO-kr"}`,
		`{"to":"a@example.com","link":"https://app.example.com/x","locale":"ko_KR"}`,
		`{"to":"a@example.com","code":"1","locale":"en-US-u-co-phonebk-x-\r\nBcc"}`,
		`{"to":"a@example.com","code":"1","locale":"xx-YY"}`,
		`{"to":"a@example.com","code":"1","locale":"i-klingon"}`,
		`{"to":"a@example.com","code":"1","locale":"` + strings.Repeat("a-", 40) + `"}`,
		`{"to":"a@example.com","subject":"s","text_body":"b","locale":"ko"}`,
		`{"to":"a@example.com","subject":"s","text_body":"b","list_unsubscribe":"<https://a.example/u?x=1>, <mailto:u@a.example>","list_unsubscribe_post":"List-Unsubscribe=One-Click"}`,
		`{"to":"a@example.com","subject":"s","text_body":"b","list_unsubscribe":"<https://a.example/u>\r\nBcc: e@evil.example"}`,
	} {
		f.Add(s)
	}
	h := provisionedHandler(f)
	eps := []*endpoint{endpoints["/send"], endpoints["/send/otp"], endpoints["/send/magic-link"],
		endpoints["/send/password-reset"], endpoints["/send/email-change"], endpoints["/send/security-alert"]}
	f.Fuzz(func(t *testing.T, body string) {
		for _, ep := range eps {
			msgs, skip, aerr := h.prepare(ep, []byte(body))
			if aerr != nil {
				if aerr.Status != http.StatusBadRequest && aerr.Status != http.StatusUnprocessableEntity {
					t.Fatalf("%s: status %d for %q", ep.path, aerr.Status, body)
				}
				if aerr.Status == http.StatusUnprocessableEntity && aerr.Field == "" {
					t.Fatalf("%s: 422 without a field for %q", ep.path, body)
				}
				continue
			}
			if skip != "" {
				continue
			}
			for _, m := range msgs {
				if strings.ContainsAny(m.subject, "\r\n") {
					t.Fatalf("%s: subject with a line break", ep.path)
				}
				env, err := h.buildEnvelope(m, time.Now())
				if err != nil {
					t.Fatalf("%s: %v", ep.path, err)
				}
				checkHeaderLines(t, env.Data, 998)
				msg, err := mail.ReadMessage(bytes.NewReader(env.Data))
				if err != nil {
					t.Fatalf("%s: rendered message does not parse: %v", ep.path, err)
				}
				for _, name := range []string{"From", "To", "Cc", "Reply-To"} {
					if _, present := msg.Header[name]; !present {
						continue
					}
					if _, err := msg.Header.AddressList(name); err != nil {
						t.Fatalf("%s: %s header %q does not parse: %v", ep.path, name, msg.Header.Get(name), err)
					}
				}
				for name := range msg.Header {
					switch name {
					case "Date", "Mime-Version", "Message-Id", "Subject", "From", "To", "Cc", "Reply-To", "Content-Type", "Content-Transfer-Encoding":
					case "List-Unsubscribe", "List-Unsubscribe-Post":
						// only /send sets them, only from validated fields
						if ep.path != "/send" {
							t.Fatalf("%s: %s on an auth flow", ep.path, name)
						}
						if name == "List-Unsubscribe-Post" && msg.Header.Get(name) != "List-Unsubscribe=One-Click" {
							t.Fatalf("%s: %s %q", ep.path, name, msg.Header.Get(name))
						}
					default:
						t.Fatalf("%s: unexpected header %q (injection?)", ep.path, name)
					}
				}
				if len(env.To) == 0 {
					t.Fatalf("%s: no recipients", ep.path)
				}
			}
		}
	})
}

// FuzzHeaderLines builds messages from arbitrary subjects, user names
// and display names, through the same checks as a request: whatever is
// accepted yields header lines of at most 998 octets without a bare CR
// or LF, and a subject and display name that decode to what was given.
func FuzzHeaderLines(f *testing.F) {
	for _, s := range [][3]string{
		{strings.Repeat("a", 998), "Jane", "Jane Doe"},
		{"=?UTF-8?B?SGkNCkJjYzogZXZpbEBldmlsLmV4YW1wbGU=?=", "=?UTF-8?B?SGkNCkJjYzogZXZpbEBldmlsLmV4YW1wbGU=?=", "=?utf-8?q?a=0D=0AB?="},
		{"a  b   c", strings.Repeat("n", 200), strings.Repeat("x", 900)},
		{strings.Repeat("ü", 998), strings.Repeat("名", 200), strings.Repeat("\\\"", 300)},
		{"tab\tin subject", "a\u2028b", "  spaced   name  "},
	} {
		f.Add(s[0], s[1], s[2])
	}
	h := provisionedHandler(f)
	f.Fuzz(func(t *testing.T, subject, userName, name string) {
		if strings.TrimSpace(subject) == "" || checkHeaderText("subject", subject, maxSubjectRunes) != nil {
			return
		}
		if checkHeaderText("user_name", userName, maxUserNameRunes) != nil {
			return
		}
		to := withUserName(mailAddr{Addr: "a@example.com"}, userName)
		cc, p := parseAddress((&mail.Address{Name: name, Address: "c@example.com"}).String())
		if p != "" {
			return
		}
		m := &outMessage{flow: "send", to: []mailAddr{to, {Addr: "b@example.com"}}, cc: []mailAddr{cc}, replyTo: []mailAddr{cc},
			subject: strings.TrimSpace(subject), text: "x"}
		env, err := h.buildEnvelope(m, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		checkHeaderLines(t, env.Data, 998)
		msg, err := mail.ReadMessage(bytes.NewReader(env.Data))
		if err != nil {
			t.Fatalf("does not parse: %v", err)
		}
		got, err := new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject"))
		if err != nil || got != m.subject {
			t.Fatalf("subject %q decodes to %q (%v)", m.subject, got, err)
		}
		list, err := msg.Header.AddressList("Cc")
		if err != nil || len(list) != 1 || list[0].Address != "c@example.com" {
			t.Fatalf("Cc %q: %v %v", msg.Header.Get("Cc"), list, err)
		}
	})
}

// FuzzParseAddress checks that accepted addresses are header-safe and
// stable: an accepted address parses again to itself.
func FuzzParseAddress(f *testing.F) {
	for _, s := range []string{"a@example.com", "Jane <j@example.com>", `"a,b" <x@y.z>`, "a@bücher.example", "a@[::1]", "a@x.com, b@y.com", "=?utf-8?b?SsO2cmc=?= <j@x.de>"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, problem := parseAddress(s)
		if problem != "" {
			return
		}
		if strings.ContainsAny(a.Addr+a.Name, "\r\n") {
			t.Fatalf("%q accepted with a line break: %+v", s, a)
		}
		if strings.Count(a.Addr, "@") < 1 {
			t.Fatalf("%q accepted without @: %+v", s, a)
		}
		again, p2 := parseAddress(a.Addr)
		if p2 != "" || again.Addr != a.Addr {
			t.Fatalf("%q -> %q does not re-parse (%q, %q)", s, a.Addr, again.Addr, p2)
		}
		if _, err := mail.ParseAddress(a.mail().String()); err != nil {
			t.Fatalf("%q renders as %q, which does not parse: %v", s, a.mail().String(), err)
		}
	})
}

// FuzzHTMLToText checks that any HTML converts without panicking into
// valid UTF-8 without carriage returns.
func FuzzHTMLToText(f *testing.F) {
	for _, s := range []string{"<p>a</p>", "<a href='https://x'>y</a>", "<pre>\r\n x</pre>", "<script>x</script>", "<<<>>>", "<a><a><a>", "<table><td>"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out := htmlToText(s)
		if utf8.ValidString(s) && !utf8.ValidString(out) {
			t.Fatalf("invalid UTF-8 out of valid input %q", s)
		}
		if strings.Contains(out, "\r") {
			t.Fatalf("carriage return in output for %q", s)
		}
	})
}

// FuzzAuthorization checks that no Authorization header crashes the
// handler or authenticates without the secret.
func FuzzAuthorization(f *testing.F) {
	for _, s := range []string{"Bearer 0123456789abcdef0123", "bearer  0123456789abcdef0123 ", "Basic x", "Bearer", "Bearer \xff\xfe", ""} {
		f.Add(s)
	}
	h := provisionedHandler(f)
	f.Fuzz(func(t *testing.T, v string) {
		r, _ := http.NewRequest(http.MethodPost, "/authmail/send", nil)
		r.Header["Authorization"] = []string{v}
		if k := h.authenticate(r); k != nil && !strings.Contains(v, "0123456789abcdef0123") {
			t.Fatalf("%q authenticated as %s", v, k.id)
		}
	})
}

// FuzzCaddyfile checks that any directive body parses or fails with an
// error, never a panic, and that an accepted config passes checkConfig.
func FuzzCaddyfile(f *testing.F) {
	for _, s := range []string{
		"authmail {\n from a@example.com\n key k 0123456789abcdef0123\n capture /tmp/x\n}",
		"authmail {\n smtp h:25 {\n tls none\n }\n}",
		"authmail {\n security_alerts {\n new_login on\n }\n}",
		"authmail /x {\n link magic-link https://a/{token}\n}",
		"authmail {\n from a@example.com\n key k 0123456789abcdef0123 {\n allow otp verify\n }\n capture /tmp/x\n codes issue {\n secret {env.S}\n length 8\n alphabet ABC\n }\n}",
		"authmail {\n from a@example.com\n key k 0123456789abcdef0123\n capture /tmp/x\n compat authmail-relay\n webhook_allow_hosts 127.0.0.1,localhost\n}",
		"authmail {\n from a@example.com\n key k 0123456789abcdef0123\n smtp a.example.com {\n username u@example.com\n auth xoauth2\n oauth2 {\n token_url https://t.example/token\n client_id c\n client_secret {env.CS}\n refresh_token {env.RT}\n scopes s1 s2\n }\n }\n smtp b.example.com:465 {\n username u\n password p\n }\n dkim {\n domain example.com\n selector s1\n key /k.pem\n headers From To\n }\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tokens, err := caddyfile.Tokenize([]byte(s), "Caddyfile")
		if err != nil || len(tokens) == 0 {
			return
		}
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err == nil {
			if err := h.checkConfig(); err != nil {
				t.Fatalf("accepted config fails checkConfig: %v", err)
			}
		}
	})
}

// FuzzLinkPolicy checks that link extraction never panics and that an
// accepted link really is on an allowed origin.
func FuzzLinkPolicy(f *testing.F) {
	for _, s := range []string{`<a href="https://app.example.com/x">`, `<img srcset="a 1x, //evil.example/b 2x">`, "see www.evil.example", "https://app.example.com@evil.example/",
		`<a href=" javascript:alert(1)">`, "https://[::1]:8080/x", "HTTPS://APP.EXAMPLE.COM:443/", `<a href="https://app.example.com%2f@evil.example">`,
		"https://ａpp.example.com/", "https://app.exam\u00adple.com/x", "https://app.example.com./", "https://evil.ｅxample/"} {
		f.Add(s)
	}
	// the bypasses the checker once missed, and the clean bodies it must
	// keep accepting
	for _, tc := range smuggledLinks {
		f.Add(strings.ReplaceAll(tc.html+tc.text, "app.example.test", "app.example.com"))
	}
	for _, tc := range cleanLinks {
		f.Add(strings.ReplaceAll(tc.html+tc.text, "app.example.test", "app.example.com"))
	}
	allowed := []string{"https://app.example.com"}
	h := &Handler{LinkPolicy: "enforce", origins: allowed}
	f.Fuzz(func(t *testing.T, s string) {
		// what the tokenizer-based checker accepts, a tree builder that
		// renders like a mail client (no scripts: noscript is markup;
		// foreign content) must find no foreign URL attribute or CSS in
		if utf8.ValidString(s) && h.checkLinkPolicy(s, "") == nil {
			for _, l := range treeLinks(t, s) {
				if v := linkVerdict(l, allowed); v != "" {
					t.Fatalf("%q accepted, but a mail client's parse holds %q (%s)", s, l, v)
				}
			}
		}
		links := append(htmlLinks(s), textLinks(s)...)
		for _, l := range links {
			if linkVerdict(l, allowed) != "" {
				continue
			}
			if strings.HasPrefix(strings.TrimSpace(l), "#") {
				continue // a place in the same message, whatever follows the #
			}
			u, err := url.Parse(browserForm(strings.TrimSpace(l)))
			if err != nil {
				t.Fatalf("%q accepted but does not parse", l)
			}
			switch strings.ToLower(u.Scheme) {
			case "", "http", "https":
				// mail clients map hosts the way browsers do (UTS #46):
				// "ａpp.example.com" (fullwidth) and "app.exam\u00adple.com"
				// (soft hyphen) both open app.example.com, so they pass
				host := strings.ToLower(u.Hostname())
				if a, err := idna.Lookup.ToASCII(host); err == nil {
					host = a
				}
				if u.Host != "" && host != "app.example.com" {
					t.Fatalf("%q accepted with host %q", l, u.Hostname())
				}
			case "mailto", "tel", "cid":
			default:
				t.Fatalf("%q accepted with scheme %q", l, u.Scheme)
			}
		}
	})
}

// FuzzCallerLink checks that a caller's link or base_url that is
// accepted reads as one link on the allowed origin wherever a mail
// client scans text for links: nothing in it ends the link early and
// leaves a second one to another host.
func FuzzCallerLink(f *testing.F) {
	for _, s := range []string{"https://app.example.com/x?y=1", "https://app.example.com/x\u2028https://evil.example/steal",
		"https://app.example.com/r\u3000https://evil.example/", "https://app.example.com/r\u00a0//evil.example/", "https://app.example.com/r\u2003x",
		"https://app.example.com/r\u200bhttps://evil.example/", "https://app.example.com/a'https://evil.example/", "https://app.example.com/a\"//evil.example",
		"https://app.example.com/a%E3%80%80b", "https://app.example.com/réinitialiser", "https://app.example.com/a>https:evil.example"} {
		f.Add(s)
	}
	allowed := []string{"https://app.example.com"}
	h := &Handler{baseURL: "https://app.example.com", baseOrigin: "https://app.example.com", origins: allowed}
	f.Fuzz(func(t *testing.T, s string) {
		var built []string
		if l, err := h.buildLink("magic-link", "", s, ""); err == nil {
			built = append(built, l)
		}
		if l, err := h.buildLink("magic-link", "SECRET-TOKEN-42", "", s); err == nil {
			built = append(built, l)
		}
		for _, l := range built {
			if strings.ContainsFunc(l, urlBreak) {
				t.Fatalf("%q accepted with a space, separator, control or format character", l)
			}
			links := textLinks("Open " + l + " now")
			if len(links) != 1 || !strings.HasPrefix(l, links[0]) || linkVerdict(links[0], allowed) != "" {
				t.Fatalf("%q accepted, but text shows it as %q", l, links)
			}
		}
	})
}

// treeLinks returns the URL attributes' values and the CSS links of the
// document an HTML parser without scripting builds from s.
func treeLinks(t *testing.T, s string) []string {
	doc, err := html.ParseWithOptions(strings.NewReader(s), html.ParseOptionEnableScripting(false))
	if err != nil {
		t.Fatalf("parse %q: %v", s, err)
	}
	var out []string
	var walk func(n *html.Node)
	walk = func(n *html.Node) {
		switch n.Type {
		case html.ElementNode:
			for _, a := range n.Attr {
				k := a.Key
				if a.Namespace == "xlink" {
					k = "xlink:" + k
				}
				switch {
				case urlAttrs[k]:
					out = append(out, strings.TrimSpace(a.Val))
					if f := strings.FieldsFunc(a.Val, urlBreak); len(f) > 0 {
						out = append(out, f[0])
					}
				case cssAttrs[k]:
					out = append(out, cssLinks(a.Val)...)
				}
			}
		case html.TextNode:
			if n.Parent != nil && n.Parent.Type == html.ElementNode && n.Parent.Data == "style" {
				out = append(out, cssLinks(n.Data)...)
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c)
		}
	}
	walk(doc)
	return out
}

// FuzzTemplates renders every flow with hostile values: rendering never
// fails, HTML never carries markup from the values, and subjects never
// carry the code or the link.
func FuzzTemplates(f *testing.F) {
	for _, s := range []string{`<script>alert(1)</script>`, `"><img src=x onerror=alert(1)>`, "javascript:alert(1)", "{{.Code}}", "\u202e\u0000", "&amp;&lt;"} {
		f.Add(s, "SECRET-CODE-123", "https://app.example.com/x?t=SECRET-TOKEN")
	}
	set, err := loadTemplates("")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, name, code, link string) {
		for _, flow := range templateFlows {
			d := &templateData{Flow: flow, AppName: name, UserName: name, Email: "a@example.com", Code: code, Link: link,
				ExpiresIn: "10 minutes", Event: "new_login", EventTitle: name, IP: name, UserAgent: name, Location: name, OccurredAt: name,
				NewEmail: name, NewEmailMasked: name}
			out, err := set.render(flow, d)
			if err != nil {
				t.Fatalf("%s: %v", flow, err)
			}
			if strings.Contains(strings.ToLower(out.html), "<script") {
				t.Fatalf("%s: markup from a value reached the HTML part", flow)
			}
			// the subject must not depend on the code or the link at all
			// (a substring check has false positives: name "00000000" and
			// link "0000000 " overlap in "00000000 …")
			other := *d
			other.Code, other.Link = "OTHER-CODE-7", "https://app.example.com/other?t=OTHER-TOKEN"
			out2, err := set.render(flow, &other)
			if err != nil {
				t.Fatalf("%s: %v", flow, err)
			}
			if out.subject != out2.subject {
				t.Fatalf("%s: the code or the link reached the subject: %q vs %q", flow, out.subject, out2.subject)
			}
		}
	})
}

// FuzzRequestHeaders drives whole requests through the handler with
// hostile Prefer, X-Dry-Run, Idempotency-Key and X-Request-ID headers
// and message ids: every answer is a JSON object with an expected
// status, a header-safe request id, and Preference-Applied only when a
// preference was applied.
func FuzzRequestHeaders(f *testing.F) {
	f.Add("respond-async", "", "", "req-1", "06gzvg12ec1w730q0e162n041r00")
	f.Add("wait=99999999999999999", "true", "key-1", "", "x")
	f.Add("wait=\"3\", respond-async;x=y", "no", "k\x7f", "a\r\nb", "../../etc/passwd")
	f.Add("wait=-1", "maybe", "", strings.Repeat("r", 129), "")
	h := provisionedHandler(f, withoutLimits)
	f.Fuzz(func(t *testing.T, prefer, dryRun, idemKey, reqID, msgID string) {
		do := func(method, path, body string) (*httptest.ResponseRecorder, map[string]any) {
			req := apiRequest(method, "/authmail/send/otp", strings.NewReader(body))
			req.URL.Path = path // any bytes, even those a request line cannot carry
			req.Header["Prefer"] = []string{prefer}
			req.Header["X-Dry-Run"] = []string{dryRun}
			req.Header["X-Request-Id"] = []string{reqID}
			if idemKey != "" {
				req.Header["Idempotency-Key"] = []string{idemKey}
			}
			rec := httptest.NewRecorder()
			if err := h.ServeHTTP(rec, req, nil); err != nil {
				t.Fatal(err)
			}
			var out map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
				t.Fatalf("%s %s: body is not a JSON object: %q", method, path, rec.Body)
			}
			got := rec.Header().Get("X-Request-ID")
			if got == "" || len(got) > 128 || !saneToken(got) {
				t.Fatalf("unsafe X-Request-ID %q", got)
			}
			if reqID != "" && len(reqID) <= 128 && saneToken(reqID) && got != reqID {
				t.Fatalf("valid X-Request-ID %q not echoed: %q", reqID, got)
			}
			for name, vs := range rec.Header() {
				for _, v := range vs {
					if strings.ContainsAny(v, "\r\n") {
						t.Fatalf("header %s with a line break: %q", name, v)
					}
				}
			}
			if pa := rec.Header().Get("Preference-Applied"); pa != "" && rec.Code != 202 && rec.Code != 200 {
				t.Fatalf("Preference-Applied %q on a %d", pa, rec.Code)
			}
			return rec, out
		}
		rec, out := do("POST", "/authmail/send/otp", `{"to":"jane@example.org","code":"123456"}`)
		switch rec.Code {
		case 200, 202:
		case 400:
			if c := out["error_code"]; c != "invalid_request" && c != "invalid_idempotency_key" {
				t.Fatalf("400 with %v", out)
			}
		case 409:
			if out["error_code"] != "idempotency_conflict" {
				t.Fatalf("409 with %v", out)
			}
		default:
			t.Fatalf("POST: %d %v", rec.Code, out)
		}
		if pa := rec.Header().Get("Preference-Applied"); pa != "" && pa != "respond-async" && !strings.HasPrefix(pa, "wait=") {
			t.Fatalf("Preference-Applied %q", pa)
		}
		rec, out = do("GET", "/authmail/messages/"+msgID, "")
		if rec.Code != 404 && rec.Code != 200 {
			t.Fatalf("GET /messages/%q: %d %v", msgID, rec.Code, out)
		}
	})
}
