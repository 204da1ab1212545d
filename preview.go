package authmail

import (
	"bytes"
	"context"
	"html/template"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/caddy-authmail/authmail/internal/mailtest"
	"github.com/caddy-authmail/authmail/internal/outbox"
)

// The preview page: GET {path_prefix}/preview renders every flow's
// templates (the live ones, custom templates included) with sample data
// that the query string can change, and GET /preview/{flow}.eml
// downloads one as a message. Keys with `allow preview` only.
//
// A browser cannot send a bearer token when it navigates, so these two
// endpoints also take the key as the password of HTTP Basic
// authentication (any user name), and their 401 asks for it
// (WWW-Authenticate: Basic). Caddy's access log redacts Authorization
// either way. The page runs no script: its Content-Security-Policy
// allows no script, no external resource and no form, and each HTML part
// is shown in an <iframe sandbox srcdoc> (sandbox without allow-scripts:
// a script in a template never runs; the srcdoc inherits the policy, so
// the message's own images and fonts are not fetched either).
const (
	kindPreview endpointKind = 110 + iota
	kindPreviewFile
)

var (
	previewEndpoint     = &endpoint{path: "/preview", flow: "preview", kind: kindPreview, perm: "preview"}
	previewFileEndpoint = &endpoint{path: "/preview/{flow}.eml", flow: "preview", kind: kindPreviewFile, perm: "preview"}
)

func init() {
	endpoints[previewEndpoint.path] = previewEndpoint
	extraEndpoints = append(extraEndpoints, previewFileEndpoint)
	pathTemplates[kindPreviewFile] = previewFileEndpoint.path
}

// previewHeader heads every previewed message: it says that the message
// is a sample and why it carries no DKIM signature.
const previewHeader = "X-Authmail-Preview: sample data, not sent; not DKIM-signed (mail that is sent is)\r\n"

// previewCSP is the page's Content-Security-Policy.
const previewCSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// previewAuth lets a browser authenticate to the preview endpoints with
// HTTP Basic: the password is the key's secret. It returns r with the
// secret as a bearer token; other requests are returned as they are.
//
// The outbox tab's retry buttons post to POST /messages/{id}/retry with
// the same Basic credentials, which the browser sends by itself: that
// one takes them only from a same-origin form (Sec-Fetch-Site or Origin
// say so), so that another site cannot make the browser retry messages.
func previewAuth(ep *endpoint, r *http.Request) *http.Request {
	if ep.kind == kindRetry && !sameOrigin(r) {
		return r
	}
	if ep.kind != kindPreview && ep.kind != kindPreviewFile && ep.kind != kindRetry {
		return r
	}
	if _, secret, ok := r.BasicAuth(); ok && secret != "" {
		r = r.Clone(r.Context())
		r.Header.Set("Authorization", "Bearer "+secret)
	}
	return r
}

// sameOrigin reports whether a browser says the request comes from a
// page of the same origin.
func sameOrigin(r *http.Request) bool {
	if s := r.Header.Get("Sec-Fetch-Site"); s != "" {
		return s == "same-origin"
	}
	o, err := url.Parse(r.Header.Get("Origin"))
	return err == nil && o.Host != "" && o.Host == r.Host
}

// viaBrowserForm reports whether a retry came from the preview page's
// form (Basic credentials) rather than from the API.
func viaBrowserForm(r *http.Request) bool {
	_, _, ok := r.BasicAuth()
	return ok
}

// wwwAuthenticate is the challenge of a 401 for ep.
func wwwAuthenticate(ep *endpoint) string {
	if ep.kind == kindPreview || ep.kind == kindPreviewFile {
		return `Basic realm="authmail preview", charset="UTF-8"`
	}
	return "Bearer"
}

// previewSample is the sample data of the page, changed by the query.
type previewSample struct {
	UserName, Email, Code, Token, Event, IP, UserAgent, Location string
	// Locale, when set, is the one locale shown (else every locale the
	// templates have)
	Locale string
}

var previewParams = []string{"flow", "locale", "user_name", "email", "code", "token", "event", "ip", "user_agent", "location"}

func parsePreviewQuery(q url.Values) (previewSample, []string, *apiError) {
	s := previewSample{UserName: "Jane Doe", Email: "jane@example.com", Code: "482913", Token: "sample-token-5Yq8",
		Event: "new_login", IP: "192.0.2.7", UserAgent: "Firefox on Linux", Location: "Berlin, Germany"}
	for k, v := range q {
		if k == "" {
			return s, nil, invalid("query", "holds a parameter without a name")
		}
		if !slices.Contains(previewParams, k) {
			return s, nil, invalid(k, "is not a parameter of /preview (%s)", strings.Join(previewParams, ", "))
		}
		if len(v) != 1 {
			return s, nil, invalid(k, "is given more than once")
		}
	}
	for _, f := range []struct {
		name string
		dst  *string
		max  int
	}{{"user_name", &s.UserName, maxUserNameRunes}, {"email", &s.Email, maxAddressBytes}, {"code", &s.Code, maxCodeRunes},
		{"token", &s.Token, 256}, {"ip", &s.IP, 64}, {"user_agent", &s.UserAgent, maxUserAgentRunes}, {"location", &s.Location, maxLocationRunes}} {
		if v, ok := q[f.name]; ok {
			check := checkText
			if f.name == "user_name" {
				check = checkHeaderText // as on the send endpoints: it goes into To
			}
			if err := check(f.name, v[0], f.max); err != nil {
				return s, nil, err
			}
			*f.dst = v[0]
		}
	}
	if v := q.Get("event"); v != "" {
		if _, ok := securityEvents[v]; !ok {
			return s, nil, invalid("event", "must be one of %s", strings.Join(securityEventNames(), ", "))
		}
		s.Event = v
	}
	if v := q.Get("locale"); v != "" {
		l, err := parseLocale(v, false)
		if err != nil {
			return s, nil, invalid("locale", "%v", err)
		}
		s.Locale = l
	}
	flows := templateFlows
	if v := q.Get("flow"); v != "" {
		if !slices.Contains(templateFlows, v) {
			return s, nil, invalid("flow", "must be one of %s", strings.Join(templateFlows, ", "))
		}
		flows = []string{v}
	}
	return s, flows, nil
}

// previewEntry is one rendered flow of the page.
type previewEntry struct {
	Flow, Subject, Text, HTML, Headers, Error string
	// Locale is the locale the flow was rendered in; Anchor is the
	// section's id (the flow's name for the first locale shown)
	Locale, Anchor string
	Links          []string // captured messages: the links of the text part
}

// previewFlow renders one flow with the sample data, as the send path
// composes it, and builds its message. A template that fails shows its
// error instead.
func (h *Handler) previewFlow(flow string, s previewSample) (previewEntry, []byte) {
	pe := previewEntry{Flow: flow}
	to, p := parseAddress(s.Email)
	if p != "" {
		pe.Error = "email " + p
		return pe, nil
	}
	to = withUserName(to, s.UserName)
	expiry := 0
	for _, e := range endpoints {
		if e.flow == flow {
			expiry = e.expiry
		}
	}
	if flow == "email-change-notice" {
		expiry = endpoints["/send/email-change"].expiry
	}
	d := h.newData(flow, to, s.UserName, expiry)
	switch flow {
	case "otp":
		d.Code = s.Code
	case "security-alert":
		d.ExpiresIn = ""
		d.Event, d.EventTitle = s.Event, securityEvents[s.Event].title
		d.IP, d.UserAgent, d.Location = s.IP, s.UserAgent, s.Location
		d.OccurredAt = time.Now().UTC().Format("2 January 2006, 15:04 UTC")
	case "email-change-notice":
		d.NewEmail, d.NewEmailMasked = "jane.new@example.com", maskAddress("jane.new@example.com")
	default:
		if link, err := h.buildLink(flow, s.Token, "", ""); err == nil {
			d.Link = link
		} else {
			d.Link = "https://app.example.com/" + flow + "?token=" + url.QueryEscape(s.Token)
		}
	}
	out, loc, err := h.renderFlow(flow, s.Locale, d)
	pe.Locale = loc
	if err != nil {
		pe.Error = err.Error()
		return pe, nil
	}
	pe.Subject, pe.Text, pe.HTML = out.subject, out.text, out.html
	m := &outMessage{flow: flow, to: []mailAddr{to}, replyTo: h.replyTo, subject: out.subject, text: out.text, html: out.html}
	// never signed with the production DKIM key (buildUnsigned says why)
	env, berr := h.buildUnsigned(m, time.Now())
	if berr != nil {
		pe.Error = "building the message: " + berr.Error()
		return pe, nil
	}
	env.Data = append([]byte(previewHeader), env.Data...)
	head, _, _ := bytes.Cut(env.Data, []byte("\r\n\r\n"))
	pe.Headers = strings.ReplaceAll(string(head), "\r\n", "\n")
	return pe, env.Data
}

var previewPage = template.Must(template.New("preview").Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>authmail preview</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 20px}header h1{font-size:18px;margin:0}
nav a{color:#cfd6e4;margin-right:14px}main{padding:16px 20px}
section.flow{background:#fff;border:1px solid #d9dde5;border-radius:6px;margin:0 0 18px;padding:12px 16px}
section.flow h2{font-size:16px;margin:0 0 4px}.subject{font-weight:600;margin:0 0 10px}
.parts{display:flex;gap:12px;flex-wrap:wrap}.parts>div{flex:1 1 420px;min-width:0}
iframe{width:100%;height:420px;border:1px solid #d9dde5;background:#fff}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f9fb;border:1px solid #e3e6ec;padding:8px;margin:0;max-height:420px;overflow:auto}
.error{color:#a30000;background:#fff0f0;border:1px solid #e8b4b4;padding:8px;white-space:pre-wrap}
details{margin-top:8px}h3{font-size:13px;margin:6px 0}
table.outbox{border-collapse:collapse;background:#fff;width:100%}table.outbox td,table.outbox th{border:1px solid #d9dde5;padding:4px 8px;text-align:left;vertical-align:top}
</style></head><body>
<header><h1>authmail preview — {{.AppName}}</h1>
<nav>{{range .Entries}}<a href="#{{.Anchor}}">{{.Flow}} ({{.Locale}})</a>{{end}}<a href="#outbox">outbox</a>{{if .CaptureDir}}<a href="#mailbox">mailbox</a>{{end}}</nav></header>
<main>
{{range .Entries}}<section class="flow" id="{{.Anchor}}" data-flow="{{.Flow}}" data-locale="{{.Locale}}" lang="{{.Locale}}">
<h2>{{.Flow}} <small>{{.Locale}}</small> <a href="{{$.Prefix}}/preview/{{.Flow}}.eml?locale={{.Locale}}{{$.QueryRest}}">.eml</a></h2>
{{if .Error}}<div class="error" data-error="{{.Flow}}">{{.Error}}</div>{{else}}
<p class="subject">Subject: <span data-subject>{{.Subject}}</span></p>
<div class="parts"><div><h3>HTML</h3><iframe sandbox title="{{.Flow}} HTML part" srcdoc="{{.HTML}}"></iframe></div>
<div><h3>Text</h3><pre data-text>{{.Text}}</pre></div></div>
<details><summary>Headers</summary><pre data-headers>{{.Headers}}</pre></details>{{end}}
</section>
{{end}}
<h2 id="outbox">Outbox <small>({{if .Admin}}{{.AdminWhat}}{{else}}this key's messages{{end}}, newest first)</small></h2>
{{if .OutboxError}}<div class="error">{{.OutboxError}}</div>{{else if .Outbox}}<table class="outbox"><tr><th>Created</th><th>Flow</th><th>Status</th><th>Attempts</th><th>Last error</th>{{if .Admin}}<th>Key</th>{{end}}<th></th></tr>
{{range .Outbox}}<tr data-id="{{.ID}}" data-status="{{.Status}}"><td>{{.Created}}</td><td>{{.Flow}}</td><td>{{.Status}}</td><td>{{.Attempts}}</td><td>{{.LastError}}</td>{{if $.Admin}}<td>{{.KeyID}}</td>{{end}}
<td>{{if .Retryable}}<form method="post" action="{{$.Prefix}}/messages/{{.ID}}/retry"><button type="submit" data-retry="{{.ID}}">Retry</button></form>{{end}}</td></tr>
{{end}}</table>{{else}}<p data-outbox-empty>No messages.</p>{{end}}
{{if .Mailbox}}<h2 id="mailbox">Mailbox <small>({{.CaptureDir}}, newest first)</small></h2>
{{range .Mailbox}}<section class="flow captured" data-captured="{{.Flow}}">
<h2>{{.Flow}}</h2>
{{if .Error}}<div class="error">{{.Error}}</div>{{else}}
<p class="subject">Subject: <span data-subject>{{.Subject}}</span></p>
{{if .Links}}<p>Links: {{range .Links}}<a data-link href="{{.}}" rel="noreferrer noopener" target="_blank">{{.}}</a> {{end}}</p>{{end}}
<div class="parts"><div><h3>HTML</h3><iframe sandbox title="{{.Flow}} HTML part" srcdoc="{{.HTML}}"></iframe></div>
<div><h3>Text</h3><pre data-text>{{.Text}}</pre></div></div>
<details><summary>Headers</summary><pre data-headers>{{.Headers}}</pre></details>{{end}}
</section>
{{end}}{{else if .CaptureDir}}<h2 id="mailbox">Mailbox</h2><p data-mailbox-empty>No captured messages in {{.CaptureDir}} yet.</p>{{end}}
</main></body></html>
`))

func (h *Handler) servePreview(w http.ResponseWriter, r *http.Request, rc *requestCtx, ep *endpoint, key *apiKey, arg string) error {
	q := r.URL.Query()
	if ep.kind == kindPreviewFile {
		flow, ok := strings.CutSuffix(arg, ".eml")
		if !ok || !slices.Contains(templateFlows, flow) {
			return h.reject(w, rc, &apiError{Status: http.StatusNotFound, Code: "not_found",
				Message: "no such flow: use /preview/<flow>.eml with one of " + strings.Join(templateFlows, ", ")})
		}
		q.Del("flow")
		s, _, aerr := parsePreviewQuery(q)
		if aerr != nil {
			return h.reject(w, rc, aerr)
		}
		pe, data := h.previewFlow(flow, s)
		if data == nil {
			return h.reject(w, rc, &apiError{Status: http.StatusUnprocessableEntity, Code: "template_error", Message: pe.Error})
		}
		rc.setStatus("ok", "")
		hdr := w.Header()
		hdr.Set("Content-Type", "message/rfc822")
		hdr.Set("Content-Disposition", `attachment; filename="`+flow+`.eml"`)
		hdr.Set("Cache-Control", "no-store")
		hdr.Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusOK)
		_, err := w.Write(data)
		return err
	}
	s, flows, aerr := parsePreviewQuery(q)
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	view := struct {
		AppName, Prefix, Query, CaptureDir string
		QueryRest                          string // the query without flow and locale, as "&…"
		Entries                            []previewEntry
		Mailbox                            []previewEntry
		Admin                              bool
		AdminWhat                          string
		Outbox                             []outboxRow
		OutboxError                        string
	}{AppName: h.appName, Prefix: strings.TrimSuffix(h.prefix, "/"), CaptureDir: h.Capture, Admin: key.allow["admin"],
		AdminWhat: "the messages of this site's keys"}
	if h.AdminScope == adminScopeStorage {
		view.AdminWhat = "every key's messages on the storage"
	}
	view.Mailbox = h.captured(r.Context(), key, maxMailbox)
	// the outbox tab: the same list as GET /messages, first page
	states, _, err := h.listMessages(r.Context(), key, outbox.ListQuery{Limit: maxMailbox})
	if err != nil {
		view.OutboxError = "the outbox could not be read; retry later"
	}
	for _, st := range states {
		view.Outbox = append(view.Outbox, outboxRow{ID: st.ID, Flow: st.Flow, Status: st.Status, Attempts: st.Attempts,
			Created: st.Created.UTC().Format("2006-01-02 15:04:05"), LastError: st.LastError, KeyID: st.KeyID,
			Retryable: st.Status == outbox.Failed || st.Status == outbox.Unknown})
	}
	q.Del("flow")
	if len(q) > 0 {
		view.Query = "?" + q.Encode()
	}
	q.Del("locale")
	if len(q) > 0 {
		view.QueryRest = "&" + q.Encode()
	}
	locales := h.tmpl.localeNames()
	if s.Locale != "" {
		locales = []string{s.Locale}
	}
	for _, f := range flows {
		shown := map[string]bool{}
		for _, l := range locales {
			sl := s
			sl.Locale = l
			pe, _ := h.previewFlow(f, sl)
			if shown[pe.Locale] {
				continue // a locale without templates of its own for this flow
			}
			shown[pe.Locale] = true
			pe.Anchor = f
			if len(shown) > 1 {
				pe.Anchor = f + "-" + pe.Locale
			}
			view.Entries = append(view.Entries, pe)
		}
	}
	var b bytes.Buffer
	if err := previewPage.Execute(&b, view); err != nil {
		return h.reject(w, rc, &apiError{Status: http.StatusInternalServerError, Code: "internal_error", Message: "rendering the preview page failed"})
	}
	rc.setStatus("ok", "")
	hdr := w.Header()
	hdr.Set("Content-Type", "text/html; charset=utf-8")
	hdr.Set("Content-Security-Policy", previewCSP)
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("X-Frame-Options", "DENY")
	hdr.Set("Referrer-Policy", "no-referrer")
	w.WriteHeader(http.StatusOK)
	_, err = w.Write(b.Bytes())
	return err
}

// outboxRow is one message of the outbox tab.
type outboxRow struct {
	ID, Flow, Status, Created, LastError, KeyID string
	Attempts                                    int
	Retryable                                   bool
}

// maxMailbox is the number of captured messages the page shows.
const maxMailbox = 20

var linkInText = regexp.MustCompile(`https?://[^\s<>"]+`)

// maxMailboxScan bounds the captured files read for one page: those of
// other tenants are skipped, and a page shows fewer than maxMailbox
// messages rather than read a whole directory.
const maxMailboxScan = 500

// captured reads the newest captured messages of the capture directory
// that key may see (names start with the capture time, so they sort by
// it, and end with the message's outbox id). The dev mailbox holds live
// codes and links, so it is scoped like the outbox tab (sees): a file
// whose message key may not see is not shown, and one whose message the
// outbox does not know (POST /test sends around the outbox; a message
// past retention) only to an admin key. Each is shown like a preview,
// with its links listed so that a developer can follow them; a file that
// does not parse shows its error.
func (h *Handler) captured(ctx context.Context, key *apiKey, n int) []previewEntry {
	dir := h.Capture
	if dir == "" {
		return nil
	}
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var names []string
	for _, de := range des {
		if de.Type().IsRegular() && strings.HasSuffix(de.Name(), ".eml") {
			names = append(names, de.Name())
		}
	}
	slices.Sort(names)
	slices.Reverse(names)
	var out []previewEntry
	for _, name := range names[:min(maxMailboxScan, len(names))] {
		if len(out) == n {
			break
		}
		if !h.mayReadCaptured(ctx, key, name) {
			continue
		}
		pe := previewEntry{Flow: name}
		raw, err := os.ReadFile(filepath.Join(dir, name))
		if err == nil {
			var m *mailtest.Message
			if m, err = mailtest.Parse(raw); err == nil {
				pe.Subject, pe.Text, pe.HTML = m.Subject, m.Text, m.HTML
				head, _, _ := bytes.Cut(raw, []byte("\r\n\r\n"))
				pe.Headers = strings.ReplaceAll(string(head), "\r\n", "\n")
				pe.Links = slices.Compact(linkInText.FindAllString(m.Text, 10))
			}
		}
		if err != nil {
			pe.Error = "reading " + name + ": " + err.Error()
		}
		out = append(out, pe)
	}
	return out
}

// mayReadCaptured reports whether key may see the captured file name
// (<time>-<outbox id>.eml, mailer.Capture).
func (h *Handler) mayReadCaptured(ctx context.Context, key *apiKey, name string) bool {
	base := strings.TrimSuffix(name, ".eml")
	id := base[strings.LastIndexByte(base, '-')+1:]
	st, ok, err := h.lookup(ctx, id)
	if err != nil {
		return false
	}
	if !ok {
		return key.allow["admin"]
	}
	return h.sees(key, st)
}

// previewOperation documents the preview endpoints.
func previewOperation(e *endpoint, op, ok oaJ, errs errorCodes, params *[]any) bool {
	q := func(name, desc string) oaJ {
		return oaJ{"name": name, "in": "query", "description": desc, "schema": oaJ{"type": "string"}}
	}
	sample := []any{q("user_name", "sample user name"), q("email", "sample recipient"), q("code", "sample OTP code"),
		q("token", "sample link token"), q("event", "security-alert event"), q("ip", "security-alert IP"),
		q("user_agent", "security-alert user agent"), q("location", "security-alert location")}
	errs.add(http.StatusUnprocessableEntity, "invalid_request")
	op["security"] = []any{oaJ{"bearer": []any{}}, oaJ{"basic": []any{}}}
	switch e.kind {
	case kindPreview:
		op["summary"] = "An HTML page rendering every flow's templates with sample data (allow preview)"
		*params = append(*params, q("flow", "only this flow"))
		*params = append(*params, sample...)
		ok["200"] = oaJ{"description": "the page; it runs no script and loads nothing from elsewhere (strict Content-Security-Policy)",
			"headers": oaJ{"X-Request-ID": oaJ{"$ref": "#/components/headers/RequestID"},
				"Content-Security-Policy": oaJ{"schema": oaJ{"type": "string", "const": previewCSP}}},
			"content": oaJ{"text/html": oaJ{"schema": oaJ{"type": "string"}}}}
	case kindPreviewFile:
		op["summary"] = "Download a flow rendered with sample data as a message (allow preview)"
		*params = append(*params, oaJ{"name": "flow", "in": "path", "required": true, "schema": oaJ{"type": "string", "enum": templateFlows}})
		*params = append(*params, sample...)
		ok["200"] = oaJ{"description": "the message", "headers": oaJ{"X-Request-ID": oaJ{"$ref": "#/components/headers/RequestID"}},
			"content": oaJ{"message/rfc822": oaJ{"schema": oaJ{"type": "string"}}}}
		errs.add(http.StatusNotFound, "not_found")
		errs.add(http.StatusUnprocessableEntity, "template_error")
	default:
		return false
	}
	return true
}
