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
