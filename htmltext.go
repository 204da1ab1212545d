package authmail

import (
	"fmt"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/html"
	"golang.org/x/net/html/atom"
)

// htmlToText derives a readable plain-text part from an HTML body: block
// elements become line breaks, list items get a dash, links keep their
// target in parentheses, images their alt text, and script, style and
// head contents are dropped. It runs in time linear in the input.
func htmlToText(src string) string {
	z := html.NewTokenizer(strings.NewReader(src))
	var (
		w     textWriter
		skip  int      // depth inside script, style, svg…
		head  bool     // inside <head>, which ends without </head> too
		pre   int      // depth inside <pre>
		hrefs []string // targets of the open <a> elements
		marks []int    // output length when each <a> opened
	)
	for {
		tt := z.Next()
		switch tt {
		case html.ErrorToken:
			return finishText(w.b.String())
		case html.TextToken:
			if skip > 0 || head {
				continue
			}
			if pre > 0 {
				w.raw(string(z.Text()))
			} else {
				w.text(collapseSpace(string(z.Text())))
			}
		case html.StartTagToken, html.SelfClosingTagToken:
			name, hasAttr := z.TagName()
			a := atom.Lookup(name)
			var href, alt string
			for hasAttr {
				var k, v []byte
				k, v, hasAttr = z.TagAttr()
				switch string(k) {
				case "href":
					href = string(v)
				case "alt":
					alt = string(v)
				}
			}
			if a == atom.Head {
				head = tt == html.StartTagToken
				continue
			}
			if head && !inHead(a) {
				head = false // <body>, or body content: the head ended without </head>
			}
			switch {
			case skipped(a):
				if tt == html.StartTagToken {
					skip++
				}
			case skip > 0 || head:
				// nothing inside a skipped element is output
			case a == atom.Br:
				w.newline()
			case a == atom.Li:
				w.brk(1)
				w.text("- ")
			case a == atom.Td || a == atom.Th:
				w.space = true
			case a == atom.Hr:
				w.brk(2)
				w.text("----")
				w.brk(2)
			case a == atom.Img:
				if alt = strings.TrimSpace(collapseSpace(alt)); alt != "" {
					w.text("[" + alt + "]")
				}
			case a == atom.A:
				if tt == html.StartTagToken {
					hrefs = append(hrefs, strings.TrimSpace(href))
					marks = append(marks, w.b.Len())
				}
			case a == atom.Pre:
				w.brk(2)
				if tt == html.StartTagToken {
					pre++
				}
			default:
				if n := blockBreaks(a); n > 0 {
					w.brk(n)
				}
			}
		case html.EndTagToken:
			name, _ := z.TagName()
			a := atom.Lookup(name)
			switch {
			case a == atom.Head:
				head = false
			case skipped(a):
				if skip > 0 {
					skip--
				}
			case skip > 0 || head:
			case a == atom.Li:
				w.brk(1)
			case a == atom.Pre:
				if pre > 0 {
					pre--
				}
				w.brk(2)
			case a == atom.A:
				n := len(hrefs)
				if n == 0 {
					continue
				}
				href, mark := hrefs[n-1], marks[n-1]
				hrefs, marks = hrefs[:n-1], marks[:n-1]
				if !linkWorthShowing(href) {
					continue
				}
				// the link text is compared with the target only when it
				// can be as short as the target: scanning back over long
				// text for every </a> of nested links would be quadratic
				shown := ""
				if mark <= w.b.Len() && w.b.Len()-mark <= 2*len(href)+16 {
					shown = strings.TrimSpace(w.b.String()[mark:])
				}
				if shown != href && shown != strings.TrimPrefix(href, "mailto:") {
					w.space = true
					w.text("(" + shownHref(href) + ")")
				}
			default:
				if n := blockBreaks(a); n > 0 {
					w.brk(n)
				}
			}
		}
	}
}

// textWriter accumulates text, owing line breaks and spaces until the
// next visible text so that empty elements leave no trace.
type textWriter struct {
	b       strings.Builder
	pending int  // line breaks owed before the next text
	space   bool // a space is owed before the next text on this line
}

func (w *textWriter) flushBreaks() bool {
	if w.pending == 0 {
		return false
	}
	if w.b.Len() > 0 {
		for range w.pending {
			w.b.WriteByte('\n')
		}
	}
	w.pending = 0
	w.space = false
	return true
}

// text writes whitespace-collapsed text.
func (w *textWriter) text(s string) {
	if s == "" {
		return
	}
	if s[0] == ' ' {
		w.space = true
		s = s[1:]
	}
	trailing := strings.HasSuffix(s, " ")
	s = strings.TrimSuffix(s, " ")
	if s != "" {
		atLineStart := w.flushBreaks() || w.b.Len() == 0 || strings.HasSuffix(w.b.String(), "\n")
		if w.space && !atLineStart {
			w.b.WriteByte(' ')
		}
		w.space = false
		w.b.WriteString(s)
	}
	if trailing {
		w.space = true
	}
}

// raw writes preformatted text as is.
func (w *textWriter) raw(s string) {
	if s == "" {
		return
	}
	w.flushBreaks()
	if w.space {
		w.b.WriteByte(' ')
		w.space = false
	}
	w.b.WriteString(strings.ReplaceAll(s, "\r\n", "\n"))
}

// brk owes at least n line breaks.
func (w *textWriter) brk(n int) {
	w.pending = max(w.pending, n)
	w.space = false
}

// newline writes one line break now (<br>).
func (w *textWriter) newline() {
	w.flushBreaks()
	w.b.WriteByte('\n')
	w.space = false
}

// skipped reports whether an element's content is not readable text.
// <head> is handled apart: its end tag may be left out.
func skipped(a atom.Atom) bool {
	switch a {
	case atom.Script, atom.Style, atom.Title, atom.Noscript, atom.Template,
		atom.Svg, atom.Object, atom.Iframe, atom.Select, atom.Textarea:
		return true
	}
	return false
}

// inHead reports whether an element may appear in <head>; any other
// start tag (<body> included) ends a head whose </head> was left out.
func inHead(a atom.Atom) bool {
	switch a {
	case atom.Meta, atom.Link, atom.Title, atom.Style, atom.Script, atom.Base, atom.Noscript, atom.Template, atom.Html:
		return true
	}
	return false
}

// blockBreaks is the number of line breaks around a block element.
func blockBreaks(a atom.Atom) int {
	switch a {
	case atom.P, atom.Div, atom.H1, atom.H2, atom.H3, atom.H4, atom.H5, atom.H6,
		atom.Table, atom.Blockquote, atom.Section, atom.Article, atom.Header, atom.Footer,
		atom.Ul, atom.Ol, atom.Dl, atom.Form, atom.Main, atom.Nav, atom.Aside, atom.Address, atom.Figure:
		return 2
	case atom.Tr, atom.Dt, atom.Dd, atom.Center, atom.Caption:
		return 1
	}
	return 0
}

// linkWorthShowing reports whether an href is a URL a reader can use.
func linkWorthShowing(href string) bool {
	l := strings.ToLower(href)
	return strings.HasPrefix(l, "http://") || strings.HasPrefix(l, "https://") || strings.HasPrefix(l, "mailto:")
}

// shownHref is an href as the text part shows it: as the link a browser
// opens, with tabs and line breaks removed and spaces, separators,
// controls, format characters and quotes or angle brackets
// percent-encoded. Shown raw, "https://app.example/x\u3000https://
// evil.example/" would read as a second link, to a host the HTML link
// never opens.
func shownHref(href string) string {
	if !strings.ContainsFunc(href, func(r rune) bool { return urlBreak(r) || strings.ContainsRune("\"<>`", r) }) {
		return href
	}
	var b strings.Builder
	for _, r := range href {
		switch {
		case r == '\t' || r == '\n' || r == '\r':
		case urlBreak(r) || strings.ContainsRune("\"<>`", r):
			var buf [utf8.UTFMax]byte
			for _, c := range buf[:utf8.EncodeRune(buf[:], r)] {
				fmt.Fprintf(&b, "%%%02X", c)
			}
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// collapseSpace turns every run of whitespace into one space.
func collapseSpace(s string) string {
	var b strings.Builder
	space := false
	for _, r := range s {
		switch r {
		case ' ', '\t', '\n', '\r', '\f', '\u00a0':
			if !space {
				b.WriteByte(' ')
			}
			space = true
		default:
			space = false
			b.WriteRune(r)
		}
	}
	return b.String()
}

// finishText trims trailing spaces from lines, collapses runs of blank
// lines to one, and ends the text with a single newline.
func finishText(s string) string {
	var out []string
	blank := false
	for l := range strings.SplitSeq(s, "\n") {
		l = strings.TrimRight(l, " ")
		if l == "" {
			if !blank && len(out) > 0 {
				out = append(out, "")
			}
			blank = true
			continue
		}
		blank = false
		out = append(out, l)
	}
	for len(out) > 0 && out[len(out)-1] == "" {
		out = out[:len(out)-1]
	}
	if len(out) == 0 {
		return ""
	}
	return strings.Join(out, "\n") + "\n"
}
