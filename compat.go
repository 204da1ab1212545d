package authmail

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// compatRelay is the value of compat that makes the handler answer as
// authmail-relay (github.com/hwan96-ai/authmail-relay) did wherever the two
// differ, so that its Python client and the receivers written to its
// webhook documentation work unchanged after a switch.
const compatRelay = "authmail-relay"

// compatRelayLocale is the locale of templated messages in compat
// authmail-relay mode when neither the request nor the config names one:
// the relay's built-in templates were Korean, and its users' end users
// would otherwise get English mail after the switch. Locale resolution
// takes it from defaultLocaleCompat.
const compatRelayLocale = "ko"

// compatRelayMagicLinkPath is the path the relay built magic links on,
// below MAGIC_LINK_BASE_URL: <base_url>/set-password?token=<token>.
const compatRelayMagicLinkPath = "/set-password"

// relayCompat reports whether the handler answers as authmail-relay.
func (h *Handler) relayCompat() bool { return h.Compat == compatRelay }

// defaultLocaleCompat is the locale a templated message uses when the
// request and the config give none: "ko" in compat authmail-relay mode,
// else "" (authmail's own default).
func (h *Handler) defaultLocaleCompat() string {
	if h.relayCompat() {
		return compatRelayLocale
	}
	return ""
}

// compatRelayExpiry is the validity in minutes that the relay's mail
// named for codes and links alike.
const compatRelayExpiry = 15

// expiryCompat is the default validity of an OTP code: the relay's 15
// minutes in compat authmail-relay mode (its client cannot pass
// expires_in_minutes, and its users' codes were announced as valid for
// 15 minutes), else the flow's own default.
func (h *Handler) expiryCompat(def int) int {
	if h.relayCompat() {
		return compatRelayExpiry
	}
	return def
}

// relayLinks returns the link templates in compat authmail-relay mode:
// the configured ones, plus magic links on the relay's path below
// base_url unless a link template for magic-link is configured.
func relayLinks(links map[string]string, baseURL string) map[string]string {
	if baseURL == "" || links["magic-link"] != "" {
		return links
	}
	out := make(map[string]string, len(links)+1)
	for k, v := range links {
		out[k] = v
	}
	out["magic-link"] = baseURL + compatRelayMagicLinkPath + "?token={token}"
	return out
}

// relayAcceptedResponse is the relay's answer to a send with a
// webhook_url: the result follows by webhook. id and message_id are
// authmail's additions (the webhook carries the same message_id).
type relayAcceptedResponse struct {
	Sent      bool   `json:"sent"`
	Status    string `json:"status"`
	Message   string `json:"message,omitempty"`
	ID        string `json:"id"`
	MessageID string `json:"message_id"`
}

// relayAccepted answers 200 {"sent":false,"status":"accepted"} for an
// accepted message whose result goes to its webhook, as the relay did;
// /send also says so in "message", as the relay's /send did.
func relayAccepted(flow, id, messageID string) apiResponse {
	r := relayAcceptedResponse{Sent: false, Status: "accepted", ID: id, MessageID: messageID}
	if flow == "send" {
		r.Message = "Send queued; final result will be delivered via webhook"
	}
	return apiResponse{status: http.StatusOK, body: marshalJSON(r), created: true}
}

// relayErrorResponse is an error answer in compat authmail-relay mode:
// authmail's flat fields plus FastAPI's "detail", which the relay's
// answers carried and apps written against it read. The relay's client
// reads body.get("detail", body) on a 502, so either shape gives it the
// error_code.
type relayErrorResponse struct {
	Detail any `json:"detail"`
	errorResponse
}

// relayValidationItem is one entry of FastAPI's 422 detail list.
type relayValidationItem struct {
	Type string   `json:"type"`
	Loc  []string `json:"loc"`
	Msg  string   `json:"msg"`
}

// relayError adds the relay's detail to an error answer: an object with
// error_code and message for a 502 (the relay's SMTP failure shape), a
// FastAPI validation list for an error that names a field, else the
// message (HTTPException's string detail).
func relayError(status int, e errorResponse) relayErrorResponse {
	out := relayErrorResponse{errorResponse: e}
	switch {
	case status == http.StatusBadGateway:
		out.Detail = map[string]string{"error_code": e.ErrorCode, "message": e.Message}
	case e.Field != "":
		out.Detail = []relayValidationItem{{Type: e.ErrorCode, Loc: []string{"body", e.Field}, Msg: e.Message}}
	default:
		out.Detail = e.Message
	}
	return out
}

// relayErrorBody rewrites an encoded error answer into the relay's shape;
// a body that is not an error answer is returned as it is.
func relayErrorBody(status int, body []byte) []byte {
	var e errorResponse
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(&e); err != nil || e.ErrorCode == "" {
		return body
	}
	// the answer keeps every field it has (an error answer may carry more
	// than errorResponse's, such as locale) and gains detail
	detail, err := json.Marshal(relayError(status, e).Detail)
	if err != nil {
		return body
	}
	return withLeadingJSONField(body, "detail", string(detail))
}

// withLeadingJSONField puts a field first in an encoded JSON object, as
// FastAPI's answers had detail.
func withLeadingJSONField(obj []byte, name, raw string) []byte {
	s := strings.TrimLeft(string(obj), " \t\r\n")
	if !strings.HasPrefix(s, "{") {
		return obj
	}
	rest := strings.TrimLeft(s[1:], " \t\r\n")
	sep := ","
	if strings.HasPrefix(rest, "}") {
		sep = ""
	}
	return []byte("{" + strconv.Quote(name) + ":" + raw + sep + rest)
}

// relayWebhookPayload is the webhook body in compat authmail-relay mode,
// field for field the relay's: status "delivered" (or "captured" in
// capture mode, as the relay's capture mode said) or "failed", error_code
// null on success, refused (always empty: authmail sends nothing when the
// server refuses any recipient, and the message fails with
// recipient_refused), sent_at with "+00:00" (when the message was sent, or
// became final). id is authmail's addition.
type relayWebhookPayload struct {
	MessageID string   `json:"message_id"`
	Status    string   `json:"status"`
	ErrorCode *string  `json:"error_code"`
	Refused   []string `json:"refused"`
	SentAt    string   `json:"sent_at"`
	Attempts  int      `json:"attempts"`
	ID        string   `json:"id"`
}

// relayPayloadOf builds the relay's webhook body for a final message;
// sentStatus names a delivered one.
func relayPayloadOf(st outbox.State, sentStatus string) relayWebhookPayload {
	p := relayWebhookPayload{MessageID: st.MessageID, Status: sentStatus, Refused: []string{}, Attempts: st.Attempts, ID: st.ID}
	at := st.SentAt
	if st.Status != outbox.Sent {
		p.Status = "failed"
		code := st.LastCode
		p.ErrorCode = &code
		at = st.Updated
	}
	if at.IsZero() {
		at = time.Now()
	}
	p.SentAt = at.UTC().Format("2006-01-02T15:04:05") + "+00:00"
	return p
}
