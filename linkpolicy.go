package authmail

import (
	"net/url"
	"regexp"
	"slices"
	"strings"

	"golang.org/x/net/html"
)

// urlAttrs are the HTML attributes whose value is a URL a reader's mail
// client may open or load.
var urlAttrs = map[string]bool{
	"href": true, "src": true, "srcset": true, "action": true, "formaction": true,
	"background": true, "poster": true, "cite": true, "xlink:href": true,
}

// htmlLinks returns the URLs an HTML body can make a reader open or
// load: the values of URL attributes (href, src, srcset…), absolute URLs
// anywhere else in attribute values (a style's url(), a meta refresh, an
// object's data), absolute URLs in text (mail clients turn them into
// links, and so does the text part authmail derives from the HTML), in
// style and script content, and in comments, which are read as HTML again
// because Outlook renders the markup inside conditional comments
// (<!--[if mso]>…<![endif]-->). The DOCTYPE and xmlns attributes name
// schemas, not links, and are skipped.
func htmlLinks(src string) []string {
	return appendHTMLLinks(nil, src, 0)
}

// maxCommentDepth bounds how deeply comment content is read again.
const maxCommentDepth = 4

func appendHTMLLinks(out []string, src string, depth int) []string {
	z := html.NewTokenizer(strings.NewReader(src))
	for {
		switch z.Next() {
		case html.ErrorToken:
			return out
		case html.TextToken:
			out = append(out, textLinks(string(z.Text()))...)
		case html.CommentToken:
			if depth < maxCommentDepth {
				out = appendHTMLLinks(out, string(z.Text()), depth+1)
			} else {
				out = append(out, textLinks(string(z.Text()))...)
			}
		case html.StartTagToken, html.SelfClosingTagToken:
			_, more := z.TagName()
			for more {
				var k, v []byte
				k, v, more = z.TagAttr()
				name := strings.ToLower(string(k))
				switch {
				case name == "srcset":
					for _, cand := range strings.Split(string(v), ",") {
						if f := strings.Fields(cand); len(f) > 0 {
							out = append(out, f[0])
						}
					}
				case urlAttrs[name]:
					out = append(out, string(v))
				case name == "xmlns" || strings.HasPrefix(name, "xmlns:"):
				default:
					out = append(out, textLinks(string(v))...)
				}
			}
		}
	}
}

// textURL finds URLs in plain text: anything starting with a scheme and
// "://", or with "www.". A URL ends at any space or separator (also the
// Unicode ones, such as a no-break space, where mail clients end a link
// too), a control character, or a quote or angle bracket. A scheme needs
// no word boundary before it: "_https://host" is a link in some clients.
var textURL = regexp.MustCompile(`(?i)(?:[a-z][a-z0-9+.-]*://|\bwww\.)[^\s\p{Z}\p{Cc}<>"'` + "`" + `]+`)

// textLinks returns the URLs in a plain-text body.
func textLinks(src string) []string {
	var out []string
	for _, m := range textURL.FindAllString(src, -1) {
		m = strings.TrimRight(m, ".,;:!?)]}'\"")
		if strings.HasPrefix(strings.ToLower(m), "www.") {
			m = "https://" + m
		}
		out = append(out, m)
	}
	return out
}

// linkVerdict checks one URL against the allowed origins. It returns ""
// when the link is fine, else a description of what it points to.
func linkVerdict(raw string, origins []string) string {
	raw = strings.TrimSpace(raw)
	if raw == "" || strings.HasPrefix(raw, "#") {
		return ""
	}
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

func trimForMessage(s string) string {
	if len(s) > 60 {
		return s[:57] + "..."
	}
	return s
}

// checkLinkPolicy enforces link_policy for /send bodies.
func (h *Handler) checkLinkPolicy(htmlBody, textBody string) *apiError {
	if h.LinkPolicy != "enforce" {
		return nil
	}
	allowed := strings.Join(h.origins, ", ")
	if allowed == "" {
		allowed = "none configured"
	}
	for _, l := range htmlLinks(htmlBody) {
		if v := linkVerdict(l, h.origins); v != "" {
			return linkNotAllowed("html_body", "html_body links to %s, which is not an allowed origin (allowed: %s)", v, allowed)
		}
	}
	for _, l := range textLinks(textBody) {
		if v := linkVerdict(l, h.origins); v != "" {
			return linkNotAllowed("text_body", "text_body links to %s, which is not an allowed origin (allowed: %s)", v, allowed)
		}
	}
	return nil
}
