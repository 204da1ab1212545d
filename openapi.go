package authmail

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// The OpenAPI 3.1 document of the API, served at GET
// {path_prefix}/openapi.json without a key. It is generated from the
// endpoint table the router uses (endpoints, statusEndpoint and the
// console's endpoints): every endpoint kind must have an operation here,
// or openAPIDocument fails and so does TestOpenAPICoversEveryEndpoint, so
// an endpoint cannot exist without its document. It holds no
// configuration (only path_prefix, as the server URL), so it is the same
// for every key and needs none.

// kindOpenAPI serves the document itself.
const kindOpenAPI endpointKind = 100

var openAPIEndpoint = &endpoint{path: "/openapi.json", flow: "openapi", kind: kindOpenAPI}

func init() { endpoints[openAPIEndpoint.path] = openAPIEndpoint }

// oaJ is a JSON object of the document.
type oaJ = map[string]any

// documentedEndpoints is every endpoint the router serves, in path order.
func documentedEndpoints() []*endpoint {
	out := endpointsInOrder()
	if !slices.Contains(out, statusEndpoint) {
		out = append(out, statusEndpoint)
	}
	for _, e := range extraEndpoints {
		if !slices.Contains(out, e) {
			out = append(out, e)
		}
	}
	return out
}

// extraEndpoints are routed outside the endpoints map (by lookupEndpoint
// or lookupConsole); they are documented like the others.
var extraEndpoints []*endpoint

// apiPath is an endpoint's path template in the document.
func apiPath(e *endpoint) string {
	if e == statusEndpoint {
		return "/messages/{id}"
	}
	if p, ok := pathTemplates[e.kind]; ok {
		return p
	}
	return e.path
}

// pathTemplates names the path template of kinds whose path has a
// parameter.
var pathTemplates = map[endpointKind]string{}

var (
	openAPIOnce sync.Map // path_prefix -> []byte
)

// openAPIJSON returns the encoded document for a path prefix.
func openAPIJSON(prefix string) ([]byte, error) {
	if b, ok := openAPIOnce.Load(prefix); ok {
		return b.([]byte), nil
	}
	doc, err := openAPIDocument(prefix)
	if err != nil {
		return nil, err
	}
	b := marshalJSON(doc)
	openAPIOnce.Store(prefix, b)
	return b, nil
}

// serveOpenAPI answers GET /openapi.json.
func (h *Handler) serveOpenAPI(w http.ResponseWriter, rc *requestCtx) error {
	b, err := openAPIJSON(h.prefix)
	if err != nil {
		// a bug: an endpoint without its document (the tests catch it)
		return h.reject(w, rc, &apiError{Status: http.StatusInternalServerError, Code: "internal_error", Message: err.Error()})
	}
	rc.setStatus("ok", "")
	return writeRaw(w, http.StatusOK, b)
}

// openAPIDocument builds the document; the server URL is path_prefix.
func openAPIDocument(prefix string) (oaJ, error) {
	paths := oaJ{}
	for _, e := range documentedEndpoints() {
		op, err := operationFor(e)
		if err != nil {
			return nil, err
		}
		p := apiPath(e)
		item, _ := paths[p].(oaJ)
		if item == nil {
			item = oaJ{}
			paths[p] = item
		}
		m := strings.ToLower(e.method())
		if _, dup := item[m]; dup {
			return nil, fmt.Errorf("openapi: two endpoints for %s %s", e.method(), p)
		}
		item[m] = op
	}
	server := strings.TrimSuffix(prefix, "/")
	if server == "" {
		server = "/"
	}
	return oaJ{
		"openapi": "3.1.0",
		"info": oaJ{
			"title":   "authmail",
			"version": "1",
			"summary": "Authentication email (OTP codes, magic links, password resets, verification, email change, security alerts) and transactional mail through the operator's SMTP account.",
			"description": "Every request except /health and /openapi.json needs `Authorization: Bearer <secret>`. " +
				"Request bodies are JSON objects (`Content-Type: application/json`); unknown, duplicate or case-variant keys are refused. " +
				"Errors are `{\"error_code\":…,\"message\":…}`, with `field` naming the offending field of a 422.",
			"license": oaJ{"name": "Apache-2.0", "identifier": "Apache-2.0"},
		},
		"servers":    []any{oaJ{"url": server, "description": "path_prefix of this authmail handler"}},
		"security":   []any{oaJ{"bearer": []any{}}},
		"paths":      paths,
		"components": components(),
	}, nil
}

func oaRef(name string) oaJ { return oaJ{"$ref": "#/components/schemas/" + name} }

func oaStr(desc string) oaJ { return oaJ{"type": "string", "description": desc} }

// addressList is one address or a list of them.
func oaAddresses(desc string) oaJ {
	return oaJ{"description": desc, "oneOf": []any{
		oaJ{"type": "string", "maxLength": maxAddressBytes},
		oaJ{"type": "array", "items": oaJ{"type": "string", "maxLength": maxAddressBytes}, "maxItems": maxAddressesPerField},
	}}
}

func oaAddress(desc string) oaJ {
	return oaJ{"type": "string", "maxLength": maxAddressBytes, "description": desc}
}

func oaExpiry(def string) oaJ {
	return oaJ{"type": "integer", "minimum": 1, "maximum": maxExpiresMinutes,
		"description": "validity in minutes shown in the message; default " + def}
}

func oaObject(required []string, props oaJ) oaJ {
	o := oaJ{"type": "object", "additionalProperties": false, "properties": props}
	if len(required) > 0 {
		o["required"] = required
	}
	return o
}

// webhookProps are the delivery fields of every send.
func oaWebhookProps(p oaJ) oaJ {
	p["webhook_url"] = oaJ{"type": "string", "format": "uri", "maxLength": maxURLBytes,
		"description": "POSTed once the message reaches a final state"}
	p["webhook_secret"] = oaJ{"type": "string", "maxLength": 256,
		"description": "signs that webhook; default: the configured webhook_secret"}
	return p
}

func components() oaJ {
	errorCode := oaJ{"type": "string", "description": "machine-readable error code"}
	schemas := oaJ{
		"Error": oaJ{"type": "object", "required": []string{"error_code", "message"}, "properties": oaJ{
			"error_code": errorCode,
			"message":    oaStr("human-readable explanation; never holds a secret"),
			"field":      oaStr("the request field at fault (422)"),
		}},
		"Accepted": oaJ{"type": "object", "required": []string{"sent", "status", "id", "message_id"}, "properties": oaJ{
			"sent":         oaJ{"type": "boolean"},
			"status":       oaJ{"type": "string", "enum": []string{"sent", "captured", "queued"}},
			"id":           oaStr("authmail's opaque message id"),
			"message_id":   oaStr("the Message-ID header of the message"),
			"error_code":   oaStr("why a queued message is not sent yet (a delivery error code)"),
			"challenge_id": oaStr("with an issued code: pass it to /verify/otp"),
			"expires_at":   oaJ{"type": "string", "format": "date-time", "description": "with an issued code: its expiry"},
			"notice":       oaRef("Notice"),
		}},
		"Failed": oaJ{"type": "object", "required": []string{"error_code", "message", "status", "id", "message_id"}, "properties": oaJ{
			"error_code":   oaStr("a delivery error code: recipient_refused, smtp_rejected, smtp_disconnect_uncertain, …"),
			"message":      oaJ{"type": "string"},
			"status":       oaJ{"type": "string", "enum": []string{outbox.Failed, outbox.Unknown, outbox.Expired}},
			"id":           oaJ{"type": "string"},
			"message_id":   oaJ{"type": "string"},
			"challenge_id": oaJ{"type": "string"},
			"expires_at":   oaJ{"type": "string", "format": "date-time"},
			"notice":       oaRef("Notice"),
		}},
		"Notice": oaJ{"type": "object", "description": "the email-change notice to the old address", "required": []string{"sent", "status", "id", "message_id"}, "properties": oaJ{
			"sent":       oaJ{"type": "boolean"},
			"status":     oaJ{"type": "string", "enum": []string{"sent", "captured", "queued", outbox.Failed, outbox.Unknown, outbox.Expired}},
			"id":         oaJ{"type": "string"},
			"message_id": oaJ{"type": "string"},
			"error_code": oaJ{"type": "string"},
			"message":    oaJ{"type": "string"},
		}},
		"DryRun": oaJ{"type": "object", "required": []string{"sent", "dry_run", "message"}, "properties": oaJ{
			"sent":    oaJ{"const": false},
			"dry_run": oaJ{"const": true},
			"message": oaJ{"type": "string"},
		}},
		"Skipped": oaJ{"type": "object", "required": []string{"sent", "status", "reason"}, "properties": oaJ{
			"sent":   oaJ{"const": false},
			"status": oaJ{"const": "skipped"},
			"reason": oaJ{"type": "string", "enum": []string{"event_disabled"}},
		}},
		"MessageStatus": oaJ{"type": "object", "required": []string{"id", "status", "attempts", "created_at", "updated_at", "next_attempt_at", "message_id", "last_error_code", "last_error", "smtp_response", "flow"}, "properties": oaJ{
			"id":              oaJ{"type": "string"},
			"status":          oaJ{"type": "string", "enum": outbox.AllStates},
			"attempts":        oaJ{"type": "integer", "minimum": 0},
			"created_at":      oaJ{"type": "string", "format": "date-time"},
			"updated_at":      oaJ{"type": "string", "format": "date-time"},
			"next_attempt_at": oaJ{"type": []string{"string", "null"}, "format": "date-time"},
			"message_id":      oaJ{"type": "string"},
			"last_error_code": oaJ{"type": []string{"string", "null"}},
			"last_error":      oaJ{"type": []string{"string", "null"}},
			"smtp_response":   oaJ{"type": []string{"string", "null"}},
			"flow":            oaJ{"type": "string"},
			"sent_at":         oaJ{"type": "string", "format": "date-time"},
			"expires_at":      oaJ{"type": "string", "format": "date-time", "description": "a message with a code or link: still queued then, it is not sent (expired)"},
			"priority":        oaJ{"type": "string", "enum": []string{outbox.PriorityBulk}},
			"webhook": oaJ{"type": "object", "required": []string{"status", "attempts"}, "properties": oaJ{
				"status":   oaJ{"type": "string"},
				"attempts": oaJ{"type": "integer", "minimum": 0},
			}},
		}},
		"Verified": oaJ{"type": "object", "required": []string{"valid", "to"}, "properties": oaJ{
			"valid":     oaJ{"const": true},
			"to":        oaJ{"type": "string"},
			"purpose":   oaJ{"type": "string"},
			"flow":      oaJ{"type": "string"},
			"old_email": oaJ{"type": "string"},
			"new_email": oaJ{"type": "string"},
		}},
		"CodeInvalid": oaJ{"type": "object", "required": []string{"error_code", "message", "attempts_left"}, "properties": oaJ{
			"error_code":    oaJ{"const": "code_invalid"},
			"message":       oaJ{"type": "string"},
			"attempts_left": oaJ{"type": "integer", "minimum": 0},
		}},
		"TestResult": oaJ{"type": "object", "required": []string{"sent", "status", "message_id", "duration_ms"}, "properties": oaJ{
			"sent":          oaJ{"type": "boolean"},
			"status":        oaJ{"type": "string"},
			"message_id":    oaJ{"type": "string"},
			"smtp_response": oaJ{"type": "string"},
			"error_code":    oaJ{"type": "string"},
			"message":       oaJ{"type": "string"},
			"duration_ms":   oaJ{"type": "integer", "minimum": 0},
		}},
		"AdminStatus": oaJ{"type": "object", "description": "the effective configuration, secrets left out or masked, and the outbox's figures",
			"required": []string{"delivery", "from", "app_name", "flows", "keys", "queue"}, "properties": oaJ{
				"delivery": oaJ{"type": "object"},
				"from":     oaJ{"type": "string"},
				"app_name": oaJ{"type": "string"},
				"flows":    oaJ{"type": "array", "items": oaJ{"type": "string"}},
				"keys": oaJ{"type": "array", "items": oaJ{"type": "object", "required": []string{"id", "allow", "rate"}, "properties": oaJ{
					"id": oaJ{"type": "string"}, "allow": oaJ{"type": "array", "items": oaJ{"type": "string"}}, "rate": oaJ{"type": "string"},
				}}},
				"queue": oaJ{"type": "object"},
			}},
		"Health":  oaJ{"type": "object", "required": []string{"status"}, "properties": oaJ{"status": oaJ{"const": "ok"}}},
		"OpenAPI": oaJ{"type": "object", "required": []string{"openapi", "info", "paths"}, "description": "this document"},
	}
	schemas["SendRequest"] = oaObject([]string{"to", "subject"}, oaWebhookProps(oaJ{
		"to":                    oaAddresses("recipients (RFC 5322 addresses, at most 100 per field, 100 distinct recipients per message)"),
		"cc":                    oaAddresses("copies"),
		"bcc":                   oaAddresses("blind copies: only in the envelope"),
		"reply_to":              oaAddresses("default: the configured reply_to"),
		"subject":               oaJ{"type": "string", "minLength": 1, "maxLength": maxSubjectRunes, "description": "no control characters"},
		"html_body":             oaJ{"type": "string", "description": "at least one of html_body and text_body"},
		"text_body":             oaJ{"type": "string", "description": "derived from html_body when absent"},
		"list_unsubscribe":      oaStr("the List-Unsubscribe header: <https://…> and/or <mailto:…> URIs"),
		"list_unsubscribe_post": oaJ{"type": "string", "enum": []string{"List-Unsubscribe=One-Click"}, "description": "one-click unsubscribe (RFC 8058); needs an https URI in list_unsubscribe"},
		"priority":              oaJ{"type": "string", "enum": []string{"normal", outbox.PriorityBulk}, "description": "bulk: queued behind all other mail, with at least delivery bulk_share of the sending; default normal, behind the auth flows"},
	}))
	userName := oaJ{"type": "string", "maxLength": maxUserNameRunes, "description": "greeting and display name of the To header"}
	schemas["OTPRequest"] = oaObject([]string{"to"}, oaWebhookProps(oaJ{
		"to":                 oaAddress("one address"),
		"user_name":          userName,
		"code":               oaJ{"type": "string", "minLength": 1, "maxLength": maxCodeRunes, "description": "1–64 printable characters, or \"auto\": authmail issues the code (needs `codes`). Required unless `codes issue`"},
		"purpose":            oaJ{"type": "string", "pattern": "^[a-z0-9_-]{1,32}$", "description": "with an issued code; default login"},
		"expires_in_minutes": oaExpiry("10"),
	}))
	linkProps := func() oaJ {
		return oaWebhookProps(oaJ{
			"to":                 oaAddress("one address (email-change: the new one)"),
			"user_name":          userName,
			"expires_in_minutes": oaExpiry("15 (magic-link), 60 (password-reset), 1440 (verify-email, email-change)"),
			"token":              oaJ{"type": "string", "maxLength": maxTokenBytes, "description": "the link is built from it; \"auto\": authmail issues one. Exactly one of token and link"},
			"link":               oaJ{"type": "string", "format": "uri", "maxLength": maxURLBytes, "description": "the full link, on an allowed origin"},
			"base_url":           oaJ{"type": "string", "format": "uri", "maxLength": maxURLBytes, "description": "with token: build <base_url>/<flow>?token=… under this URL"},
		})
	}
	schemas["LinkRequest"] = oaObject([]string{"to"}, linkProps())
	ec := linkProps()
	ec["old_email"] = oaAddress("also send the old address a notice (without the link)")
	schemas["EmailChangeRequest"] = oaObject([]string{"to"}, ec)
	schemas["SecurityAlertRequest"] = oaObject([]string{"to", "event"}, oaWebhookProps(oaJ{
		"to":          oaAddress("one address"),
		"user_name":   userName,
		"event":       oaJ{"type": "string", "enum": securityEventNames()},
		"ip":          oaJ{"type": "string", "description": "IPv4 or IPv6 address without a zone"},
		"user_agent":  oaJ{"type": "string", "maxLength": maxUserAgentRunes},
		"location":    oaJ{"type": "string", "maxLength": maxLocationRunes},
		"occurred_at": oaJ{"type": "string", "format": "date-time", "description": "RFC 3339, shown in UTC"},
	}))
	schemas["VerifyOTPRequest"] = oaObject([]string{"challenge_id", "code"}, oaJ{
		"challenge_id": oaJ{"type": "string", "minLength": 43, "maxLength": 43, "description": "from the /send/otp answer"},
		"code":         oaStr("what the user typed"),
		"ip":           oaStr("the end user's IP address, so that failures count per user"),
	})
	schemas["VerifyTokenRequest"] = oaObject([]string{"token", "flow"}, oaJ{
		"token": oaStr("the token from the link"),
		"flow":  oaJ{"type": "string", "enum": linkFlows},
		"ip":    oaStr("the end user's IP address"),
	})
	schemas["TestRequest"] = oaObject([]string{"to"}, oaJ{"to": oaAddresses("where to send the test message")})
	nullStr := oaJ{"type": []string{"string", "null"}}
	schemas["MessageList"] = oaJ{"type": "object", "required": []string{"messages", "next_cursor"}, "properties": oaJ{
		"messages": oaJ{"type": "array", "items": oaJ{"type": "object",
			"required": []string{"id", "status", "flow", "attempts", "created_at", "updated_at", "message_id", "recipients", "rcpts", "last_error_code", "last_error"},
			"properties": oaJ{
				"id":              oaJ{"type": "string"},
				"status":          oaJ{"type": "string", "enum": outbox.AllStates},
				"flow":            oaJ{"type": "string"},
				"attempts":        oaJ{"type": "integer", "minimum": 0},
				"created_at":      oaJ{"type": "string", "format": "date-time"},
				"updated_at":      oaJ{"type": "string", "format": "date-time"},
				"message_id":      oaJ{"type": "string"},
				"recipients":      oaJ{"type": "integer", "minimum": 0},
				"rcpts":           oaJ{"type": "array", "items": oaJ{"type": "string"}, "description": "recipients as logged: a salted hash and the domain, or the addresses with log_recipients"},
				"last_error_code": nullStr,
				"last_error":      nullStr,
				"key_id":          oaStr("the key that created it; for keys with allow admin only"),
			}}},
		"next_cursor": oaJ{"type": []string{"string", "null"}, "description": "pass as cursor for the next page; null at the end"},
	}}
	retried := oaJ{"allOf": []any{oaRef("MessageStatus"), oaJ{"properties": oaJ{
		"warning": oaStr("set when the message's outcome was unknown: the recipient may get it twice"),
	}}}}
	schemas["Retried"] = retried
	return oaJ{
		"securitySchemes": oaJ{"bearer": oaJ{"type": "http", "scheme": "bearer", "description": "an API key's secret"},
			"basic": oaJ{"type": "http", "scheme": "basic", "description": "the preview endpoints only: an API key's secret as the password, any user name"}},
		"schemas": schemas,
		"parameters": oaJ{
			"Prefer": oaJ{"name": "Prefer", "in": "header", "schema": oaJ{"type": "string"},
				"description": "RFC 7240: `respond-async` answers 202 right after the durable write; `wait=<seconds>` (at most 300) waits that long for the first attempt"},
			"IdempotencyKey": oaJ{"name": "Idempotency-Key", "in": "header", "schema": oaJ{"type": "string", "pattern": "^[!-~]{1,255}$"},
				"description": "makes retries safe: the same key and body within idempotency_ttl replays the first answer"},
			"DryRun": oaJ{"name": "X-Dry-Run", "in": "header", "schema": oaJ{"type": "string", "enum": []string{"true", "1", "yes", "false", "0", "no", "TRUE", "True", "YES", "Yes", "FALSE", "False", "NO", "No"}},
				"description": "true, 1 or yes (any case): validate and render only"},
			"RequestID": oaJ{"name": "X-Request-ID", "in": "header", "schema": oaJ{"type": "string", "maxLength": 128},
				"description": "echoed in the answer and the logs when it is at most 128 visible ASCII characters"},
		},
		"headers": oaJ{
			"RequestID":          oaJ{"description": "the request id (the caller's X-Request-ID, or Caddy's request UUID)", "schema": oaJ{"type": "string"}},
			"RetryAfter":         oaJ{"description": "seconds to wait", "schema": oaJ{"type": "string", "pattern": "^[0-9]+$"}},
			"Location":           oaJ{"description": "the message's status URL", "schema": oaJ{"type": "string"}},
			"PreferenceApplied":  oaJ{"description": "the Prefer preference that was applied", "schema": oaJ{"type": "string"}},
			"IdempotentReplayed": oaJ{"description": "true when the answer is a replay", "schema": oaJ{"type": "string", "const": "true"}},
			"Allow":              oaJ{"description": "the methods of the path", "schema": oaJ{"type": "string"}},
			"WWWAuthenticate":    oaJ{"description": "Bearer", "schema": oaJ{"type": "string"}},
		},
	}
}

// errorCodes are the documented error codes of an endpoint by status.
type errorCodes map[int][]string

func (c errorCodes) add(status int, codes ...string) {
	for _, code := range codes {
		if !slices.Contains(c[status], code) {
			c[status] = append(c[status], code)
		}
	}
}

// operationFor documents one endpoint of the table.
func operationFor(e *endpoint) (oaJ, error) {
	op := oaJ{"operationId": opID(e)}
	errs := errorCodes{}
	ok := oaJ{}
	var params []any
	if e.kind != kindHealth && e.kind != kindOpenAPI {
		errs.add(http.StatusUnauthorized, "unauthorized")
		errs.add(http.StatusTooManyRequests, "rate_limited")
	} else {
		op["security"] = []any{}
	}
	if e.perm != "" {
		errs.add(http.StatusForbidden, "forbidden")
		op["x-authmail-permission"] = e.perm
	}
	errs.add(http.StatusMethodNotAllowed, "method_not_allowed")
	jsonBody := func(schema string, example any) {
		op["requestBody"] = oaJ{"required": true, "content": oaJ{"application/json": oaJ{"schema": oaRef(schema), "example": example}}}
		errs.add(http.StatusBadRequest, "invalid_json", "invalid_request", "invalid_idempotency_key")
		errs.add(http.StatusRequestEntityTooLarge, "payload_too_large")
		errs.add(http.StatusUnsupportedMediaType, "unsupported_media_type")
		errs.add(http.StatusUnprocessableEntity, "invalid_request")
		params = append(params, oaParam("IdempotencyKey"), oaParam("DryRun"))
	}
	params = append(params, oaParam("RequestID"))
	sendAnswers := func() {
		params = append(params, oaParam("Prefer"))
		ok["200"] = oaResponse("sent (`captured` in capture mode), or a dry run", oaJ{"oneOf": []any{oaRef("Accepted"), oaRef("DryRun")}}, "Preference-Applied", "Idempotent-Replayed")
		ok["202"] = oaResponse("accepted and queued: still in flight when wait ended, or the first attempt failed temporarily", oaRef("Accepted"), "Location", "Preference-Applied", "Idempotent-Replayed")
		ok["502"] = oaResponse("failed permanently (`failed`), or its outcome is unknown (`unknown`)", oaRef("Failed"), "Preference-Applied", "Idempotent-Replayed")
		errs.add(http.StatusConflict, "idempotency_conflict")
		errs.add(http.StatusServiceUnavailable, "queue_full", "outbox_unavailable")
		errs.add(http.StatusInternalServerError, "internal_error")
	}
	switch e.kind {
	case kindHealth:
		op["summary"] = "Liveness; no key needed"
		ok["200"] = oaResponse("ok", oaRef("Health"))
	case kindOpenAPI:
		op["summary"] = "This OpenAPI document; no key needed"
		ok["200"] = oaResponse("the document", oaRef("OpenAPI"))
	case kindSend:
		op["summary"] = "Send arbitrary transactional mail"
		jsonBody("SendRequest", oaJ{"to": []string{"Jane Doe <jane@example.com>"}, "subject": "Your receipt", "html_body": "<h1>Thanks!</h1><p>Order <b>#1042</b> is paid.</p>"})
		errs.add(http.StatusUnprocessableEntity, "link_not_allowed")
		sendAnswers()
	case kindOTP:
		op["summary"] = "Send a one-time code"
		jsonBody("OTPRequest", oaJ{"to": "jane@example.com", "user_name": "Jane", "code": "482913"})
		errs.add(http.StatusTooManyRequests, "recipient_rate_limited")
		sendAnswers()
	case kindLink:
		op["summary"] = "Send a " + e.flow + " link"
		schema := "LinkRequest"
		if e.flow == "email-change" {
			schema = "EmailChangeRequest"
		}
		jsonBody(schema, oaJ{"to": "jane@example.com", "token": "q8XzExampleToken"})
		errs.add(http.StatusUnprocessableEntity, "link_not_allowed")
		errs.add(http.StatusTooManyRequests, "recipient_rate_limited")
		sendAnswers()
	case kindAlert:
		op["summary"] = "Send a security alert"
		jsonBody("SecurityAlertRequest", oaJ{"to": "jane@example.com", "event": "password_changed", "ip": "192.0.2.7"})
		errs.add(http.StatusTooManyRequests, "recipient_rate_limited")
		sendAnswers()
		ok["200"] = oaResponse("sent, a dry run, or skipped (a disabled event)", oaJ{"oneOf": []any{oaRef("Accepted"), oaRef("DryRun"), oaRef("Skipped")}}, "Preference-Applied", "Idempotent-Replayed")
	case kindStatus:
		op["summary"] = "The state of a message, for the key that created it"
		params = append(params, oaJ{"name": "id", "in": "path", "required": true, "schema": oaJ{"type": "string"}})
		ok["200"] = oaResponse("its state", oaRef("MessageStatus"))
		errs.add(http.StatusNotFound, "not_found")
		errs.add(http.StatusServiceUnavailable, "outbox_unavailable")
	case kindAdminStatus:
		op["summary"] = "The effective configuration (secrets masked) and the outbox's figures"
		ok["200"] = oaResponse("the status", oaRef("AdminStatus"))
	case kindTest:
		op["summary"] = "Send a test message synchronously, outside the outbox"
		jsonBody("TestRequest", oaJ{"to": "ops@example.com"})
		ok["200"] = oaResponse("sent, or a dry run", oaJ{"oneOf": []any{oaRef("TestResult"), oaRef("DryRun")}})
		ok["502"] = oaResponse("the SMTP server refused it", oaRef("TestResult"))
	case kindVerifyOTP:
		op["summary"] = "Check an issued code once"
		jsonBody("VerifyOTPRequest", oaJ{"challenge_id": "Yk3xQm8vT2pL9sRf4WcN0aHj6uBd1eZiK7oY5gXqVtE", "code": "482913"})
		ok["200"] = oaResponse("valid: the code is used up", oaRef("Verified"))
		ok["422"] = oaResponse("a field is invalid, or the code is wrong", oaJ{"oneOf": []any{oaRef("CodeInvalid"), oaError([]string{"invalid_request"})}})
		errs.add(http.StatusNotFound, "not_found")
		errs.add(http.StatusGone, "code_burned", "code_expired")
		errs.add(http.StatusServiceUnavailable, "outbox_unavailable")
	case kindVerifyToken:
		op["summary"] = "Check an issued link token once"
		jsonBody("VerifyTokenRequest", oaJ{"token": "q8XzExampleToken", "flow": "magic-link"})
		ok["200"] = oaResponse("valid: the token is used up", oaRef("Verified"))
		errs.add(http.StatusNotFound, "not_found")
		errs.add(http.StatusGone, "token_expired")
		errs.add(http.StatusServiceUnavailable, "outbox_unavailable")
	case kindMessages:
		op["summary"] = "The calling key's messages, newest first, without bodies (every key's with allow admin)"
		q := func(name, desc string, schema oaJ) oaJ {
			return oaJ{"name": name, "in": "query", "description": desc, "schema": schema}
		}
		params = append(params,
			q("status", "only messages in this state", oaJ{"type": "string", "enum": outbox.AllStates}),
			q("flow", "only this flow (otp, magic-link, send, …)", oaJ{"type": "string", "maxLength": 64}),
			q("since", "only messages created at or after this RFC 3339 time", oaJ{"type": "string", "format": "date-time"}),
			q("limit", "page size", oaJ{"type": "integer", "minimum": 1, "maximum": maxListLimit, "default": defaultListLimit}),
			q("cursor", "next_cursor of the previous page", oaJ{"type": "string"}))
		ok["200"] = oaResponse("a page of messages; it may hold fewer than limit (each page reads at most 2×limit batch states) while next_cursor is not null", oaRef("MessageList"))
		errs.add(http.StatusUnprocessableEntity, "invalid_request")
		errs.add(http.StatusServiceUnavailable, "outbox_unavailable")
	case kindRetry:
		op["summary"] = "Put a failed or unknown message back in the queue (an unknown one may then arrive twice)"
		params = append(params, oaJ{"name": "id", "in": "path", "required": true, "schema": oaJ{"type": "string"}})
		ok["202"] = oaResponse("queued again", oaRef("Retried"), "Location")
		ok["303"] = oaJ{"description": "queued again, from the preview page's retry button (HTTP Basic credentials from a same-origin form): back to the page",
			"headers": oaJ{"X-Request-ID": oaJ{"$ref": "#/components/headers/RequestID"}, "Location": oaJ{"$ref": "#/components/headers/Location"}}}
		op["security"] = []any{oaJ{"bearer": []any{}}, oaJ{"basic": []any{}}}
		errs.add(http.StatusNotFound, "not_found")
		errs.add(http.StatusConflict, "not_retryable", "retry_later")
		errs.add(http.StatusGone, "body_gone")
		errs.add(http.StatusServiceUnavailable, "outbox_unavailable")
	case kindPreview, kindPreviewFile:
		if !previewOperation(e, op, ok, errs, &params) {
			return nil, fmt.Errorf("openapi: endpoint %s (kind %d) has no document", e.path, e.kind)
		}
	default:
		return nil, fmt.Errorf("openapi: endpoint %s (kind %d) has no document", e.path, e.kind)
	}
	op["parameters"] = params
	resps := oaJ{}
	for code, r := range ok {
		resps[code] = r
	}
	for status, codes := range errs {
		k := strconv.Itoa(status)
		if _, taken := resps[k]; taken {
			continue
		}
		var hdrs []string
		switch status {
		case http.StatusTooManyRequests, http.StatusServiceUnavailable:
			hdrs = append(hdrs, "Retry-After")
		case http.StatusUnauthorized:
			hdrs = append(hdrs, "WWW-Authenticate")
		case http.StatusMethodNotAllowed:
			hdrs = append(hdrs, "Allow")
		}
		resps[k] = oaResponse(strings.Join(codes, ", "), oaError(codes), hdrs...)
	}
	op["responses"] = resps
	return op, nil
}

func opID(e *endpoint) string {
	var b strings.Builder
	up := false
	for i, c := range strings.ToLower(e.method()) + apiPath(e) {
		if c == '/' || c == '-' || c == '.' || c == '{' || c == '}' {
			up = i > 0
			continue
		}
		if up && c >= 'a' && c <= 'z' {
			c -= 'a' - 'A'
		}
		up = false
		b.WriteRune(c)
	}
	return b.String()
}

func oaParam(name string) oaJ { return oaJ{"$ref": "#/components/parameters/" + name} }

// errorSchema is the Error schema with error_code limited to codes.
func oaError(codes []string) oaJ {
	return oaJ{"allOf": []any{oaRef("Error"), oaJ{"properties": oaJ{"error_code": oaJ{"enum": codes}}}}}
}

// response documents an answer; every answer carries X-Request-ID.
func oaResponse(desc string, schema oaJ, headers ...string) oaJ {
	hs := oaJ{"X-Request-ID": oaJ{"$ref": "#/components/headers/RequestID"}}
	for _, h := range headers {
		hs[h] = oaJ{"$ref": "#/components/headers/" + strings.ReplaceAll(h, "-", "")}
	}
	return oaJ{"description": desc, "headers": hs, "content": oaJ{"application/json": oaJ{"schema": schema}}}
}
