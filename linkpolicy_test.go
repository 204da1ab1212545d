package authmail

import (
	"strings"
	"testing"
)

// smuggledLinks are link_policy bypasses: bodies whose links a mail
// client opens or loads, or shows in the text part, on a foreign host,
// each answered 200 and sent before the checker read them. host is what
// the 422's message must name.
var smuggledLinks = []struct {
	name, html, text, field, host string
}{
	// noscript content is live markup in a mail client, which runs no scripts
	{"noscript scheme:host", `<noscript><a href="https:evil.example/login">Log in</a></noscript>`, "", "html_body", "https://evil.example"},
	{"noscript protocol-relative", `<noscript><a href="//evil.example/login">Log in</a></noscript>`, "", "html_body", "https://evil.example"},
	{"noscript style", `<noscript><style>td{background:url(//evil.example/p.gif)}</style></noscript>`, "", "html_body", "https://evil.example"},
	{"conditional comment noscript", `<!--[if mso]><noscript><a href=//evil.example/x>x</a></noscript><![endif]-->`, "", "html_body", "https://evil.example"},
	// CSS: url() and @import are links, after CSS escapes and character references are decoded
	{"style url protocol-relative", `<div style="background:url(//evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
	{"style url scheme:host", `<div style="background:url(https:evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
	{"style url css hex escape", `<div style="background:url('https\3a //evil.example/p.gif')">x</div>`, "", "html_body", "https://evil.example"},
	{"style url six-digit escape", `<div style="background:url(\000068ttps://evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
	{"style url escaped colon", `<div style="background:url(https\://evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
	{"style url escaped function name", `<style>td{background:u\72l(//evil.example/p.gif)}</style>`, "", "html_body", "https://evil.example"},
	{"style url character references", `<div style="background:url(&#x2f;&#x2f;evil.example/p.gif)">x</div>`, "", "html_body", "https://evil.example"},
	{"style import url", `<style>@import url(//evil.example/x.css);</style>`, "", "html_body", "https://evil.example"},
	{"style import string", `<style>@import '//evil.example/x.css';</style>`, "", "html_body", "https://evil.example"},
	{"svg fill url", `<svg><rect fill="url(//evil.example/p.svg#g)"/></svg>`, "", "html_body", "https://evil.example"},
	// foreign content: <style> in <svg> or <math> is an element, its content markup
	{"svg style markup", `<svg><style><img src=//evil.example/p.gif></style></svg>`, "", "html_body", "https://evil.example"},
	{"math style markup", `<math><style><img src=//evil.example/p.gif></style></math>`, "", "html_body", "https://evil.example"},
	{"svg self-closed style", `<svg><style/><img src=//evil.example/p.gif></svg>`, "", "html_body", "https://evil.example"},
	{"svg style character references", `<svg><style>@import url(&#x2f;&#x2f;evil.example/x.css)</style></svg>`, "", "html_body", "evil.example"},
	// meta refresh
	{"meta refresh protocol-relative", `<meta http-equiv=refresh content="0;url=//evil.example/r">`, "", "html_body", "https://evil.example"},
	{"meta refresh without url=", `<meta http-equiv="Refresh" content="0; https:evil.example/r">`, "", "html_body", "https://evil.example"},
	// Unicode spaces and format characters inside URL attributes
	{"href ideographic space", "<a href=\"https://app.example.test/reset\u3000https://evil.example/\">Reset</a>", "", "html_body", "https://evil.example"},
	{"href line separator", "<a href=\"https://app.example.test/reset\u2028https://evil.example/\">Reset</a>", "", "html_body", "https://evil.example"},
	{"href zero-width space", `<a href="https://app.example.test/x&#x200b;https://evil.example/">Reset</a>`, "", "html_body", "https://evil.example"},
	{"href no-break space protocol-relative", "<a href=\"https://app.example.test/x\u00a0//evil.example/\">Reset</a>", "", "html_body", "https://evil.example"},
	{"href backslashes", `<a href="https:\\evil.example\login">x</a>`, "", "html_body", "https://evil.example"},
	{"srcset em space", "<img srcset=\"https://app.example.test/a.png\u2003https://evil.example/b.png 2x\">", "", "html_body", "https://evil.example"},
	{"srcset scheme:host", `<img srcset="https://app.example.test/a.png 1x, https:evil.example/b.png 2x">`, "", "html_body", "https://evil.example"},
	{"ping list", `<a href="https://app.example.test/x" ping="https://app.example.test/p //evil.example/p">x</a>`, "", "html_body", "https://evil.example"},
	{"iframe srcdoc", `<iframe srcdoc="<a href=//evil.example/x>x</a>"></iframe>`, "", "html_body", "https://evil.example"},
	// the derived text part runs elements' text together
	{"derived text www", `<p>Reset at www.<b></b>evil.example/login</p>`, "", "html_body", "https://www.evil.example"},
	{"nested too deep", strings.Repeat("<noscript>", 8) + `<a href="https://app.example.test/">x</a>`, "", "html_body", "too deep"},
	// text_body
	{"text scheme:host", `<p>ok</p>`, "Reset at https:evil.example/login", "text_body", "https://evil.example"},
	{"text protocol-relative", `<p>ok</p>`, "Reset at //evil.example/login", "text_body", "https://evil.example"},
	{"text zero-width space", `<p>ok</p>`, "https://app.example.test/\u200bhttps://evil.example/login", "text_body", "https://evil.example"},
	{"text word joiner", `<p>ok</p>`, "https://app.example.test/\u2060https://evil.example/login", "text_body", "https://evil.example"},
	{"text backslashes", `<p>ok</p>`, `Open \\evil.example\share`, "text_body", "https://evil.example"},
}

// cleanLinks must pass link_policy: links only to the allowed origin,
// CSS and text that look a little like links but are none.
var cleanLinks = []struct{ html, text string }{
	{`<div style="font-family:'Segoe UI', sans-serif; color:#333; background:url(https://app.example.test/bg.png)">x</div>`, ""},
	{`<svg><defs><linearGradient id="g"/></defs><rect fill="url(#g)"/></svg>`, ""},
	{`<style>a{color:red} td{background:url( "https://app.example.test/bg.png" )} @import url(https://app.example.test/a.css);</style>`, ""},
	{`<a href="https://app.example.test/login?next=https://app.example.test/account">x</a>`, ""},
	{`<noscript><a href="https://app.example.test/x">x</a><img src="//app.example.test/p.gif"></noscript>`, ""},
	{`<meta http-equiv="refresh" content="30"><meta name="viewport" content="width=device-width">`, ""},
	{`<img srcset="https://app.example.test/a.png 1x, https://app.example.test/b.png 2x" src="cid:logo">`, ""},
	{`<a href="mailto:help@app.example.test?subject=Hello%20there">mail</a> <a href="#top">top</a>`, ""},
	{"<p>Hello\u00a0world, see\u3000https://app.example.test/help</p>", ""},
	{`<p>ok</p>`, "Use the app (https://app.example.test/x), and/or // reply. Ratio 3:4, C:\\Users, HTTP: 200, see http: and https:."},
	{`<p>ok</p>`, "Open //app.example.test/x or https:app.example.test/y"},
}

func linkPolicyHandler() *Handler {
	return &Handler{LinkPolicy: "enforce", origins: []string{"https://app.example.test"}}
}

func TestLinkPolicySmuggling(t *testing.T) {
	h := linkPolicyHandler()
	for _, tc := range smuggledLinks {
		err := h.checkLinkPolicy(tc.html, tc.text)
		if err == nil {
			t.Errorf("%s: accepted", tc.name)
			continue
		}
		if err.Status != 422 || err.Code != "link_not_allowed" || err.Field != tc.field || !strings.Contains(err.Message, tc.host) {
			t.Errorf("%s: got %d %s on %q: %s; want 422 link_not_allowed on %q naming %q", tc.name, err.Status, err.Code, err.Field, err.Message, tc.field, tc.host)
		}
	}
	for _, tc := range cleanLinks {
		if err := h.checkLinkPolicy(tc.html, tc.text); err != nil {
			t.Errorf("clean body refused: %q / %q: %s", tc.html, tc.text, err.Message)
		}
	}
}

func TestCSSAndRefreshLinks(t *testing.T) {
	for in, want := range map[string]string{
		`https\3a //a.example/x`:  "https://a.example/x",
		`\000068ttps:\/\/a`:       "https://a",
		"\\3a\r\nx":               ":x",
		`a\"b\`:                   `a"b`,
		"line\\\ncontinued":       "linecontinued",
		`\0 \110000 \d800 ok`:     "\ufffd\ufffd\ufffdok",
		`\e9 t\E9 `:               "été",
		`plain url(x) no escapes`: `plain url(x) no escapes`,
	} {
		if got := cssUnescape(in); got != want {
			t.Errorf("cssUnescape(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[string]string{
		"0;url=//a.example/r": "//a.example/r", "5; URL = 'https://a/x' y": "https://a/x", "0 https:a/x": "https:a/x",
		"0,\"b\"": "b", "30": "", "": "", "1.5;url=": "",
	} {
		if got := refreshURL(in); got != want {
			t.Errorf("refreshURL(%q) = %q, want %q", in, got, want)
		}
	}
	for l, want := range map[string]string{
		"https:evil.example/x": "https://evil.example", "https:/evil.example": "https://evil.example", `https:\\evil.example`: "https://evil.example",
		`/\evil.example/x`: "https://evil.example", `\\evil.example`: "https://evil.example", "///evil.example": "https://evil.example",
		"HTTPS:app.example.test/x": "", nestedTooDeep: "an unparsable URL",
	} {
		if got := linkVerdict(l, []string{"https://app.example.test"}); got != want {
			t.Errorf("linkVerdict(%q) = %q, want %q", l, got, want)
		}
	}
}

// The derived text part shows an href as the link a browser opens:
// spaces and separators percent-encoded, never as a second link.
func TestHTMLToTextEncodesHrefSpaces(t *testing.T) {
	got := htmlToText("<a href=\"https://app.example.test/reset\u3000https://evil.example/\">Reset</a> <a href=\"https://app.example.test/a\nb\u200b\">x</a>")
	want := "Reset (https://app.example.test/reset%E3%80%80https://evil.example/) x (https://app.example.test/ab%E2%80%8B)\n"
	if got != want {
		t.Errorf("htmlToText = %q\nwant %q", got, want)
	}
	if l := textLinks(got); len(l) != 2 || l[0] != "https://app.example.test/reset%E3%80%80https://evil.example/" {
		t.Errorf("links of the derived text: %q", l)
	}
}

// A caller's link or base_url with a character a URL cannot carry raw is
// refused with its field named; the message names the character, never
// the URL (it may hold a token).
func TestBuildLinkRefusesUnsafeCharacters(t *testing.T) {
	h := &Handler{baseURL: "https://app.example.test", baseOrigin: "https://app.example.test", origins: []string{"https://app.example.test"}}
	for _, c := range []string{"\u2028", "\u3000", "\u00a0", "\u2003", "\u200b", "\u202e", "\ufeff", "\u0085", `"`, "<", ">", "'", "`", "{", "|", "}", "^", "[x]"} {
		for _, field := range []string{"link", "base_url"} {
			var err *apiError
			if field == "link" {
				_, err = h.buildLink("password-reset", "", "https://app.example.test/reset"+c+"https://evil.example/steal?token=SECRET-TOKEN-42", "")
			} else {
				_, err = h.buildLink("password-reset", "SECRET-TOKEN-42", "", "https://app.example.test/x"+c+"https://evil.example/steal")
			}
			if err == nil || err.Status != 422 || err.Code != "invalid_request" || err.Field != field || !strings.HasPrefix(err.Message, field+" must not contain ") {
				t.Errorf("%s with %q: %+v", field, c, err)
				continue
			}
			if strings.Contains(err.Message, "evil") || strings.Contains(err.Message, "SECRET") {
				t.Errorf("%s with %q: the message quotes the URL: %s", field, c, err.Message)
			}
		}
	}
	// letters beyond ASCII and percent-encoded spaces stay allowed
	for _, link := range []string{"https://app.example.test/réinitialiser?t=1", "https://app.example.test/a%E3%80%80b", "https://[::1]/x"} {
		if _, p := parseHTTPURL(link); p != "" {
			t.Errorf("%s: %s", link, p)
		}
	}
	err := invalid("link", "%s", must(parseHTTPURL("https://app.example.test/\u3000")))
	if want := "link must not contain U+3000 (a space, separator, control, format or other character that a URL cannot carry raw); percent-encode it"; err.Message != want {
		t.Errorf("message %q\nwant %q", err.Message, want)
	}
}

func must[T any](_ T, p string) string { return p }
