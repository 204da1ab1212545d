package authmail

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
)

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	rest, ok := h.route(r.URL.Path)
	if !ok {
		return next.ServeHTTP(w, r)
	}
	ep, msgID := lookupEndpoint(rest)
	if ep == nil && h.prefix == "" && !nearMiss(rest) {
		// path_prefix / shares the site with the app: a path that is not
		// one of authmail's goes on to the next handler
		return next.ServeHTTP(w, r)
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	rc := &requestCtx{repl: repl, requestID: requestID(r, repl), started: time.Now()}
	w.Header().Set("X-Request-ID", rc.requestID)

	if ep == nil {
		return h.reject(w, rc, &apiError{Status: http.StatusNotFound, Code: "not_found",
			Message: "no such endpoint: " + rest})
	}
	rc.flow = ep.flow
	if r.Method != ep.method() && (ep.method() != http.MethodGet || r.Method != http.MethodHead) {
		return h.reject(w, rc, &apiError{Status: http.StatusMethodNotAllowed, Code: "method_not_allowed",
			Message: "use " + ep.allow() + " for " + rest, Allow: ep.allow()})
	}
	if ep.kind == kindHealth {
		return writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	}
	if ep.kind == kindOpenAPI {
		return h.serveOpenAPI(w, rc)
	}
	h.shared.Start() // loads the hashing salt; a no-op once running
	lim := h.shared.limits
	now := time.Now()

	// A client that failed to authenticate too often is refused outright,
	// even with a valid key, for the rest of the window.
	ipKey := "a:" + lim.Hash(authFailureSubject(clientIP(r)))
	if blocked, wait := lim.Blocked(ipKey, h.authFail, now); blocked {
		return h.rateLimited(w, rc, "rate_limited", "too many failed authentication attempts from this client; retry later", wait)
	}

	// Authentication comes next: nothing else is looked at, and the body
	// is not read, for an unauthenticated request.
	key := h.authenticate(previewAuth(ep, r))
	if key == nil {
		lim.Record(ipKey, h.authFail, now)
		w.Header().Set("WWW-Authenticate", wwwAuthenticate(ep))
		return h.reject(w, rc, &apiError{Status: http.StatusUnauthorized, Code: "unauthorized",
			Message: "a valid API key is required: Authorization: Bearer <key>"})
	}
	keyID := key.id
	rc.keyID, rc.tenant = keyID, key.tenant
	if ep.perm != "" && !key.allow[ep.perm] {
		return h.reject(w, rc, &apiError{Status: http.StatusForbidden, Code: "forbidden",
			Message: "this API key may not use " + rest})
	}
	// by tenant, not key id: another site's key of the same name must not
	// spend this key's allowance
	if ok, wait := lim.Take("k:"+key.tenant, key.rate, now); !ok {
		return h.rateLimited(w, rc, "rate_limited", "this API key sent too many requests; retry later", wait)
	}
	// one deadline for all of the request's storage work (storageTimeout);
	// the test send's SMTP transaction is not storage work and keeps the
	// client's context
	clientReq := r
	ctx, cancel := withStorageDeadline(r.Context())
	defer cancel()
	r = r.WithContext(ctx)
	switch ep.kind {
	case kindStatus:
		return h.serveStatus(w, r, rc, key, msgID)
	case kindAdminStatus:
		return h.serveAdminStatus(w, rc)
	case kindMessages, kindRetry, kindPreview, kindPreviewFile:
		return h.serveConsole(w, r, rc, ep, key, msgID)
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return h.reject(w, rc, &apiError{Status: http.StatusUnsupportedMediaType, Code: "unsupported_media_type",
			Message: "Content-Type must be application/json"})
	}
	dryRun, aerr := parseDryRun(r.Header.Get("X-Dry-Run"))
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	idemKey, hasIdem := r.Header["Idempotency-Key"]
	if hasIdem {
		if aerr := checkIdempotencyKey(idemKey[0]); aerr != nil {
			return h.reject(w, rc, aerr)
		}
	}
	pref := parsePrefer(r.Header.Values("Prefer"))
	body, aerr := h.readBody(w, r)
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	if ep.kind == kindTest {
		return h.serveTest(w, clientReq, rc, body, dryRun)
	}
	if ep.kind == kindVerifyOTP || ep.kind == kindVerifyToken {
		return h.serveVerify(w, r, rc, ep, key, body, dryRun)
	}
	msgs, skip, aerr := h.prepare(ep, body)
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	if skip != "" {
		rc.setStatus("skipped", "")
		h.logger.Info("message skipped", zap.String("flow", ep.flow), zap.String("key_id", keyID),
			zap.String("reason", skip), zap.String("request_id", rc.requestID))
		return writeJSON(w, http.StatusOK, skippedResponse{Sent: false, Status: "skipped", Reason: skip})
	}

	now = time.Now()
	envs := make([]*mailer.Envelope, len(msgs))
	for i, m := range msgs {
		env, err := h.buildEnvelope(m, now)
		var he *headerError
		if errors.As(err, &he) {
			// a value the request's checks let through: still the caller's
			return h.reject(w, rc, invalid(he.field, "%s", he.problem))
		}
		if err != nil {
			h.logger.Error("rendering message failed", zap.String("flow", m.flow), zap.Error(err))
			return h.reject(w, rc, &apiError{Status: http.StatusInternalServerError, Code: "internal_error",
				Message: "the message could not be rendered; see the server log"})
		}
		envs[i] = env
	}
	if dryRun {
		rc.setStatus("dry_run", "")
		return writeJSON(w, http.StatusOK, dryRunResponse{Sent: false, DryRun: true, Message: "Email payload is valid"})
	}

	submit := func(batch string) apiResponse {
		// the recipient limit counts messages actually accepted: not dry
		// runs, not idempotent replays
		// every message of the request counts for its recipient: the
		// email-change notice to the old address too, or a caller could
		// flood that address with notices by varying the new one
		if spec, limited := h.rcptRates[ep.flow]; limited {
			keys := make([]string, 0, len(msgs))
			for _, m := range msgs {
				if k := "r:" + ep.flow + ":" + lim.Hash(strings.ToLower(m.to[0].Addr)); !slices.Contains(keys, k) {
					keys = append(keys, k)
				}
			}
			if i, wait := lim.TakeAll(keys, spec, time.Now()); i >= 0 {
				who := "this recipient"
				if i > 0 {
					who = "the old address (old_email)"
				}
				resp := errorAnswer(http.StatusTooManyRequests, "recipient_rate_limited",
					who+" got too many "+ep.flow+" messages recently; retry later")
				resp.retryAfter = retrySeconds(wait)
				return resp
			}
		}
		return h.submitIssued(r.Context(), rc, key, msgs, envs, batch, pref)
	}
	var resp apiResponse
	if hasIdem {
		resp = h.idempotent(r.Context(), key.tenant, idemKey[0], rest, body, submit)
	} else {
		resp = submit("")
	}
	return h.writeAnswer(w, rc, resp)
}

// lookupEndpoint finds the endpoint for a path below the prefix; for
// /messages/{id} it also returns the id.
func lookupEndpoint(rest string) (*endpoint, string) {
	if ep, arg := lookupConsole(rest); ep != nil {
		return ep, arg
	}
	if id, ok := strings.CutPrefix(rest, "/messages/"); ok && id != "" && !strings.Contains(id, "/") {
		return statusEndpoint, id
	}
	return endpoints[rest], ""
}

// nearMiss reports whether a path that is no endpoint is still meant for
// authmail under path_prefix /: one below /send/ or /verify/ (a misspelt
// flow), which gets authmail's JSON 404 rather than the app's answer.
func nearMiss(rest string) bool {
	return strings.HasPrefix(rest, "/send/") || strings.HasPrefix(rest, "/verify/")
}

// preference is what the Prefer header (RFC 7240) asks for.
type preference struct {
	async   bool
	wait    time.Duration
	hasWait bool
}

func parsePrefer(values []string) preference {
	var p preference
	for _, v := range values {
		for _, part := range strings.Split(v, ",") {
			tok, _, _ := strings.Cut(part, ";")
			name, val, _ := strings.Cut(strings.TrimSpace(tok), "=")
			switch strings.ToLower(strings.TrimSpace(name)) {
			case "respond-async":
				p.async = true
			case "wait":
				if n, err := strconv.Atoi(strings.Trim(strings.TrimSpace(val), `"`)); err == nil && n >= 0 {
					// capped before the multiplication, which could overflow
					p.wait, p.hasWait = time.Duration(min(n, int(maxPreferWait/time.Second)))*time.Second, true
				}
			}
		}
	}
	return p
}

// submit hands rendered messages to the outbox and waits, as configured
// or preferred, for the first delivery attempt.
func (h *Handler) submit(rc *requestCtx, msgs []*outMessage, envs []*mailer.Envelope, batch string, pref preference) apiResponse {
	news := make([]*outbox.NewMessage, len(msgs))
	for i, m := range msgs {
		news[i] = &outbox.NewMessage{KeyID: rc.keyID, Tenant: rc.tenant, Flow: m.flow, Profile: h.profile, MessageID: envs[i].MessageID,
			Env: envs[i], Webhook: m.webhook, Rcpts: h.logRcpts(envs[i].To), Expiry: m.expiry, Priority: m.priority}
	}
	wait := h.dcfg.Wait
	// the relay answered a send with a webhook_url at once and reported
	// the result by webhook
	relayAsync := h.relayCompat() && msgs[0].webhook.URL != ""
	switch {
	case pref.async || relayAsync:
		wait = 0
	case pref.hasWait:
		wait = pref.wait
	}
	entries, err := h.engine.Accept(news, batch, wait > 0)
	if err != nil {
		if errors.Is(err, outbox.ErrQueueFull) {
			msg := "the outbox holds the maximum number of unsent messages (delivery max_queued, less auth_reserve for /send); retry later"
			if errors.Is(err, outbox.ErrKeyQueueFull) {
				msg = "the outbox holds the maximum number of unsent messages of this key (delivery max_queued_per_key); retry later"
			}
			resp := errorAnswer(http.StatusServiceUnavailable, "queue_full", msg)
			resp.retryAfter = "30"
			return resp
		}
		h.logger.Error("accepting a message failed", zap.String("flow", msgs[0].flow), zap.Error(err))
		return errorAnswer(http.StatusServiceUnavailable, "outbox_unavailable", "the message could not be written to storage; nothing was sent, retry later")
	}
	for _, en := range entries {
		if ce := h.logger.Check(zapcore.DebugLevel, "message accepted"); ce != nil {
			ce.Write(zap.String("id", en.ID()), zap.String("flow", en.Flow()),
				zap.String("key_id", rc.keyID), zap.String("request_id", rc.requestID),
				zap.Strings("rcpt", en.Rcpts()), zap.Int("recipients", en.Recipients()))
		}
	}
	if wait > 0 {
		timer := time.NewTimer(wait)
		for _, en := range entries {
			select {
			case <-en.FirstAttempt():
				continue
			case <-timer.C:
			}
			break
		}
		timer.Stop()
	}
	if relayAsync {
		return relayAccepted(msgs[0].flow, entries[0].ID(), entries[0].MessageID())
	}
	states := h.engine.States(entries)
	if wait <= 0 {
		// answered right after the durable write: 202 queued, whatever a
		// fast worker may have done meanwhile, so that the answer does not
		// depend on a race (the status endpoint tells the rest)
		for i := range states {
			states[i].Status, states[i].LastCode, states[i].LastError = outbox.Queued, "", ""
		}
	}
	resp := h.answerFor(states)
	resp.location = h.statusPath(entries[0].ID())
	resp.created = true
	if pref.async {
		resp.prefer = "respond-async"
	} else if pref.hasWait {
		resp.prefer = "wait=" + strconv.Itoa(int(wait/time.Second))
	}
	return resp
}

func (h *Handler) statusPath(id string) string {
	return strings.TrimSuffix(h.prefix, "/") + "/messages/" + id
}

// answerFor builds the answer for the current state of accepted
// messages: the first is the one asked for, a second one is the
// email-change notice.
func (h *Handler) answerFor(states []outbox.State) apiResponse {
	p := states[0]
	var status int
	var body any
	switch p.Status {
	case outbox.Sent:
		status = http.StatusOK
		body = &sentResponse{Sent: true, Status: h.sentStatus(), ID: p.ID, MessageID: p.MessageID}
	case outbox.Failed, outbox.Unknown, outbox.Expired:
		status = http.StatusBadGateway
		body = &errorResponse{ErrorCode: p.LastCode, Message: p.LastError, Status: p.Status, ID: p.ID, MessageID: p.MessageID}
	default:
		status = http.StatusAccepted
		body = &sentResponse{Sent: false, Status: outbox.Queued, ID: p.ID, MessageID: p.MessageID, ErrorCode: p.LastCode}
	}
	if len(states) > 1 {
		n := states[1]
		notice := &noticeResponse{Sent: n.Status == outbox.Sent, Status: n.Status, ID: n.ID, MessageID: n.MessageID}
		switch {
		case n.Status == outbox.Sending:
			notice.Status = outbox.Queued
		case n.Status == outbox.Sent:
			notice.Status = h.sentStatus()
		}
		if n.Status != outbox.Sent {
			notice.ErrorCode, notice.Message = n.LastCode, n.LastError
		}
		switch b := body.(type) {
		case *sentResponse:
			b.Notice = notice
		case *errorResponse:
			b.Notice = notice
		}
	}
	return apiResponse{status: status, body: marshalJSON(body)}
}

// sentStatus is how an answer names a delivered message: "captured" in
// capture mode, else "sent".
func (h *Handler) sentStatus() string {
	if h.Capture != "" {
		return "captured"
	}
	return outbox.Sent
}

func errorAnswer(status int, code, msg string) apiResponse {
	return apiResponse{status: status, body: marshalJSON(errorResponse{ErrorCode: code, Message: msg})}
}

// writeAnswer writes a submit answer and sets the placeholders.
func (h *Handler) writeAnswer(w http.ResponseWriter, rc *requestCtx, resp apiResponse) error {
	var head struct {
		ID, MessageID, Status, ErrorCode string
	}
	var parsed map[string]any
	_ = json.Unmarshal(resp.body, &parsed)
	head.ID, _ = parsed["id"].(string)
	head.MessageID, _ = parsed["message_id"].(string)
	head.Status, _ = parsed["status"].(string)
	head.ErrorCode, _ = parsed["error_code"].(string)
	rc.id, rc.messageID = head.ID, head.MessageID
	if head.Status == "" {
		head.Status = "rejected"
		metricRejected(head.ErrorCode)
	}
	rc.setStatus(head.Status, head.ErrorCode)
	hdr := w.Header()
	if resp.status == http.StatusAccepted && resp.location != "" {
		hdr.Set("Location", resp.location)
	}
	if resp.retryAfter != "" {
		hdr.Set("Retry-After", resp.retryAfter)
	}
	if resp.prefer != "" {
		hdr.Set("Preference-Applied", resp.prefer)
	}
	if resp.replayed {
		hdr.Set("Idempotent-Replayed", "true")
	}
	if h.relayCompat() && resp.status >= 400 {
		return writeRaw(w, resp.status, relayErrorBody(resp.status, resp.body))
	}
	return writeRaw(w, resp.status, resp.body)
}

// serveStatus answers GET /messages/{id}; a message created with another
// key (another tenant, even under the same key id) is "not found", with
// the same answer as an id that does not exist.
func (h *Handler) serveStatus(w http.ResponseWriter, r *http.Request, rc *requestCtx, key *apiKey, id string) error {
	notFound := &apiError{Status: http.StatusNotFound, Code: "not_found", Message: "no message with this id for this key"}
	st, ok, err := h.lookup(r.Context(), id)
	if err != nil {
		h.logger.Error("reading message state failed", zap.Error(err))
		return h.reject(w, rc, &apiError{Status: http.StatusServiceUnavailable, Code: "outbox_unavailable",
			Message: "the message state could not be read; retry later"})
	}
	if !ok || !h.sees(key, st) {
		return h.reject(w, rc, notFound)
	}
	rc.id, rc.messageID = st.ID, st.MessageID
	rc.setStatus(st.Status, "")
	return writeJSON(w, http.StatusOK, statusOf(st))
}

// lookup is engine.Lookup bounded by ctx (see bounded): the engine's
// storage may ignore the deadline.
func (h *Handler) lookup(ctx context.Context, id string) (outbox.State, bool, error) {
	type found struct {
		st outbox.State
		ok bool
	}
	f, err := bounded(ctx, func(ctx context.Context) (found, error) {
		st, ok, err := h.engine.Lookup(ctx, id)
		return found{st, ok}, err
	}, nil)
	return f.st, f.ok, err
}

// statusResponse is the answer of GET /messages/{id}.
type statusResponse struct {
	ID            string          `json:"id"`
	Status        string          `json:"status"`
	Attempts      int             `json:"attempts"`
	CreatedAt     string          `json:"created_at"`
	UpdatedAt     string          `json:"updated_at"`
	NextAttemptAt *string         `json:"next_attempt_at"`
	MessageID     string          `json:"message_id"`
	LastErrorCode *string         `json:"last_error_code"`
	LastError     *string         `json:"last_error"`
	SMTPResponse  *string         `json:"smtp_response"`
	Flow          string          `json:"flow"`
	SentAt        *string         `json:"sent_at,omitempty"`
	ExpiresAt     *string         `json:"expires_at,omitempty"`
	Priority      string          `json:"priority,omitempty"`
	Webhook       *webhookSummary `json:"webhook,omitempty"`
}

type webhookSummary struct {
	Status   string `json:"status"`
	Attempts int    `json:"attempts"`
}

func statusOf(st outbox.State) statusResponse {
	opt := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	ts := func(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }
	out := statusResponse{
		ID: st.ID, Status: st.Status, Attempts: st.Attempts, CreatedAt: ts(st.Created), UpdatedAt: ts(st.Updated),
		MessageID: st.MessageID, LastErrorCode: opt(st.LastCode), LastError: opt(st.LastError),
		SMTPResponse: opt(st.SMTPResponse), Flow: st.Flow,
	}
	if st.Status == outbox.Queued && !st.NextAt.IsZero() {
		out.NextAttemptAt = opt(ts(st.NextAt))
	}
	if !st.SentAt.IsZero() {
		out.SentAt = opt(ts(st.SentAt))
	}
	if !st.ExpiresAt.IsZero() {
		out.ExpiresAt = opt(ts(st.ExpiresAt))
	}
	out.Priority = st.Priority
	if st.Webhook.URL != "" {
		out.Webhook = &webhookSummary{Status: st.Webhook.Status, Attempts: st.Webhook.Attempts}
		if out.Webhook.Status == "" {
			out.Webhook.Status = "waiting"
		}
	}
	return out
}

// logRcpts returns recipients as they may be logged: a salted hash of the
// address and its domain, or the address itself with log_recipients.
func (h *Handler) logRcpts(addrs []string) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		if h.LogRecipients {
			out[i] = a
			continue
		}
		_, dom, _ := cutLast(a, "@")
		out[i] = h.shared.limits.Hash(strings.ToLower(a)) + "@" + strings.ToLower(dom)
	}
	return out
}

// route returns the endpoint path below the prefix, or false when the
// request is not for authmail.
func (h *Handler) route(path string) (string, bool) {
	if h.prefix == "" || h.prefix == "/" {
		return path, true
	}
	rest, ok := strings.CutPrefix(path, h.prefix)
	if !ok || (rest != "" && rest[0] != '/') {
		return "", false
	}
	return rest, true
}

// authenticate checks the bearer token against every key in constant
// time (comparing SHA-256 hashes, so neither the secret nor its length
// leaks through timing) and returns the key, or nil.
func (h *Handler) authenticate(r *http.Request) *apiKey {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return nil
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return nil
	}
	sum := sha256.Sum256([]byte(token))
	found := -1
	for i := range h.keys {
		if subtle.ConstantTimeCompare(sum[:], h.keys[i].hash[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return nil
	}
	return &h.keys[found]
}

// clientIP is Caddy's client IP (which honours trusted_proxies), or the
// connection's address.
func clientIP(r *http.Request) string {
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// authFailureSubject is what failed authentication is counted against:
// the client's IPv4 address, or the /64 network of an IPv6 address (a
// single host usually has a whole /64 to rotate through).
func authFailureSubject(ip string) string {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return ip
	}
	a = a.Unmap()
	if a.Is4() {
		return a.String()
	}
	p, err := a.WithZone("").Prefix(64)
	if err != nil {
		return ip
	}
	return p.String()
}

func retrySeconds(d time.Duration) string {
	return strconv.Itoa(int(math.Ceil(d.Seconds())))
}

// rateLimited answers 429 with Retry-After.
func (h *Handler) rateLimited(w http.ResponseWriter, rc *requestCtx, code, msg string, wait time.Duration) error {
	w.Header().Set("Retry-After", retrySeconds(wait))
	return h.reject(w, rc, &apiError{Status: http.StatusTooManyRequests, Code: code, Message: msg})
}

func (h *Handler) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *apiError) {
	tooLarge := &apiError{Status: http.StatusRequestEntityTooLarge, Code: "payload_too_large",
		Message: "the request body is larger than max_body_size"}
	if r.ContentLength > h.MaxBodySize {
		return nil, tooLarge
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.MaxBodySize))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, tooLarge
		}
		return nil, &apiError{Status: http.StatusBadRequest, Code: "invalid_request",
			Message: "the request body could not be read"}
	}
	return body, nil
}

// parseDryRun reads the X-Dry-Run header.
func parseDryRun(v string) (bool, *apiError) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "":
		return false, nil
	case "true", "1", "yes":
		return true, nil
	case "false", "0", "no":
		return false, nil
	}
	return false, &apiError{Status: http.StatusBadRequest, Code: "invalid_request",
		Message: "X-Dry-Run must be true, 1, yes, false, 0 or no"}
}

// requestID returns the caller's X-Request-ID when it is a sane token,
// else Caddy's request UUID, else a random id.
func requestID(r *http.Request, repl *caddy.Replacer) string {
	if v := r.Header.Get("X-Request-ID"); v != "" && len(v) <= 128 && saneToken(v) {
		return v
	}
	if repl != nil {
		if v, ok := repl.GetString("http.request.uuid"); ok && v != "" {
			return v
		}
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func saneToken(v string) bool {
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// requestCtx carries per-request facts for logs and placeholders.
type requestCtx struct {
	repl      *caddy.Replacer
	requestID string
	started   time.Time
	flow      string
	keyID     string
	tenant    string // the key's tenantOf
	id        string
	messageID string
}

func (rc *requestCtx) setStatus(status, code string) {
	if rc.repl == nil {
		return
	}
	rc.repl.Set("http.authmail.flow", rc.flow)
	rc.repl.Set("http.authmail.key_id", rc.keyID)
	rc.repl.Set("http.authmail.id", rc.id)
	rc.repl.Set("http.authmail.message_id", rc.messageID)
	rc.repl.Set("http.authmail.status", status)
	rc.repl.Set("http.authmail.error_code", code)
}

// reject answers with an API error.
func (h *Handler) reject(w http.ResponseWriter, rc *requestCtx, e *apiError) error {
	rc.setStatus("rejected", e.Code)
	if e.Allow != "" {
		w.Header().Set("Allow", e.Allow)
	}
	if ce := h.logger.Check(zapcore.DebugLevel, "request rejected"); ce != nil {
		ce.Write(zap.String("error_code", e.Code), zap.Int("status", e.Status), zap.String("field", e.Field),
			zap.String("flow", rc.flow), zap.String("key_id", rc.keyID), zap.String("request_id", rc.requestID))
	}
	metricRejected(e.Code)
	out := errorResponse{ErrorCode: e.Code, Message: e.Message, Field: e.Field}
	if h.relayCompat() {
		return writeJSON(w, e.Status, relayError(e.Status, out))
	}
	return writeJSON(w, e.Status, out)
}

// Response bodies; field order is the documented one.
type errorResponse struct {
	ErrorCode string          `json:"error_code"`
	Message   string          `json:"message"`
	Field     string          `json:"field,omitempty"`
	Status    string          `json:"status,omitempty"`
	ID        string          `json:"id,omitempty"`
	MessageID string          `json:"message_id,omitempty"`
	Notice    *noticeResponse `json:"notice,omitempty"`
}

type sentResponse struct {
	Sent      bool            `json:"sent"`
	Status    string          `json:"status"`
	ID        string          `json:"id"`
	MessageID string          `json:"message_id"`
	ErrorCode string          `json:"error_code,omitempty"`
	Notice    *noticeResponse `json:"notice,omitempty"`
}

type noticeResponse struct {
	Sent      bool   `json:"sent"`
	Status    string `json:"status"`
	ID        string `json:"id"`
	MessageID string `json:"message_id"`
	ErrorCode string `json:"error_code,omitempty"`
	Message   string `json:"message,omitempty"`
}

type dryRunResponse struct {
	Sent    bool   `json:"sent"`
	DryRun  bool   `json:"dry_run"`
	Message string `json:"message"`
}

type skippedResponse struct {
	Sent   bool   `json:"sent"`
	Status string `json:"status"`
	Reason string `json:"reason"`
}

// marshalJSON encodes v without escaping HTML characters, so message
// ids read "<…@domain>" on the wire.
func marshalJSON(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return []byte(`{"error_code":"internal_error","message":"encoding the answer failed"}` + "\n")
	}
	return buf.Bytes()
}

// writeJSON writes v as the response.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	return writeRaw(w, status, marshalJSON(v))
}

func writeRaw(w http.ResponseWriter, status int, body []byte) error {
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, err := w.Write(body)
	return err
}
