package authmail

import (
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// securityEvents are the events /send/security-alert accepts. All are on
// by default except new_login, which is noisy for most apps.
var securityEvents = map[string]struct {
	title     string
	defaultOn bool
}{
	"password_changed":    {"Your password was changed", true},
	"two_factor_enabled":  {"Two-factor authentication was turned on", true},
	"two_factor_disabled": {"Two-factor authentication was turned off", true},
	"account_locked":      {"Your account was locked", true},
	"new_login":           {"New sign-in to your account", false},
}

func securityEventNames() []string {
	names := make([]string, 0, len(securityEvents))
	for n := range securityEvents {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

type endpointKind int

const (
	kindHealth endpointKind = iota
	kindSend
	kindOTP
	kindLink
	kindAlert
	kindStatus
	kindAdminStatus
	kindTest
	kindVerifyOTP
	kindVerifyToken
)

// endpoint is one path of the API, relative to path_prefix.
type endpoint struct {
	path   string
	flow   string // flow name used in templates, logs and default links
	kind   endpointKind
	expiry int    // default validity in minutes (otp and link flows)
	perm   string // permission a key needs; "" for any key
}

func (e *endpoint) method() string {
	switch e.kind {
	case kindHealth, kindStatus, kindAdminStatus, kindOpenAPI:
		return http.MethodGet
	}
	if consoleGET(e.kind) {
		return http.MethodGet
	}
	return http.MethodPost
}

func (e *endpoint) allow() string {
	if e.method() == http.MethodGet {
		return "GET, HEAD"
	}
	return "POST"
}

// permGroup is the list of key permissions a flow's permission is in.
type permGroup int

const (
	permNone   permGroup = iota // any key
	permSend                    // the default of a key without allow
	permVerify                  // /verify/*, only when allowed
	permAdmin                   // /status and /test, only when allowed
)

// flowDef is one row of flowTable.
type flowDef struct {
	name  string // flow name: templates, logs, placeholders, recipient_rate and link keys
	path  string // endpoint path relative to path_prefix
	kind  endpointKind
	perm  string // permission a key needs; "" for any key
	group permGroup
	// expiry is the default validity in minutes of the code or link; 0
	// for flows without one.
	expiry int
	// link flows carry a link: `link <flow> <url>` and /verify/token
	// accept their names, and a token becomes
	// <base_url>/<linkPath>?token=<token> without a link template.
	link     bool
	linkPath string
	// recipientLimit flows are limited per recipient (recipient_rate).
	recipientLimit bool
	// templates are the template names the flow renders, its own first
	// (email-change also sends the notice to the old address).
	templates []string
}

// flowTable is the one list of flows. The endpoints, the key
// permissions (sendPerms, verifyPerms, adminPerms), the flows with a
// recipient limit, the link flows, the templates and the flows of
// /status all derive from it, so a new flow is one row here plus its
// template files. The order is the documented order of permissions and
// flows in error messages and /status.
var flowTable = []*flowDef{
	{name: "health", path: "/health", kind: kindHealth},
	{name: "send", path: "/send", kind: kindSend, perm: "send", group: permSend},
	{name: "otp", path: "/send/otp", kind: kindOTP, perm: "otp", group: permSend, expiry: 10,
		recipientLimit: true, templates: []string{"otp"}},
	{name: "magic-link", path: "/send/magic-link", kind: kindLink, perm: "magic-link", group: permSend, expiry: 15,
		link: true, linkPath: "magic-link", recipientLimit: true, templates: []string{"magic-link"}},
	{name: "password-reset", path: "/send/password-reset", kind: kindLink, perm: "password-reset", group: permSend, expiry: 60,
		link: true, linkPath: "password-reset", recipientLimit: true, templates: []string{"password-reset"}},
	{name: "verify-email", path: "/send/verify-email", kind: kindLink, perm: "verify-email", group: permSend, expiry: 1440,
		link: true, linkPath: "verify-email", recipientLimit: true, templates: []string{"verify-email"}},
	{name: "email-change", path: "/send/email-change", kind: kindLink, perm: "email-change", group: permSend, expiry: 1440,
		link: true, linkPath: "email-change", recipientLimit: true, templates: []string{"email-change", "email-change-notice"}},
	{name: "security-alert", path: "/send/security-alert", kind: kindAlert, perm: "security-alert", group: permSend,
		recipientLimit: true, templates: []string{"security-alert"}},
	{name: "status", path: "/status", kind: kindAdminStatus, perm: "status", group: permAdmin},
	{name: "test", path: "/test", kind: kindTest, perm: "test", group: permAdmin},
	{name: "verify-otp", path: "/verify/otp", kind: kindVerifyOTP, perm: "verify", group: permVerify},
	{name: "verify-token", path: "/verify/token", kind: kindVerifyToken, perm: "verify", group: permVerify},
	{name: "message-status", path: "/messages/", kind: kindStatus},
}

// flowNamed returns the row of a flow, or nil.
func flowNamed(name string) *flowDef {
	for _, f := range flowTable {
		if f.name == name {
			return f
		}
	}
	return nil
}

// flowNames returns the names of the flows for which keep is true, in
// table order.
func flowNames(keep func(*flowDef) bool) []string {
	var out []string
	for _, f := range flowTable {
		if keep(f) {
			out = append(out, f.name)
		}
	}
	return out
}

// permsOf returns the distinct permissions of a group, in table order.
func permsOf(g permGroup) []string {
	var out []string
	for _, f := range flowTable {
		if f.group == g && f.perm != "" && !slices.Contains(out, f.perm) {
			out = append(out, f.perm)
		}
	}
	return out
}

// listedFlow tells whether /status lists a flow: the endpoints a key
// needs a permission for, except the admin ones. Endpoints outside the
// table (the console's: openapi.json, messages, preview) are not flows.
func listedFlow(f *flowDef) bool { return f != nil && f.perm != "" && f.group != permAdmin }

var endpoints = map[string]*endpoint{}

// statusEndpoint serves GET /messages/{id}.
var statusEndpoint *endpoint

// linkFlows are the flows that carry a link; `link <flow> <url>` accepts
// these names.
var linkFlows = flowNames(func(f *flowDef) bool { return f.link })

func init() {
	for _, f := range flowTable {
		e := &endpoint{path: f.path, flow: f.name, kind: f.kind, expiry: f.expiry, perm: f.perm}
		if f.kind == kindStatus {
			statusEndpoint = e
			continue
		}
		endpoints[e.path] = e
	}
}

// deliveryFields are accepted by every send endpoint.
type deliveryFields struct {
	WebhookURL    string `json:"webhook_url"`
	WebhookSecret string `json:"webhook_secret"`
}

// Request bodies. Unknown fields are rejected.
type sendRequest struct {
	deliveryFields
	To       addressList `json:"to"`
	Cc       addressList `json:"cc"`
	Bcc      addressList `json:"bcc"`
	ReplyTo  addressList `json:"reply_to"`
	Subject  string      `json:"subject"`
	HTMLBody string      `json:"html_body"`
	TextBody string      `json:"text_body"`
	// ListUnsubscribe and ListUnsubscribePost become the RFC 2369 and
	// RFC 8058 header fields; only /send takes them
	ListUnsubscribe     string `json:"list_unsubscribe"`
	ListUnsubscribePost string `json:"list_unsubscribe_post"`
	// Priority "bulk" queues the message behind all other mail (the bulk
	// lane); "normal" or none is /send's own lane, behind the auth flows
	Priority string `json:"priority"`
}

// localeField is accepted by every templated flow.
type localeField struct {
	Locale string `json:"locale"`
}

type otpRequest struct {
	deliveryFields
	localeField
	To               addressList `json:"to"`
	UserName         string      `json:"user_name"`
	Code             string      `json:"code"`
	Purpose          string      `json:"purpose"`
	ExpiresInMinutes *int        `json:"expires_in_minutes"`
}

type linkRequest struct {
	deliveryFields
	localeField
	To               addressList `json:"to"`
	UserName         string      `json:"user_name"`
	ExpiresInMinutes *int        `json:"expires_in_minutes"`
	Token            string      `json:"token"`
	Link             string      `json:"link"`
	BaseURL          string      `json:"base_url"`
}

type emailChangeRequest struct {
	linkRequest
	OldEmail string `json:"old_email"`
}

type securityAlertRequest struct {
	deliveryFields
	localeField
	To         addressList `json:"to"`
	UserName   string      `json:"user_name"`
	Event      string      `json:"event"`
	IP         string      `json:"ip"`
	UserAgent  string      `json:"user_agent"`
	Location   string      `json:"location"`
	OccurredAt string      `json:"occurred_at"`
}

// outMessage is one message to render and deliver.
type outMessage struct {
	flow                 string
	locale               string // the locale it was rendered in; "" for /send
	to, cc, bcc, replyTo []mailAddr
	subject, text, html  string
	webhook              outbox.WebhookState
	issued               *issuedValue // a code or token authmail issued, stored on accept
	// expiry is how long the code or link it carries is valid: still
	// queued after that, the message is not sent; 0 for no limit
	expiry   time.Duration
	priority string // "bulk" for the bulk lane

	// listUnsub and listUnsubPost are /send's List-Unsubscribe fields
	listUnsub, listUnsubPost string
}

// checkWebhook validates a request's webhook fields.
func (h *Handler) checkWebhook(f deliveryFields) (outbox.WebhookState, *apiError) {
	if f.WebhookURL == "" {
		if f.WebhookSecret != "" {
			return outbox.WebhookState{}, invalid("webhook_secret", "needs a webhook_url")
		}
		return outbox.WebhookState{}, nil
	}
	if err := checkWebhookURL(f.WebhookURL, h.WebhookAllowHosts); err != nil {
		return outbox.WebhookState{}, err
	}
	if err := checkText("webhook_secret", f.WebhookSecret, 256); err != nil {
		return outbox.WebhookState{}, err
	}
	if _, err := outbox.WebhookKey(f.WebhookSecret); err != nil {
		return outbox.WebhookState{}, invalid("webhook_secret", "%s", err)
	}
	// the relay posted unsigned webhooks when no secret was given; compat
	// authmail-relay keeps that, everything else refuses
	if f.WebhookSecret == "" && (h.dcfg == nil || h.dcfg.WebhookSecret == "") && !h.relayCompat() {
		return outbox.WebhookState{}, invalid("webhook_secret", "is required: this server has no webhook_secret to sign webhooks with")
	}
	return outbox.WebhookState{URL: f.WebhookURL, Secret: f.WebhookSecret}, nil
}

// withWebhook validates the webhook fields and attaches them to the
// first message.
func (h *Handler) withWebhook(f deliveryFields, msgs []*outMessage, skip string, aerr *apiError) ([]*outMessage, string, *apiError) {
	if aerr != nil {
		return nil, "", aerr
	}
	wh, err := h.checkWebhook(f)
	if err != nil {
		return nil, "", err
	}
	if len(msgs) > 0 {
		msgs[0].webhook = wh
	}
	return msgs, skip, nil
}

// prepare validates a request body for ep and composes the messages to
// send. A non-empty skip means the request is valid but nothing is sent,
// for the given reason.
func (h *Handler) prepare(ep *endpoint, body []byte) (msgs []*outMessage, skip string, aerr *apiError) {
	switch ep.kind {
	case kindSend:
		return h.prepareSend(body)
	case kindOTP:
		return h.prepareOTP(ep, body)
	case kindLink:
		return h.prepareLink(ep, body)
	case kindAlert:
		return h.prepareAlert(body)
	}
	return nil, "", &apiError{Status: http.StatusNotFound, Code: "not_found", Message: "no such endpoint"}
}

func (h *Handler) prepareSend(body []byte) ([]*outMessage, string, *apiError) {
	var req sendRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, "", err
	}
	msgs, skip, aerr := h.composeSend(&req)
	return h.withWebhook(req.deliveryFields, msgs, skip, aerr)
}

func (h *Handler) composeSend(req *sendRequest) ([]*outMessage, string, *apiError) {
	m := &outMessage{flow: "send"}
	var err *apiError
	if m.to, err = req.To.addresses("to", true); err != nil {
		return nil, "", err
	}
	if m.cc, err = req.Cc.addresses("cc", false); err != nil {
		return nil, "", err
	}
	if m.bcc, err = req.Bcc.addresses("bcc", false); err != nil {
		return nil, "", err
	}
	for _, f := range []struct {
		name string
		as   []mailAddr
	}{{"to", m.to}, {"cc", m.cc}, {"bcc", m.bcc}} {
		if err := h.checkRecipients(f.name, f.as); err != nil {
			return nil, "", err
		}
	}
	if m.replyTo, err = req.ReplyTo.addresses("reply_to", false); err != nil {
		return nil, "", err
	}
	if strings.TrimSpace(req.Subject) == "" {
		return nil, "", invalid("subject", "is required")
	}
	if err := checkHeaderText("subject", req.Subject, maxSubjectRunes); err != nil {
		return nil, "", err
	}
	if req.HTMLBody == "" && req.TextBody == "" {
		return nil, "", invalid("text_body", "or html_body is required")
	}
	if p := bodyProblem(req.TextBody); p != "" {
		return nil, "", invalid("text_body", "%s", p)
	}
	if p := bodyProblem(req.HTMLBody); p != "" {
		return nil, "", invalid("html_body", "%s", p)
	}
	if n := len(envelopeRecipients(m.to, m.cc)); n > maxAddressesPerField && len(m.cc) > 0 {
		return nil, "", invalid("cc", "brings the message to %d recipients; at most %d are allowed per message", n, maxAddressesPerField)
	}
	if n := len(envelopeRecipients(m.to, m.cc, m.bcc)); n > maxAddressesPerField {
		return nil, "", invalid("bcc", "brings the message to %d recipients; at most %d are allowed per message", n, maxAddressesPerField)
	}
	if err := h.checkLinkPolicy(req.HTMLBody, req.TextBody); err != nil {
		return nil, "", err
	}
	if m.listUnsub, m.listUnsubPost, err = checkUnsubscribe(req.ListUnsubscribe, req.ListUnsubscribePost); err != nil {
		return nil, "", err
	}
	if err := h.checkLinkPolicyField("list_unsubscribe", unsubscribeLinks(m.listUnsub)); err != nil {
		return nil, "", err
	}
	switch req.Priority {
	case "", "normal":
	case outbox.PriorityBulk:
		m.priority = outbox.PriorityBulk
	default:
		return nil, "", invalid("priority", `must be "normal" or "bulk"`)
	}
	m.subject = strings.TrimSpace(req.Subject)
	m.html = req.HTMLBody
	m.text = req.TextBody
	if m.text == "" {
		m.text = htmlToText(req.HTMLBody)
		if m.text == "" {
			m.text = "This message has no text version; open it in a mail client that shows HTML.\n"
		}
	}
	return []*outMessage{m}, "", nil
}

// recipient validates the single "to" of a flow and applies user_name as
// its display name.
func (h *Handler) recipient(to addressList, userName string) (mailAddr, *apiError) {
	a, err := to.single("to")
	if err != nil {
		return a, err
	}
	if err := h.checkRecipients("to", []mailAddr{a}); err != nil {
		return a, err
	}
	// user_name becomes the display name and may be in a template's subject
	if err := checkHeaderText("user_name", userName, maxUserNameRunes); err != nil {
		return a, err
	}
	return withUserName(a, userName), nil
}

// checkRecipients refuses recipients outside the internet's mail system
// (localRecipientProblem) unless allow_local_recipients is on. Reply-To
// is not checked: the relay never connects to it.
func (h *Handler) checkRecipients(field string, as []mailAddr) *apiError {
	if h.AllowLocalRecipients {
		return nil
	}
	for i, a := range as {
		if p := localRecipientProblem(a); p != "" {
			if len(as) == 1 {
				return invalid(field, "%s", p)
			}
			return invalid(field, "entry %d %s", i+1, p)
		}
	}
	return nil
}

// withUserName gives an address without a display name the user's name
// as one, if it can be encoded in the header. The name greets the user in
// the templates in any case.
func withUserName(a mailAddr, userName string) mailAddr {
	if name := strings.TrimSpace(userName); a.Name == "" && displayNameProblem(name) == "" {
		a.Name = name
	}
	return a
}

func (h *Handler) newData(flow string, to mailAddr, userName string, expiry int) *templateData {
	return &templateData{
		Flow: flow, AppName: h.appName, UserName: strings.TrimSpace(userName), Email: to.Addr,
		ExpiresInMinutes: expiry, ExpiresIn: humanMinutes(expiry),
	}
}

// compose renders a flow's templates into a message for one recipient,
// in the locale resolved for the requested tag (canonical, "" for none).
func (h *Handler) compose(flow, tag string, to mailAddr, d *templateData) (*outMessage, *apiError) {
	out, loc, err := h.renderFlow(flow, tag, d)
	if err != nil {
		// templates passed the self-test at provision; a failure here is a bug
		h.logger.Error("rendering template failed", zap.String("flow", flow), zap.Error(err))
		return nil, &apiError{Status: http.StatusInternalServerError, Code: "internal_error",
			Message: "the message could not be rendered; see the server log"}
	}
	return &outMessage{flow: flow, locale: loc, to: []mailAddr{to}, replyTo: h.replyTo,
		subject: out.subject, text: out.text, html: out.html}, nil
}

func (h *Handler) prepareOTP(ep *endpoint, body []byte) ([]*outMessage, string, *apiError) {
	var req otpRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, "", err
	}
	msgs, skip, aerr := h.composeOTP(ep, &req)
	return h.withWebhook(req.deliveryFields, msgs, skip, aerr)
}

func (h *Handler) composeOTP(ep *endpoint, req *otpRequest) ([]*outMessage, string, *apiError) {
	to, err := h.recipient(req.To, req.UserName)
	if err != nil {
		return nil, "", err
	}
	tag, err := checkLocale(req.Locale)
	if err != nil {
		return nil, "", err
	}
	auto, purpose, err := h.issueCode(req.Code, req.Purpose)
	if err != nil {
		return nil, "", err
	}
	code := req.Code
	if auto {
		code = h.codes.newCode()
	} else if err := checkCode(req.Code); err != nil {
		return nil, "", err
	}
	exp, err := checkExpiry(req.ExpiresInMinutes, h.expiryCompat(ep.expiry))
	if err != nil {
		return nil, "", err
	}
	d := h.newData(ep.flow, to, req.UserName, exp)
	d.Code = code
	m, err := h.compose(ep.flow, tag, to, d)
	if err != nil {
		return nil, "", err
	}
	m.expiry = time.Duration(exp) * time.Minute
	if auto {
		m.issued = &issuedValue{otp: true, value: code, purpose: purpose, to: to.Addr, expiry: time.Duration(exp) * time.Minute}
	}
	return []*outMessage{m}, "", nil
}

func (h *Handler) prepareLink(ep *endpoint, body []byte) ([]*outMessage, string, *apiError) {
	var req emailChangeRequest
	var err *apiError
	if ep.flow == "email-change" {
		err = decodeJSON(body, &req)
	} else {
		err = decodeJSON(body, &req.linkRequest)
	}
	if err != nil {
		return nil, "", err
	}
	msgs, skip, aerr := h.composeLink(ep, &req)
	return h.withWebhook(req.deliveryFields, msgs, skip, aerr)
}

func (h *Handler) composeLink(ep *endpoint, req *emailChangeRequest) ([]*outMessage, string, *apiError) {
	to, err := h.recipient(req.To, req.UserName)
	if err != nil {
		return nil, "", err
	}
	tag, err := checkLocale(req.Locale)
	if err != nil {
		return nil, "", err
	}
	exp, err := checkExpiry(req.ExpiresInMinutes, ep.expiry)
	if err != nil {
		return nil, "", err
	}
	auto, err := h.issueToken(req.Token)
	if err != nil {
		return nil, "", err
	}
	token := req.Token
	if auto {
		token = newToken()
	}
	link, err := h.buildLink(ep.flow, token, req.Link, req.BaseURL)
	if err != nil {
		return nil, "", err
	}
	var old mailAddr
	if req.OldEmail != "" {
		var p string
		if old, p = parseAddress(req.OldEmail); p != "" {
			return nil, "", invalid("old_email", "%s", p)
		}
		if err := h.checkRecipients("old_email", []mailAddr{old}); err != nil {
			return nil, "", err
		}
		if strings.EqualFold(old.Addr, to.Addr) {
			return nil, "", invalid("old_email", "must differ from to")
		}
	}
	d := h.newData(ep.flow, to, req.UserName, exp)
	d.Link = link
	m, err := h.compose(ep.flow, tag, to, d)
	if err != nil {
		return nil, "", err
	}
	m.expiry = time.Duration(exp) * time.Minute
	if auto {
		m.issued = &issuedValue{value: token, flow: ep.flow, to: to.Addr, oldEmail: old.Addr, expiry: time.Duration(exp) * time.Minute}
	}
	msgs := []*outMessage{m}
	if old.Addr != "" {
		old = withUserName(old, req.UserName)
		nd := h.newData("email-change-notice", old, req.UserName, exp)
		nd.NewEmail, nd.NewEmailMasked = to.Addr, maskAddress(to.Addr)
		notice, err := h.compose("email-change-notice", tag, old, nd)
		if err != nil {
			return nil, "", err
		}
		msgs = append(msgs, notice)
	}
	return msgs, "", nil
}

// buildLink returns the action link for a link flow: the caller's link
// (checked against the allowed origin), or the token turned into a link
// through the caller's base_url, the flow's link template, or base_url.
func (h *Handler) buildLink(flow, token, link, baseURL string) (string, *apiError) {
	switch {
	case token != "" && link != "":
		return "", invalid("link", "cannot be combined with token; give one of them")
	case token == "" && link == "":
		return "", invalid("token", "or link is required")
	}
	if link != "" {
		if baseURL != "" {
			return "", invalid("base_url", "cannot be combined with link")
		}
		u, p := parseHTTPURL(link)
		if p != "" {
			return "", invalid("link", "%s", p)
		}
		if err := h.checkOrigin("link", u); err != nil {
			return "", err
		}
		return link, nil
	}
	if err := checkToken(token); err != nil {
		return "", err
	}
	esc := url.QueryEscape(token)
	if baseURL != "" {
		u, p := parseHTTPURL(baseURL)
		if p != "" {
			return "", invalid("base_url", "%s", p)
		}
		if u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
			return "", invalid("base_url", "must not have a query or a fragment")
		}
		if err := h.checkOrigin("base_url", u); err != nil {
			return "", err
		}
		return strings.TrimRight(baseURL, "/") + "/" + h.linkPath(flow) + "?token=" + esc, nil
	}
	if tpl := h.Links[flow]; tpl != "" {
		return strings.ReplaceAll(tpl, "{token}", esc), nil
	}
	if h.baseURL != "" {
		return h.baseURL + "/" + h.linkPath(flow) + "?token=" + esc, nil
	}
	return "", invalid("token", "cannot be turned into a link: this server has no base_url and no link template for %s; configure `base_url <url>` or `link %s <url with {token}>`", flow, flow)
}

// linkPath is a link flow's path below a base URL when a token becomes
// a link without a link template.
func (h *Handler) linkPath(flow string) string { return linkPathOf(flow) }

// linkPathOf is a link flow's default path below a base URL (its
// flowTable linkPath).
func linkPathOf(flow string) string {
	if f := flowNamed(flow); f != nil && f.linkPath != "" {
		return f.linkPath
	}
	return flow
}

// checkOrigin accepts a caller-supplied URL only on an allowed origin:
// base_url's or one of allow_origins.
func (h *Handler) checkOrigin(field string, u *url.URL) *apiError {
	if len(h.origins) == 0 {
		return linkNotAllowed(field, "%s is not allowed: this server has no base_url or allow_origin, so caller-supplied links and base URLs are refused", field)
	}
	if o := origin(u); !slices.Contains(h.origins, o) {
		return linkNotAllowed(field, "%s points to %s, which is not an allowed origin (allowed: %s)", field, o, strings.Join(h.origins, ", "))
	}
	return nil
}

func (h *Handler) prepareAlert(body []byte) ([]*outMessage, string, *apiError) {
	var req securityAlertRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, "", err
	}
	msgs, skip, aerr := h.composeAlert(&req)
	return h.withWebhook(req.deliveryFields, msgs, skip, aerr)
}

func (h *Handler) composeAlert(req *securityAlertRequest) ([]*outMessage, string, *apiError) {
	to, err := h.recipient(req.To, req.UserName)
	if err != nil {
		return nil, "", err
	}
	tag, err := checkLocale(req.Locale)
	if err != nil {
		return nil, "", err
	}
	if req.Event == "" {
		return nil, "", invalid("event", "is required")
	}
	if _, known := securityEvents[req.Event]; !known {
		return nil, "", invalid("event", "must be one of %s", strings.Join(securityEventNames(), ", "))
	}
	d := h.newData("security-alert", to, req.UserName, 0)
	d.ExpiresIn = ""
	// the title is the message locale's, filled when it is rendered
	d.Event = req.Event
	if req.IP != "" {
		// no zone: "fe80::1%<anything>" would carry arbitrary text (line
		// breaks included) into a trusted security alert
		ip, perr := netip.ParseAddr(req.IP)
		if perr != nil || ip.Zone() != "" {
			return nil, "", invalid("ip", "must be an IPv4 or IPv6 address without a zone")
		}
		d.IP = ip.String()
	}
	if err := checkText("user_agent", req.UserAgent, maxUserAgentRunes); err != nil {
		return nil, "", err
	}
	if err := checkText("location", req.Location, maxLocationRunes); err != nil {
		return nil, "", err
	}
	d.UserAgent, d.Location = strings.TrimSpace(req.UserAgent), strings.TrimSpace(req.Location)
	if req.OccurredAt != "" {
		// RFC 3339 (5.6) allows a lower-case "t" and "z"; Go's layout does not
		t, perr := time.Parse(time.RFC3339, strings.ToUpper(req.OccurredAt))
		if perr != nil {
			return nil, "", invalid("occurred_at", "must be an RFC 3339 timestamp such as 2026-01-02T15:04:05Z")
		}
		d.OccurredAt = t.UTC().Format("2 January 2006, 15:04 UTC")
		d.occurredAt = t.UTC() // OccurredAt in the message's locale
	}
	if !h.alertEnabled(req.Event) {
		return nil, "event_disabled", nil
	}
	m, err := h.compose("security-alert", tag, to, d)
	if err != nil {
		return nil, "", err
	}
	return []*outMessage{m}, "", nil
}

func (h *Handler) alertEnabled(event string) bool {
	if on, set := h.SecurityAlerts[event]; set {
		return on
	}
	return securityEvents[event].defaultOn
}
