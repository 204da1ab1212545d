package authmail

import (
	"strings"
	"testing"
)

func TestHTMLToText(t *testing.T) {
	cases := map[string]string{
		"":                                  "",
		"plain text":                        "plain text\n",
		"<p>One</p><p>Two</p>":              "One\n\nTwo\n",
		"<p>a   b\n\n c</p>":                "a b c\n",
		"line<br>break<br/>here":            "line\nbreak\nhere\n",
		"<h1>Title</h1>Body":                "Title\n\nBody\n",
		"<ul><li>one</li><li>two</li></ul>": "- one\n- two\n",
		`<a href="https://x.example/p?a=1&amp;b=2">the page</a>`:                    "the page (https://x.example/p?a=1&b=2)\n",
		`<a href="https://x.example/">https://x.example/</a>`:                       "https://x.example/\n",
		`<a href="mailto:help@x.example">help@x.example</a>`:                        "help@x.example\n",
		`<a href="/relative">rel</a> <a href="javascript:x()">js</a>`:               "rel js\n",
		"<style>p{color:red}</style><script>alert(1)</script><p>visible</p>":        "visible\n",
		"<head><title>T</title></head><body>B</body>":                               "B\n",
		"<table><tr><td>A</td><td>B</td></tr><tr><td>C</td><td>D</td></tr></table>": "A B\nC D\n",
		"<pre>  keep\n    this</pre>":                                               "  keep\n    this\n",
		`<img src="logo.png" alt="Acme logo"> &amp; &lt;tag&gt; &#169;`:             "[Acme logo] & <tag> ©\n",
		"<p>Hello <b>bold</b> and <i>it</i>alic.</p>":                               "Hello bold and italic.\n",
		"<div><p></p><p></p><p>x</p></div>":                                         "x\n",
		"<p>a</p><hr><p>b</p>":                                                      "a\n\n----\n\nb\n",
		"unclosed <b>tag <p>para":                                                   "unclosed tag\n\npara\n",
		// a head without </head> ends at <body> or at body content
		`<html><head><meta charset="utf-8"><body><p>Your receipt #1042</p><a href="https://shop.example/r/1">View</a></body></html>`: "Your receipt #1042\n\nView (https://shop.example/r/1)\n",
		"<head><title>T</title><p>Hello": "Hello\n",
		// nothing inside a skipped element reaches the text
		`<svg><a href="https://evil.example/">x</a><li>y</svg>ok`: "ok\n",
		`<select><option>a<br>b</select>ok`:                       "ok\n",
	}
	for in, want := range cases {
		if got := htmlToText(in); got != want {
			t.Errorf("htmlToText(%q)\n got %q\nwant %q", in, got, want)
		}
	}
}

func TestHTMLToTextIsLinear(t *testing.T) {
	// 100k links must not take quadratic time or memory
	var b strings.Builder
	for range 100000 {
		b.WriteString(`<a href="https://x.example/a">link text</a> `)
	}
	out := htmlToText(b.String())
	if strings.Count(out, "(https://x.example/a)") != 100000 {
		t.Fatal("lost links")
	}
}

// BenchmarkHTMLToTextNestedLinks: 25,000 nested links around 130,000
// line breaks (1 MB). Each </a> compared the whole text written since its
// <a> with the target, which took over a second; the comparison is now
// bounded by the target's length. Run with -bench to see the time.
func BenchmarkHTMLToTextNestedLinks(b *testing.B) {
	src := strings.Repeat(`<a href="http://a">`, 25000) + strings.Repeat("<br>", 131000) + strings.Repeat("</a>", 25000)
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		if out := htmlToText(src); strings.Count(out, "(http://a)") != 25000 {
			b.Fatalf("%d links kept", strings.Count(out, "(http://a)"))
		}
	}
}
