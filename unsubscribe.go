package authmail

import (
	"net/url"
	"strings"
)

// List-Unsubscribe limits: two URIs (one https, one mailto is what
// Gmail and Yahoo ask of bulk senders), and a field that stays within
// the 998-octet line limit however go-mail folds it.
const (
	maxUnsubscribeURIs  = 2
	maxUnsubscribeField = 900
	oneClickValue       = "List-Unsubscribe=One-Click"
)

// unsubscribeLinks returns the https URIs of a checked List-Unsubscribe
// value: mail clients show them as an Unsubscribe button, so link_policy
// judges them like the links of the body.
func unsubscribeLinks(list string) []string {
	var out []string
	for _, part := range strings.Split(list, ",") {
		u := strings.Trim(strings.TrimSpace(part), "<>")
		if strings.HasPrefix(u, "https:") {
			out = append(out, u)
		}
	}
	return out
}

// checkUnsubscribe validates /send's list_unsubscribe (RFC 2369: angle-
// bracketed https or mailto URIs, comma separated) and
// list_unsubscribe_post (RFC 8058: exactly "List-Unsubscribe=One-Click",
// only with an https URI). It returns the header values as they will be
// sent. The auth flows never set these fields: their mail is not
// subscription mail.
func checkUnsubscribe(list, post string) (string, string, *apiError) {
	if list == "" {
		if post != "" {
			return "", "", invalid("list_unsubscribe_post", "needs a list_unsubscribe with an https URI")
		}
		return "", "", nil
	}
	if len(list) > maxUnsubscribeField {
		return "", "", invalid("list_unsubscribe", "is longer than %d characters", maxUnsubscribeField)
	}
	var uris []string
	https := false
	for _, part := range strings.Split(list, ",") {
		p := strings.TrimSpace(part)
		if len(p) < 3 || p[0] != '<' || p[len(p)-1] != '>' {
			return "", "", invalid("list_unsubscribe", "must be one or two URIs in angle brackets, separated by a comma: <https://…>, <mailto:…>")
		}
		raw := p[1 : len(p)-1]
		if strings.Contains(raw, "=?") {
			// the start of an RFC 2047 encoded word: lenient mail clients
			// decode one even inside a URI, and =?UTF-8?B?DQpCY2M6…?=
			// becomes a line break and a Bcc: header
			return "", "", invalid("list_unsubscribe", "URIs must not hold \"=?\", which starts an encoded word (percent-encode it as %%3D%%3F)")
		}
		for i := 0; i < len(raw); i++ {
			if c := raw[i]; c <= ' ' || c >= 0x7f || c == '<' || c == '>' || c == '"' || c == ',' {
				return "", "", invalid("list_unsubscribe", "URIs must be ASCII without spaces, quotes, commas or angle brackets (percent-encode them)")
			}
		}
		u, err := url.Parse(raw)
		if err != nil {
			return "", "", invalid("list_unsubscribe", "holds an invalid URI")
		}
		switch u.Scheme {
		case "https":
			if u.Host == "" || u.User != nil {
				return "", "", invalid("list_unsubscribe", "https URIs need a host and no user info")
			}
			https = true
		case "mailto":
			if u.Opaque == "" || !strings.Contains(u.Opaque, "@") {
				return "", "", invalid("list_unsubscribe", "mailto URIs need an address")
			}
		default:
			return "", "", invalid("list_unsubscribe", "URIs must be https or mailto")
		}
		uris = append(uris, "<"+raw+">")
	}
	if len(uris) > maxUnsubscribeURIs {
		return "", "", invalid("list_unsubscribe", "has more than %d URIs", maxUnsubscribeURIs)
	}
	if post != "" {
		if post != oneClickValue {
			return "", "", invalid("list_unsubscribe_post", "must be exactly %s", oneClickValue)
		}
		if !https {
			return "", "", invalid("list_unsubscribe_post", "needs an https URI in list_unsubscribe (RFC 8058)")
		}
	}
	return strings.Join(uris, ", "), post, nil
}
