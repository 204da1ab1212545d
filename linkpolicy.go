package authmail

import (
	"net/url"
	"regexp"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/html"
)

// urlAttrs are the HTML attributes whose value is a URL a reader's mail
// client may open or load.
var urlAttrs = map[string]bool{
	"href": true, "src": true, "action": true, "formaction": true,
	"background": true, "poster": true, "cite": true, "xlink:href": true,
	"data": true, "codebase": true, "longdesc": true, "lowsrc": true, "dynsrc": true,
}

// listAttrs are the attributes that hold several URLs: srcset-like lists
// of "URL descriptor" candidates, and ping's space-separated URLs.
var listAttrs = map[string]bool{"srcset": true, "imagesrcset": true, "ping": true}

// cssAttrs are the attributes that hold CSS: style, and SVG's
// presentation attributes that take a url() (fill="url(#g)").
var cssAttrs = map[string]bool{
	"style": true, "fill": true, "stroke": true, "filter": true, "mask": true, "clip-path": true,
	"marker": true, "marker-start": true, "marker-mid": true, "marker-end": true, "cursor": true,
}

// rawTextTags are the elements whose content the tokenizer returns as
// one text token instead of markup. A mail client reads much of it as
// markup all the same: it runs no scripts, so <noscript> content is
// live HTML, and inside <svg> or <math> a <style> is an ordinary element
// whose "content" (<img src=…>) is HTML again. Their content is therefore
// checked as markup and as text, and a <style>'s as CSS.
var rawTextTags = map[string]bool{
	"iframe": true, "noembed": true, "noframes": true, "noscript": true, "plaintext": true,
	"script": true, "style": true, "textarea": true, "title": true, "xmp": true,
}

// htmlLinks returns the URLs an HTML body can make a reader open or
// load, each once, in order of appearance: the values of URL attributes
// (href, src, srcset…; split at Unicode spaces, each piece checked),
// url() and @import in CSS (style and SVG presentation attributes,
// <style>) after CSS escapes are decoded, a meta refresh's target, absolute and
// protocol-relative URLs anywhere else in attribute values, in text
// (mail clients turn them into links), in raw-text elements, and in
// comments, which are read as HTML again because Outlook renders the
// markup inside conditional comments (<!--[if mso]>…<![endif]-->). The
// content of raw-text elements (<noscript>, <style>…) and of srcdoc is
// read as HTML again too. The DOCTYPE and xmlns attributes name schemas,
// not links, and are skipped. Markup nested deeper than maxMarkupDepth
// yields nestedTooDeep, which the policy refuses.
func htmlLinks(src string) []string {
	var c linkCollector
	c.html(src, 0)
	return c.out
}

// maxMarkupDepth bounds how deeply comment, raw-text and srcdoc content
// is read again as HTML; each level reads at most the whole body once.
const maxMarkupDepth = 6

// nestedTooDeep stands for markup nested beyond maxMarkupDepth: it could
// hold links that were not read, so the policy refuses it. It is no URL
// (a NUL never parses).
const nestedTooDeep = "\x00nested too deeply"

type linkCollector struct {
	out  []string
	seen map[string]bool
}

func (c *linkCollector) add(l string) {
	if c.seen == nil {
		c.seen = map[string]bool{}
	}
	if !c.seen[l] {
		c.seen[l] = true
		c.out = append(c.out, l)
	}
}

func (c *linkCollector) addAll(ls []string) {
	for _, l := range ls {
		c.add(l)
	}
}

// nested reads markup found inside markup (a comment, raw text, srcdoc).
func (c *linkCollector) nested(src string, depth int) {
	if depth < maxMarkupDepth {
		c.html(src, depth+1)
		return
	}
	c.addAll(textLinks(src))
	if strings.Contains(src, "<") {
		c.add(nestedTooDeep)
	}
}

func (c *linkCollector) html(src string, depth int) {
	z := html.NewTokenizer(strings.NewReader(src))
	rawNext := "" // the raw-text element whose content the next text token is
	for {
		tt := z.Next()
		raw := rawNext
		rawNext = ""
		switch tt {
		case html.ErrorToken:
			return
		case html.TextToken:
			t := string(z.Text())
			if raw == "" {
				c.addAll(textLinks(t))
				continue
			}
			// script and style text comes without its character
			// references decoded; in foreign content they are decoded,
			// so both readings are checked
			dec := html.UnescapeString(t)
			for _, v := range slices.Compact([]string{t, dec}) {
				if raw == "style" {
					c.addAll(cssLinks(v)) // first: it names the decoded URL
				}
				c.addAll(textLinks(v))
			}
			c.nested(t, depth)
		case html.CommentToken:
			c.nested(string(z.Text()), depth)
		case html.StartTagToken, html.SelfClosingTagToken:
			name, more := z.TagName()
			// the tokenizer reads a self-closing <style/> as raw text too
			if tag := strings.ToLower(string(name)); rawTextTags[tag] {
				rawNext = tag
			}
			var httpEquiv, content string
			for more {
				var k, v []byte
				k, v, more = z.TagAttr()
				an, av := strings.ToLower(string(k)), string(v)
				switch {
				case listAttrs[an]:
					c.urlList(av)
				case urlAttrs[an]:
					c.attrURL(av)
				case an == "xmlns" || strings.HasPrefix(an, "xmlns:"):
				default:
					if cssAttrs[an] {
						c.addAll(cssLinks(av)) // first: it names the decoded URL
					}
					c.addAll(textLinks(av))
					switch an {
					case "srcdoc":
						c.nested(av, depth)
					case "http-equiv":
						httpEquiv = av
					case "content":
						content = av
					}
				}
			}
			if strings.EqualFold(strings.TrimSpace(httpEquiv), "refresh") {
				if u := refreshURL(content); u != "" {
					c.attrURL(u)
				}
			}
		}
	}
}

// attrURL checks a URL attribute's value: whole, and split at spaces,
// separators, controls and format characters. A mail client's text part
// (and authmail's derived one) shows "https://app.example/x\u3000https://
// evil.example/" as two links, so every piece after the first is scanned
// for links of its own.
func (c *linkCollector) attrURL(v string) {
	c.add(strings.TrimSpace(v))
	pieces := strings.FieldsFunc(v, urlBreak)
	for i, p := range pieces {
		if i == 0 {
			c.add(p)
		} else {
			c.addAll(textLinks(p))
		}
	}
}

// urlList checks a srcset-like list: comma-separated candidates of a URL
// and descriptors ("2x", "100w"). Commas split candidates even inside a
// URL, which checks more pieces than a browser loads, never fewer;
// anything that is not a descriptor is scanned for links too.
func (c *linkCollector) urlList(v string) {
	for cand := range strings.SplitSeq(v, ",") {
		f := strings.Fields(cand)
		if len(f) == 0 {
			continue
		}
		c.attrURL(f[0])
		for _, d := range f[1:] {
			if !srcsetDescriptor.MatchString(d) {
				c.attrURL(d)
			}
		}
	}
}

var srcsetDescriptor = regexp.MustCompile(`^[0-9.eE+-]+[wxhWXH]$`)

// urlBreak reports whether a URL ends at r for a mail client: at any
// space or separator (Unicode ones too), control or format character.
func urlBreak(r rune) bool {
	return unicode.IsSpace(r) || unicode.In(r, unicode.Z, unicode.C)
}

// refreshURL returns the target of a meta refresh's content
// ("5; url='https://…'", "0;//host/", "0 https://…"), or "".
func refreshURL(content string) string {
	const ws = " \t\n\f\r"
	s := strings.TrimLeft(content, ws)
	s = strings.TrimLeft(s, "0123456789.")
	s = strings.TrimLeft(s, ws)
	if s != "" && (s[0] == ';' || s[0] == ',') {
		s = strings.TrimLeft(s[1:], ws)
	}
	if len(s) >= 3 && strings.EqualFold(s[:3], "url") {
		if t := strings.TrimLeft(s[3:], ws); strings.HasPrefix(t, "=") {
			s = strings.TrimLeft(t[1:], ws)
		}
	}
	if s != "" && (s[0] == '"' || s[0] == '\'') {
		q := s[0]
		s = s[1:]
		if i := strings.IndexByte(s, q); i >= 0 {
			s = s[:i]
		}
	}
	return strings.TrimSpace(s)
}

// cssLinks returns the URLs a piece of CSS loads: the content of every
// url(…) and the string after every @import, with CSS escapes ("\3a ",
// "\000041", "\:") decoded first, plus the links textLinks finds in the
// decoded text (which catches a "//host" or "https:host" in image-set()
// and other strings). Every url() is a link, so a relative or data: one
// is refused like a relative or data: src.
func cssLinks(s string) []string {
	if !strings.ContainsAny(s, "(@\\/:") {
		return nil
	}
	d := cssUnescape(s)
	out := textLinks(d)
	low := asciiLower(d)
	for i := 0; ; {
		j := strings.Index(low[i:], "url(")
		if j < 0 {
			break
		}
		i += j + 4
		if u := cssValue(d[i:], true); u != "" {
			out = append(out, u)
		}
	}
	for i := 0; ; {
		j := strings.Index(low[i:], "@import")
		if j < 0 {
			break
		}
		i += j + 7
		if u := cssValue(d[i:], false); u != "" {
			out = append(out, u)
		}
	}
	return out
}

// cssValue reads the string or unquoted URL at the start of s, after
// whitespace and comments: url(…)'s content when unquoted is true, else
// only a quoted string.
func cssValue(s string, unquoted bool) string {
	for {
		s = strings.TrimLeft(s, " \t\n\r\f")
		if !strings.HasPrefix(s, "/*") {
			break
		}
		end := strings.Index(s[2:], "*/")
		if end < 0 {
			return ""
		}
		s = s[2+end+2:]
	}
	if s == "" {
		return ""
	}
	if q := s[0]; q == '"' || q == '\'' {
		s = s[1:]
		if i := strings.IndexByte(s, q); i >= 0 {
			s = s[:i]
		}
		return strings.TrimSpace(s)
	}
	if !unquoted {
		return ""
	}
	if i := strings.IndexByte(s, ')'); i >= 0 {
		s = s[:i]
	}
	return strings.TrimSpace(s)
}

// cssUnescape decodes CSS escapes: a backslash and 1–6 hex digits (and
// one whitespace after them) is that code point, a backslash before a
// line break continues the line, and a backslash before any other
// character is that character.
func cssUnescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		c := s[i]
		if c != '\\' {
			b.WriteByte(c)
			i++
			continue
		}
		i++
		if i >= len(s) {
			break
		}
		if hexVal(s[i]) >= 0 {
			cp, n := 0, 0
			for n < 6 && i < len(s) && hexVal(s[i]) >= 0 {
				cp = cp*16 + hexVal(s[i])
				i++
				n++
			}
			if cp == 0 || cp > unicode.MaxRune || (cp >= 0xd800 && cp <= 0xdfff) {
				cp = utf8.RuneError
			}
			b.WriteRune(rune(cp))
			if i < len(s) && strings.IndexByte(" \t\n\r\f", s[i]) >= 0 {
				if s[i] == '\r' && i+1 < len(s) && s[i+1] == '\n' {
					i++
				}
				i++
			}
			continue
		}
		switch s[i] {
		case '\n', '\f':
			i++
		case '\r':
			i++
			if i < len(s) && s[i] == '\n' {
				i++
			}
		default:
			_, n := utf8.DecodeRuneInString(s[i:])
			b.WriteString(s[i : i+n])
			i += n
		}
	}
	return b.String()
}

func hexVal(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// asciiLower lowercases ASCII letters only, so that byte offsets stay
// those of s.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// textURL finds URLs in plain text: anything starting with a scheme and
// "://", with "www.", with "http:", "https:" or "ftp:" and no slashes
// (browsers read "https:evil.example" as https://evil.example), or with
// "//" or "\\" (protocol-relative; group 1) after a character that cannot
// end a path. A URL ends at any space or separator (also the Unicode
// ones, such as a no-break space or U+3000, where mail clients end a
// link too), a control or format character, or a quote or angle bracket.
// A scheme needs no word boundary before it: "_https://host" is a link in
// some clients.
var textURL = regexp.MustCompile(`(?i)(?:^|[^\w:/\\])([/\\]{2}[^\s\p{Z}\p{C}<>"'` + "`" + `]+)|(?:[a-z][a-z0-9+.-]*://|\bwww\.|(?:https?|ftp):)[^\s\p{Z}\p{C}<>"'` + "`" + `]+`)

// textLinks returns the URLs in a plain-text body.
func textLinks(src string) []string {
	var out []string
	for _, m := range textURL.FindAllStringSubmatchIndex(src, -1) {
		protoRelative := m[2] >= 0
		l := src[m[0]:m[1]]
		if protoRelative {
			l = src[m[2]:m[3]]
		}
		l = strings.TrimRight(l, ".,;:!?)]}'\"")
		low := strings.ToLower(l)
		switch {
		case protoRelative:
			if !hostLike(l) {
				continue // "//todo", a comment marker, no host a client would open
			}
		case strings.HasPrefix(low, "www."):
			l = "https://" + l
		case !strings.Contains(low, "://"):
			if _, rest, _ := strings.Cut(l, ":"); rest == "" {
				continue // "http:" alone
			}
		}
		out = append(out, l)
	}
	return out
}

// hostLike reports whether a protocol-relative "//host/…" in text names
// a host a reader could open: one with a dot (also an ideographic or
// fullwidth one), an IPv6 literal, or a numeric IPv4 address.
func hostLike(l string) bool {
	h := strings.TrimLeft(l, `/\`)
	if i := strings.IndexAny(h, `/\?#`); i >= 0 {
		h = h[:i]
	}
	if i := strings.LastIndex(h, "@"); i >= 0 {
		h = h[i+1:]
	}
	if h == "" {
		return false
	}
	if strings.ContainsAny(h, ".[\u3002\uff0e\uff61") {
		return true
	}
	return strings.Trim(asciiLower(h), "0123456789abcdefx") == "" && h[0] >= '0' && h[0] <= '9'
}

// linkVerdict checks one URL against the allowed origins. It returns ""
// when the link is fine, else a description of what it points to. URLs
// of http(s) or of no scheme are read the way browsers read them: a
// backslash is a slash, and "https:host" or "https:/host" names host.
func linkVerdict(raw string, origins []string) string {
	raw = strings.TrimSpace(raw)
	if raw == "" || strings.HasPrefix(raw, "#") {
		return ""
	}
	raw = browserForm(raw)
	u, err := url.Parse(raw)
	if err != nil {
		return "an unparsable URL"
	}
	scheme := strings.ToLower(u.Scheme)
	switch scheme {
	case "mailto", "tel", "cid":
		return "" // addresses and inline images, not web links
	case "http", "https":
	case "":
		if u.Host == "" {
			return "a relative URL (" + trimForMessage(raw) + "), which has no meaning in an email"
		}
		u.Scheme = "https" // protocol-relative: //host/path
	default:
		return "a " + scheme + ": URL"
	}
	if u.Host == "" {
		return "a URL without a host"
	}
	if o := origin(u); !slices.Contains(origins, o) {
		return o
	}
	return ""
}

// browserForm rewrites an http(s) or scheme-less URL the way the WHATWG
// URL parser reads it: backslashes are slashes, and after "http:" or
// "https:" any number of slashes (none too) starts the host.
func browserForm(raw string) string {
	scheme, rest, ok := strings.Cut(raw, ":")
	low := strings.ToLower(scheme)
	switch {
	case ok && (low == "http" || low == "https"):
		rest = strings.ReplaceAll(rest, `\`, "/")
		return scheme + "://" + strings.TrimLeft(rest, "/")
	case strings.HasPrefix(raw, `\`) || strings.HasPrefix(raw, "/"):
		raw = strings.ReplaceAll(raw, `\`, "/")
		if strings.HasPrefix(raw, "//") {
			return "//" + strings.TrimLeft(raw, "/")
		}
	}
	return raw
}

func trimForMessage(s string) string {
	if len(s) > 60 {
		return s[:57] + "..."
	}
	return s
}

// checkLinkPolicy enforces link_policy for /send bodies. The text part
// derived from an HTML body is checked too, as mail clients show it: it
// holds every href and the text of all elements run together, where
// "www.<b></b>evil.example" becomes one link.
func (h *Handler) checkLinkPolicy(htmlBody, textBody string) *apiError {
	if h.LinkPolicy != "enforce" {
		return nil
	}
	links := htmlLinks(htmlBody)
	if htmlBody != "" {
		links = append(links, textLinks(htmlToText(htmlBody))...)
	}
	if slices.Contains(links, nestedTooDeep) {
		return linkNotAllowed("html_body", "html_body nests markup in comments, raw-text elements or srcdoc more than %d levels deep, too deep for link_policy to check", maxMarkupDepth)
	}
	if err := h.checkLinkPolicyField("html_body", links); err != nil {
		return err
	}
	return h.checkLinkPolicyField("text_body", textLinks(textBody))
}

// checkLinkPolicyField enforces link_policy on the links of one field.
func (h *Handler) checkLinkPolicyField(field string, links []string) *apiError {
	if h.LinkPolicy != "enforce" {
		return nil
	}
	allowed := strings.Join(h.origins, ", ")
	if allowed == "" {
		allowed = "none configured"
	}
	for _, l := range links {
		if v := linkVerdict(l, h.origins); v != "" {
			return linkNotAllowed(field, "%s links to %s, which is not an allowed origin (allowed: %s)", field, v, allowed)
		}
	}
	return nil
}
