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
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	rest, ok := h.route(r.URL.Path)
	if !ok {
		return next.ServeHTTP(w, r)
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	rc := &requestCtx{repl: repl, requestID: requestID(r, repl), started: time.Now()}
	w.Header().Set("X-Request-ID", rc.requestID)

	ep := endpoints[rest]
	if ep == nil {
		return h.reject(w, rc, &apiError{Status: http.StatusNotFound, Code: "not_found",
			Message: "no such endpoint: " + rest})
	}
	rc.flow = ep.flow
	if r.Method != ep.method() && (ep.kind != kindHealth || r.Method != http.MethodHead) {
		return h.reject(w, rc, &apiError{Status: http.StatusMethodNotAllowed, Code: "method_not_allowed",
			Message: "use " + ep.allow() + " for " + rest, Allow: ep.allow()})
	}
	if ep.kind == kindHealth {
		return writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	}

	// Authentication comes first: nothing else is looked at, and the body
	// is not read, for an unauthenticated request.
	keyID, ok := h.authenticate(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", "Bearer")
		return h.reject(w, rc, &apiError{Status: http.StatusUnauthorized, Code: "unauthorized",
			Message: "a valid API key is required: Authorization: Bearer <key>"})
	}
	rc.keyID = keyID
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return h.reject(w, rc, &apiError{Status: http.StatusUnsupportedMediaType, Code: "unsupported_media_type",
			Message: "Content-Type must be application/json"})
	}
	dryRun, aerr := parseDryRun(r.Header.Get("X-Dry-Run"))
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	body, aerr := h.readBody(w, r)
	if aerr != nil {
		return h.reject(w, rc, aerr)
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

	now := time.Now()
	envs := make([]*envelope, len(msgs))
	for i, m := range msgs {
		env, err := h.buildEnvelope(m, now)
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

	// The first message is the one the caller asked for; a second one is
	// the email-change notice to the old address, sent only when the
	// first went out.
	first := h.deliver(r.Context(), rc, msgs[0].flow, envs[0])
	rc.id, rc.messageID = envs[0].ID, envs[0].MessageID
	if first.err != nil {
		rc.setStatus("failed", first.err.Code)
		status := http.StatusBadGateway
		if first.err.Code == codeCaptureFailed {
			status = http.StatusInternalServerError // a local problem, not the gateway's
		}
		return writeJSON(w, status, errorResponse{
			ErrorCode: first.err.Code, Message: first.err.Error(),
			ID: envs[0].ID, MessageID: envs[0].MessageID,
		})
	}
	rc.setStatus(first.status, "")
	resp := sentResponse{Sent: true, Status: first.status, ID: envs[0].ID, MessageID: envs[0].MessageID}
	if len(envs) > 1 {
		n := h.deliver(r.Context(), rc, msgs[1].flow, envs[1])
		notice := &noticeResponse{Sent: n.err == nil, Status: n.status, ID: envs[1].ID, MessageID: envs[1].MessageID}
		if n.err != nil {
			notice.Status, notice.ErrorCode, notice.Message = "failed", n.err.Code, n.err.Error()
		}
		resp.Notice = notice
	}
	return writeJSON(w, http.StatusOK, resp)
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
// leaks through timing) and returns the key id.
func (h *Handler) authenticate(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return "", false
	}
	sum := sha256.Sum256([]byte(token))
	found := -1
	for i := range h.keys {
		if subtle.ConstantTimeCompare(sum[:], h.keys[i].hash[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return "", false
	}
	return h.keys[found].id, true
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

// outcome is the result of delivering one message.
type outcome struct {
	status string // sent, captured, failed
	err    *deliveryError
}

// deliver hands env to the transport and logs one line about it. The
// line never holds an address (only recipient domains), a body, a code,
// a link or a credential.
func (h *Handler) deliver(ctx context.Context, rc *requestCtx, flow string, env *envelope) outcome {
	start := time.Now()
	d, err := h.transport.send(ctx, env)
	fields := []zap.Field{
		zap.String("id", env.ID),
		zap.String("flow", flow),
		zap.String("key_id", rc.keyID),
		zap.String("request_id", rc.requestID),
		zap.Strings("recipient_domains", recipientDomains(env.To)),
		zap.Int("recipients", len(env.To)),
		zap.Duration("duration", time.Since(start)),
	}
	if err == nil {
		h.logger.Info("message "+d.Status, append(fields, zap.String("outcome", d.Status))...)
		return outcome{status: d.Status}
	}
	var de *deliveryError
	if !errors.As(err, &de) {
		de = &deliveryError{Code: codeSMTPConnection, Phase: phaseConnect, Err: err}
	}
	result := "failed"
	if de.uncertain() {
		result = "uncertain"
	}
	fields = append(fields, zap.String("outcome", result), zap.String("error_code", de.Code), zap.String("smtp_phase", de.Phase))
	if de.Reply != nil {
		// the reply text can quote a recipient address: log codes only
		fields = append(fields, zap.Int("smtp_code", de.Reply.Code), zap.String("smtp_enhanced_code", de.Reply.Enhanced))
	} else if de.Err != nil {
		fields = append(fields, zap.String("error", errText(de.Err)))
	}
	if ce := h.logger.Check(zapcore.ErrorLevel, "message "+result); ce != nil {
		ce.Write(fields...)
	}
	return outcome{status: "failed", err: de}
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
	return writeJSON(w, e.Status, errorResponse{ErrorCode: e.Code, Message: e.Message, Field: e.Field})
}

// Response bodies; field order is the documented one.
type errorResponse struct {
	ErrorCode string `json:"error_code"`
	Message   string `json:"message"`
	Field     string `json:"field,omitempty"`
	ID        string `json:"id,omitempty"`
	MessageID string `json:"message_id,omitempty"`
}

type sentResponse struct {
	Sent      bool            `json:"sent"`
	Status    string          `json:"status"`
	ID        string          `json:"id"`
	MessageID string          `json:"message_id"`
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

// writeJSON writes v as the response. HTML characters are not escaped,
// so message ids read "<…@domain>" on the wire.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, err := w.Write(buf.Bytes())
	return err
}
