package authmail

import (
	"errors"
	"fmt"
	"maps"
	"net/http"
	"reflect"
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
// an endpoint cannot exist without its document. Likewise the fields of
// its request and answer bodies are those of the structs the handler
// decodes and encodes (oaBody). It holds no configuration (only
// path_prefix, as the server URL), so it is the same for every key and
// needs none.

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
		if e.method() == http.MethodGet {
			// ServeHTTP answers HEAD wherever it answers GET
			item["head"] = headOperation(op)
		}
	}
	comps, err := components()
	if err != nil {
		return nil, err
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
		"components": comps,
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

// oaBody is the schema of a JSON body that the handler decodes into, or
// encodes from, a Go struct. Its properties are that struct's JSON
// fields, read as decodeJSON reads them (jsonFieldNames, embedded
// structs included), so the document cannot refuse a field the server
// accepts, nor offer one it refuses: a field without its schema in
// props, a schema without its field, or a required name that is no
// property fails the document, and with it TestOpenAPIDocumentValidates.
type oaBody struct {
	of       reflect.Type
	required []string
	props    oaJ // the schema of each field
	// request bodies are closed: decodeJSON refuses unknown fields, and
	// so does the document
	request bool
	// added are fields the handler appends to the encoded answer
	// (withJSONField) rather than encodes from the struct
	added []string
	// without are fields of the struct that this answer never carries
	// (errorResponse is both the plain error and the failed delivery)
	without []string
	desc    string
}

func (b oaBody) schema() (oaJ, error) {
	want := jsonFieldNames(b.of)
	for _, f := range b.without {
		delete(want, f)
	}
	for _, f := range b.added {
		want[f] = true
	}
	var errs []error
	for _, f := range slices.Sorted(maps.Keys(want)) {
		if _, ok := b.props[f]; !ok {
			errs = append(errs, fmt.Errorf("openapi: %s has the field %q, which its schema does not document", b.of, f))
		}
	}
	for _, f := range slices.Sorted(maps.Keys(b.props)) {
		if !want[f] {
			errs = append(errs, fmt.Errorf("openapi: the schema of %s documents %q, which is not one of its fields", b.of, f))
		}
	}
	for _, f := range b.required {
		if _, ok := b.props[f]; !ok {
			errs = append(errs, fmt.Errorf("openapi: the schema of %s requires %q, which is not one of its properties", b.of, f))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	o := oaJ{"type": "object", "properties": b.props}
	if b.request {
		o = oaObject(b.required, b.props)
	} else if len(b.required) > 0 {
		o["required"] = b.required
	}
	if b.desc != "" {
		o["description"] = b.desc
	}
	return o, nil
}

// webhookProps are the delivery fields of every send.
func oaWebhookProps(p oaJ) oaJ {
	p["webhook_url"] = oaJ{"type": "string", "format": "uri", "maxLength": maxURLBytes,
		"description": "POSTed once the message reaches a final state"}
	p["webhook_secret"] = oaJ{"type": "string", "maxLength": 256,
		"description": "signs that webhook; default: the configured webhook_secret"}
	return p
}

// oaLocaleProp adds the locale field of every templated flow
// (localeField).
func oaLocaleProp(p oaJ) oaJ {
	p["locale"] = oaJ{"type": "string", "maxLength": maxLocaleLength,
		"description": "BCP 47 language tag such as ko or de-AT; a locale without templates falls back (de-AT → de → the configured locale → en). Default: the configured locale"}
	return p
}

// answerAdded are the fields the handler appends to an encoded send
// answer with withJSONField: the locale of a templated flow's message
// (withLocale) and an issued code's challenge (submitIssued).
// TestOpenAPIAnswerAddedFields finds every withJSONField call of the
// package and holds this list to them.
var answerAdded = []string{"locale", "challenge_id", "expires_at"}

func components() (oaJ, error) {
	schemas := oaJ{
		"Health":  oaJ{"type": "object", "required": []string{"status"}, "properties": oaJ{"status": oaJ{"const": "ok"}}},
		"OpenAPI": oaJ{"type": "object", "required": []string{"openapi", "info", "paths"}, "description": "this document"},
	}
	var errs []error
	body := func(name string, b oaBody) {
		s, err := b.schema()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
		schemas[name] = s
	}
	// the answers, each from the struct the handler encodes it from
	sendStates := []string{"sent", "captured", "queued"}
	failedStates := []string{outbox.Failed, outbox.Unknown, outbox.Expired}
	// a failed delivery is an errorResponse with the message's fields,
	// a plain error the first three only
	deliveryOnly := []string{"status", "id", "message_id", "notice"}
	body("Error", oaBody{of: reflect.TypeFor[errorResponse](), without: deliveryOnly,
		required: []string{"error_code", "message"}, props: oaJ{
			"error_code": oaStr("machine-readable error code"),
			"message":    oaStr("human-readable explanation; never holds a secret"),
			"field":      oaStr("the request field at fault (422)"),
		}})
	answerProps := func(p oaJ) oaJ {
		p["locale"] = oaStr("a templated flow's message (every send but /send): the locale it was rendered in, the requested one or its fallback")
		p["challenge_id"] = oaStr("with an issued code: pass it to /verify/otp")
		p["expires_at"] = oaJ{"type": "string", "format": "date-time", "description": "with an issued code: its expiry"}
		p["notice"] = oaRef("Notice")
		return p
	}
	body("Accepted", oaBody{of: reflect.TypeFor[sentResponse](), added: answerAdded,
		required: []string{"sent", "status", "id", "message_id"}, props: answerProps(oaJ{
			"sent":       oaJ{"type": "boolean"},
			"status":     oaJ{"type": "string", "enum": sendStates},
			"id":         oaStr("authmail's opaque message id"),
			"message_id": oaStr("the Message-ID header of the message"),
			"error_code": oaStr("why a queued message is not sent yet (a delivery error code)"),
		})})
	body("Failed", oaBody{of: reflect.TypeFor[errorResponse](), added: answerAdded, without: []string{"field"},
		required: []string{"error_code", "message", "status", "id", "message_id"}, props: answerProps(oaJ{
			"error_code": oaStr("a delivery error code: recipient_refused, smtp_rejected, smtp_disconnect_uncertain, …"),
			"message":    oaJ{"type": "string"},
			"status":     oaJ{"type": "string", "enum": failedStates},
			"id":         oaJ{"type": "string"},
			"message_id": oaJ{"type": "string"},
		})})
	body("Notice", oaBody{of: reflect.TypeFor[noticeResponse](), desc: "the email-change notice to the old address",
		required: []string{"sent", "status", "id", "message_id"}, props: oaJ{
			"sent":       oaJ{"type": "boolean"},
			"status":     oaJ{"type": "string", "enum": slices.Concat(sendStates, failedStates)},
			"id":         oaJ{"type": "string"},
			"message_id": oaJ{"type": "string"},
			"error_code": oaJ{"type": "string"},
			"message":    oaJ{"type": "string"},
		}})
	body("DryRun", oaBody{of: reflect.TypeFor[dryRunResponse](), required: []string{"sent", "dry_run", "message"}, props: oaJ{
		"sent":    oaJ{"const": false},
		"dry_run": oaJ{"const": true},
		"message": oaJ{"type": "string"},
	}})
	body("Skipped", oaBody{of: reflect.TypeFor[skippedResponse](), required: []string{"sent", "status", "reason"}, props: oaJ{
		"sent":   oaJ{"const": false},
		"status": oaJ{"const": "skipped"},
		"reason": oaJ{"type": "string", "enum": []string{"event_disabled"}},
	}})
	nullStr := oaJ{"type": []string{"string", "null"}}
	statusProps := func() oaJ {
		return oaJ{
			"id":              oaJ{"type": "string"},
			"status":          oaJ{"type": "string", "enum": outbox.AllStates},
			"attempts":        oaJ{"type": "integer", "minimum": 0},
			"created_at":      oaJ{"type": "string", "format": "date-time"},
			"updated_at":      oaJ{"type": "string", "format": "date-time"},
			"next_attempt_at": oaJ{"type": []string{"string", "null"}, "format": "date-time"},
			"message_id":      oaJ{"type": "string"},
			"last_error_code": nullStr,
			"last_error":      nullStr,
			"smtp_response":   nullStr,
			"flow":            oaJ{"type": "string"},
			"sent_at":         oaJ{"type": "string", "format": "date-time"},
			"expires_at":      oaJ{"type": "string", "format": "date-time", "description": "a message with a code or link: still queued then, it is not sent (expired)"},
			"priority":        oaJ{"type": "string", "enum": []string{outbox.PriorityBulk}},
			"webhook":         oaRef("Webhook"),
		}
	}
	body("Webhook", oaBody{of: reflect.TypeFor[webhookSummary](), desc: "the message's webhook",
		required: []string{"status", "attempts"}, props: oaJ{
			"status":   oaJ{"type": "string"},
			"attempts": oaJ{"type": "integer", "minimum": 0},
		}})
	statusRequired := []string{"id", "status", "attempts", "created_at", "updated_at", "next_attempt_at", "message_id", "last_error_code", "last_error", "smtp_response", "flow"}
	body("MessageStatus", oaBody{of: reflect.TypeFor[statusResponse](), required: statusRequired, props: statusProps()})
	retried := statusProps()
	retried["warning"] = oaStr("set when the message's outcome was unknown: the recipient may get it twice")
	body("Retried", oaBody{of: reflect.TypeFor[retryResponse](), required: statusRequired, props: retried})
	body("Verified", oaBody{of: reflect.TypeFor[verifiedResponse](), required: []string{"valid", "to"}, props: oaJ{
		"valid":     oaJ{"const": true},
		"to":        oaJ{"type": "string"},
		"purpose":   oaJ{"type": "string"},
		"flow":      oaJ{"type": "string"},
		"old_email": oaJ{"type": "string"},
		"new_email": oaJ{"type": "string"},
	}})
	body("CodeInvalid", oaBody{of: reflect.TypeFor[codeInvalidResponse](), required: []string{"error_code", "message", "attempts_left"}, props: oaJ{
		"error_code":    oaJ{"const": "code_invalid"},
		"message":       oaJ{"type": "string"},
		"attempts_left": oaJ{"type": "integer", "minimum": 0},
	}})
	body("TestResult", oaBody{of: reflect.TypeFor[testResponse](), required: []string{"sent", "status", "message_id", "duration_ms"}, props: oaJ{
		"sent":          oaJ{"type": "boolean"},
		"status":        oaJ{"type": "string"},
		"message_id":    oaJ{"type": "string"},
		"smtp_response": oaJ{"type": "string"},
		"error_code":    oaJ{"type": "string"},
		"message":       oaJ{"type": "string"},
		"duration_ms":   oaJ{"type": "integer", "minimum": 0},
	}})
	strList := oaJ{"type": "array", "items": oaJ{"type": "string"}}
	body("AdminStatus", oaBody{of: reflect.TypeFor[adminStatus](), desc: "the effective configuration, secrets left out or masked, and the outbox's figures",
		required: []string{"delivery", "from", "app_name", "flows", "keys", "queue"}, props: oaJ{
			"delivery":        oaJ{"type": "object", "description": "the SMTP server (user name masked) or capture directory, open connections, sending rates"},
			"from":            oaJ{"type": "string"},
			"from_name":       oaJ{"type": "string"},
			"reply_to":        oaJ{"type": "string"},
			"app_name":        oaJ{"type": "string"},
			"base_url":        oaJ{"type": "string"},
			"allowed_origins": strList,
			"link_policy":     oaJ{"type": "string"},
			"links":           oaJ{"type": "object", "additionalProperties": oaJ{"type": "string"}, "description": "link templates by flow"},
			"flows":           strList,
			"security_alerts": oaJ{"type": "object", "additionalProperties": oaJ{"type": "boolean"}},
			"keys":            oaJ{"type": "array", "items": oaRef("AdminKey")},
			"limits":          oaJ{"type": "object", "description": "auth_failures and recipient_rate"},
			"queue":           oaJ{"type": "object", "description": "the outbox's figures: depth, age of the oldest message, max_queued, in memory and parked"},
			"settings":        oaJ{"type": "object"},
			"webhooks":        oaJ{"type": "object"},
			"templates":       oaJ{"type": "string"},
			"privacy":         oaJ{"type": "object"},
		}})
	body("AdminKey", oaBody{of: reflect.TypeFor[adminKey](), desc: "a key: its id, permissions and rate, never its secret",
		required: []string{"id", "allow", "rate"}, props: oaJ{"id": oaJ{"type": "string"}, "allow": strList, "rate": oaJ{"type": "string"}}})
	body("MessageList", oaBody{of: reflect.TypeFor[listResponse](), required: []string{"messages", "next_cursor"}, props: oaJ{
		"messages":    oaJ{"type": "array", "items": oaRef("MessageListItem")},
		"next_cursor": oaJ{"type": []string{"string", "null"}, "description": "pass as cursor for the next page; null at the end"},
	}})
	body("MessageListItem", oaBody{of: reflect.TypeFor[listItem](), desc: "a message's state, never its body",
		required: []string{"id", "status", "flow", "attempts", "created_at", "updated_at", "message_id", "recipients", "rcpts", "last_error_code", "last_error"},
		props: oaJ{
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
		}})

	// the request bodies, each from the struct its endpoint decodes into
	body("SendRequest", oaBody{of: reflect.TypeFor[sendRequest](), request: true, required: []string{"to", "subject"}, props: oaWebhookProps(oaJ{
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
	})})
	userName := oaJ{"type": "string", "maxLength": maxUserNameRunes, "description": "greeting and display name of the To header"}
	body("OTPRequest", oaBody{of: reflect.TypeFor[otpRequest](), request: true, required: []string{"to"}, props: oaLocaleProp(oaWebhookProps(oaJ{
		"to":                 oaAddress("one address"),
		"user_name":          userName,
		"code":               oaJ{"type": "string", "minLength": 1, "maxLength": maxCodeRunes, "description": "1–64 printable characters, or \"auto\": authmail issues the code (needs `codes`). Required unless `codes issue`"},
		"purpose":            oaJ{"type": "string", "pattern": "^[a-z0-9_-]{1,32}$", "description": "with an issued code; default login"},
		"expires_in_minutes": oaExpiry("10"),
	}))})
	linkProps := func() oaJ {
		return oaLocaleProp(oaWebhookProps(oaJ{
			"to":                 oaAddress("one address (email-change: the new one)"),
			"user_name":          userName,
			"expires_in_minutes": oaExpiry("15 (magic-link), 60 (password-reset), 1440 (verify-email, email-change)"),
			"token":              oaJ{"type": "string", "maxLength": maxTokenBytes, "description": "the link is built from it; \"auto\": authmail issues one. Exactly one of token and link"},
			"link":               oaJ{"type": "string", "format": "uri", "maxLength": maxURLBytes, "description": "the full link, on an allowed origin"},
			"base_url":           oaJ{"type": "string", "format": "uri", "maxLength": maxURLBytes, "description": "with token: build <base_url>/<flow>?token=… under this URL"},
		}))
	}
	body("LinkRequest", oaBody{of: reflect.TypeFor[linkRequest](), request: true, required: []string{"to"}, props: linkProps()})
	ec := linkProps()
	ec["old_email"] = oaAddress("also send the old address a notice (without the link), in the same locale")
	body("EmailChangeRequest", oaBody{of: reflect.TypeFor[emailChangeRequest](), request: true, required: []string{"to"}, props: ec})
	body("SecurityAlertRequest", oaBody{of: reflect.TypeFor[securityAlertRequest](), request: true, required: []string{"to", "event"}, props: oaLocaleProp(oaWebhookProps(oaJ{
		"to":          oaAddress("one address"),
		"user_name":   userName,
		"event":       oaJ{"type": "string", "enum": securityEventNames()},
		"ip":          oaJ{"type": "string", "description": "IPv4 or IPv6 address without a zone"},
		"user_agent":  oaJ{"type": "string", "maxLength": maxUserAgentRunes},
		"location":    oaJ{"type": "string", "maxLength": maxLocationRunes},
		"occurred_at": oaJ{"type": "string", "format": "date-time", "description": "RFC 3339, shown in UTC"},
	}))})
	body("VerifyOTPRequest", oaBody{of: reflect.TypeFor[verifyOTPRequest](), request: true, required: []string{"challenge_id", "code"}, props: oaJ{
		"challenge_id": oaJ{"type": "string", "minLength": 43, "maxLength": 43, "description": "from the /send/otp answer"},
		"code":         oaStr("what the user typed"),
		"ip":           oaStr("the end user's IP address, so that failures count per user"),
	}})
	body("VerifyTokenRequest", oaBody{of: reflect.TypeFor[verifyTokenRequest](), request: true, required: []string{"token", "flow"}, props: oaJ{
		"token": oaStr("the token from the link"),
		"flow":  oaJ{"type": "string", "enum": linkFlows},
		"ip":    oaStr("the end user's IP address"),
	}})
	body("TestRequest", oaBody{of: reflect.TypeFor[testRequest](), request: true, required: []string{"to"}, props: oaJ{
		"to": oaAddresses("where to send the test message"),
	}})
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
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
	}, nil
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

// headOperation is the HEAD twin of a GET operation: the same
// parameters, statuses and headers, and no body.
func headOperation(get oaJ) oaJ {
	op := maps.Clone(get)
	op["operationId"] = "head" + strings.TrimPrefix(get["operationId"].(string), "get")
	if s, ok := get["summary"].(string); ok {
		op["summary"] = s + " (HEAD: the headers only)"
	}
	resps := oaJ{}
	for code, r := range get["responses"].(oaJ) {
		r := maps.Clone(r.(oaJ))
		delete(r, "content")
		resps[code] = r
	}
	op["responses"] = resps
	return op
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
