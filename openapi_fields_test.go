package authmail

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	vErrors "github.com/pb33f/libopenapi-validator/errors"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// The request and answer fields of the OpenAPI document come from the
// structs the handler decodes requests into and encodes answers from
// (oaBody); these tests hold that source to the two other places that
// name the fields: the tables of docs/api.md, and the handler itself,
// which must accept every documented field and refuse every other.

// TestOpenAPIBodiesFollowTheStructs: a schema that leaves out a field of
// its struct (locale, say), documents one the struct lacks, or requires
// a name that is no property does not build, so the document cannot
// drift from what decodeJSON accepts and the handler answers.
func TestOpenAPIBodiesFollowTheStructs(t *testing.T) {
	doc, err := openAPIDocument("/authmail")
	if err != nil {
		t.Fatal(err)
	}
	schemas := doc["components"].(oaJ)["schemas"].(oaJ)
	props := func(name string) oaJ { return maps.Clone(schemas[name].(oaJ)["properties"].(oaJ)) }
	for name, typ := range map[string]reflect.Type{
		"OTPRequest": reflect.TypeFor[otpRequest](), "LinkRequest": reflect.TypeFor[linkRequest](),
		"EmailChangeRequest": reflect.TypeFor[emailChangeRequest](), "SecurityAlertRequest": reflect.TypeFor[securityAlertRequest](),
	} {
		s := schemas[name].(oaJ)
		if s["additionalProperties"] != false {
			t.Errorf("%s is not closed", name)
		}
		if _, ok := s["properties"].(oaJ)["locale"]; !ok {
			t.Errorf("%s has no locale", name)
		}
		p := props(name)
		delete(p, "locale")
		if _, err := (oaBody{of: typ, request: true, props: p}).schema(); err == nil || !strings.Contains(err.Error(), `"locale"`) {
			t.Errorf("%s without locale built: %v", name, err)
		}
	}
	p := props("OTPRequest")
	p["colour"] = oaStr("not a field")
	if _, err := (oaBody{of: reflect.TypeFor[otpRequest](), request: true, props: p}).schema(); err == nil || !strings.Contains(err.Error(), `"colour"`) {
		t.Errorf("a property without its field built: %v", err)
	}
	if _, err := (oaBody{of: reflect.TypeFor[otpRequest](), request: true, props: props("OTPRequest"), required: []string{"colour"}}).schema(); err == nil {
		t.Error("a required name that is no property built")
	}
	// the answers: an appended field without its schema fails too
	a := props("Accepted")
	delete(a, "locale")
	if _, err := (oaBody{of: reflect.TypeFor[sentResponse](), added: answerAdded, props: a}).schema(); err == nil || !strings.Contains(err.Error(), `"locale"`) {
		t.Errorf("Accepted without locale built: %v", err)
	}
}

// TestOpenAPIAnswerAddedFields: every field the package appends to an
// encoded answer (each withJSONField call's name) is in answerAdded,
// and so in the Accepted and Failed schemas, and answerAdded names no
// field that nothing appends.
func TestOpenAPIAnswerAddedFields(t *testing.T) {
	found := map[string]bool{}
	fset, files := sourceFiles(t)
	for _, f := range files {
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) < 2 {
				return true
			}
			if id, ok := call.Fun.(*ast.Ident); !ok || id.Name != "withJSONField" {
				return true
			}
			lit, ok := call.Args[1].(*ast.BasicLit)
			name, uerr := strconv.Unquote(lit.Value)
			if !ok || uerr != nil {
				t.Errorf("%s: withJSONField with a field name that is not a string literal", fset.Position(call.Pos()))
				return true
			}
			found[name] = true
			return true
		})
	}
	if got, want := slices.Sorted(maps.Keys(found)), slices.Sorted(slices.Values(answerAdded)); !slices.Equal(got, want) {
		t.Fatalf("withJSONField appends %v; answerAdded lists %v", got, want)
	}
}

// sendKinds are the endpoints whose body prepare decodes: the sends,
// which take the fields of "Options of every send" too.
var sendKinds = []endpointKind{kindSend, kindOTP, kindLink, kindAlert}

// requestSchemaOf is the name of the request body schema of an
// operation of the document, or "".
func requestSchemaOf(op map[string]any) string {
	rb, ok := op["requestBody"].(map[string]any)
	if !ok {
		return ""
	}
	ref := rb["content"].(map[string]any)["application/json"].(map[string]any)["schema"].(map[string]any)["$ref"].(string)
	return strings.TrimPrefix(ref, "#/components/schemas/")
}

// schemaProps are the property names of a schema of the document.
func schemaProps(doc map[string]any, name string) []string {
	s := doc["components"].(map[string]any)["schemas"].(map[string]any)[name].(map[string]any)
	return slices.Sorted(maps.Keys(s["properties"].(map[string]any)))
}

var (
	mdCodeSpan = regexp.MustCompile("`([^`]+)`")
	mdJSONKey  = regexp.MustCompile(`"([a-z_]+)":`)
	// mdOnly is a field row that limits the field to one of the paths
	// its section names: "`email-change` only", "`/send` only" (a path
	// or a flow; "`bcc` only reaches the envelope" is not one)
	mdOnly = regexp.MustCompile("`([a-z/-]+)` only")
)

// documentedFields reads the request fields docs/api.md gives each
// endpoint: the first column of the "| Field |" table of the section
// whose heading names the path (a heading may name several; a row that
// says "`email-change` only" is that path's alone), or, for a section
// without one, the keys of its first JSON object; a send also takes the
// fields (not the headers) of "Options of every send".
func documentedFields(t *testing.T) map[string][]string {
	t.Helper()
	page := docPage(t, "docs/api.md")
	type field struct{ name, only string }
	fieldsOf := func(section string) []field {
		var out []field
		inTable := false
		for line := range strings.SplitSeq(section, "\n") {
			if strings.HasPrefix(line, "| Field") {
				inTable = true
				continue
			}
			if !inTable || strings.HasPrefix(line, "| ---") {
				continue
			}
			if !strings.HasPrefix(line, "|") {
				break
			}
			cells := strings.Split(line, "|")
			if strings.Contains(cells[1], " header") {
				continue
			}
			only := ""
			if m := mdOnly.FindStringSubmatch(cells[2]); m != nil && (strings.HasPrefix(m[1], "/") || flowNamed(m[1]) != nil) {
				only = m[1]
			}
			for _, m := range mdCodeSpan.FindAllStringSubmatch(cells[1], -1) {
				out = append(out, field{m[1], only})
			}
		}
		if !inTable {
			for _, m := range mdCodeSpan.FindAllStringSubmatch(section, -1) {
				if strings.HasPrefix(m[1], "{") {
					for _, k := range mdJSONKey.FindAllStringSubmatch(m[1], -1) {
						out = append(out, field{name: k[1]})
					}
					break
				}
			}
		}
		return out
	}
	every := fieldsOf(docSection(t, "docs/api.md", "\n## Options of every send\n", "\n## "))
	if !slices.Contains(every, field{name: "webhook_url"}) {
		t.Fatalf("Options of every send: no webhook_url in %v", every)
	}
	out := map[string][]string{}
	add := func(p string, fs []field) {
		for _, f := range fs {
			if f.only == "" || f.only == p || strings.HasSuffix(p, "/"+f.only) {
				out[p] = append(out[p], f.name)
			}
		}
	}
	for _, sec := range strings.Split(page, "\n### ")[1:] {
		heading, _, _ := strings.Cut(sec, "\n")
		fields := fieldsOf(sec)
		for _, m := range mdCodeSpan.FindAllStringSubmatch(heading, -1) {
			_, p, _ := strings.Cut(m[1], " ")
			if strings.HasPrefix(m[1], "/") {
				p = m[1]
			}
			if strings.HasPrefix(p, "/") {
				add(p, fields)
			}
		}
	}
	for _, e := range documentedEndpoints() {
		if slices.Contains(sendKinds, e.kind) {
			add(apiPath(e), every)
		}
	}
	return out
}

// TestOpenAPIRequestFieldsDocumented: each endpoint's request schema has
// exactly the fields docs/api.md documents for it, no more and no less.
func TestOpenAPIRequestFieldsDocumented(t *testing.T) {
	var doc map[string]any
	b, err := openAPIJSON("/authmail")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	documented := documentedFields(t)
	n := 0
	for _, e := range documentedEndpoints() {
		op := doc["paths"].(map[string]any)[apiPath(e)].(map[string]any)[strings.ToLower(e.method())].(map[string]any)
		name := requestSchemaOf(op)
		if name == "" {
			continue
		}
		n++
		got := schemaProps(doc, name)
		want := slices.Sorted(slices.Values(documented[apiPath(e)]))
		want = slices.Compact(want)
		for _, f := range want {
			if !slices.Contains(got, f) {
				t.Errorf("%s: docs/api.md documents %q, which %s lacks", e.path, f, name)
			}
		}
		for _, f := range got {
			if !slices.Contains(want, f) {
				t.Errorf("%s: %s has %q, which docs/api.md does not document for it", e.path, name, f)
			}
		}
	}
	if n < 9 {
		t.Fatalf("only %d endpoints with a request body", n)
	}
}

// servedValidator builds a validator from the document h serves at GET
// /authmail/openapi.json.
func servedValidator(t *testing.T, h *Handler) (map[string]any, validator.Validator) {
	t.Helper()
	rec, _ := call(t, h, http.MethodGet, "/authmail/openapi.json", "")
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /openapi.json: %d %s", rec.Code, rec.Body)
	}
	var m map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	d, err := libopenapi.NewDocument(rec.Body.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	v, errs := validator.NewValidator(d)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	return m, v
}

// undeclared returns the fields of an answer that its schema does not
// declare, by their path. An answer schema is open (a client must not
// break on a new field), so the validator lets such a field through;
// this makes it an error wherever the schema lists its properties:
// through $ref, allOf (the properties of every branch) and oneOf (the
// branch that declares the most), into nested objects and arrays. The
// validator's own strict mode is no help here: it sees no properties
// through the allOf of the error answers.
func undeclared(doc, schema map[string]any, v any, at string) []string {
	resolve := func(s map[string]any) map[string]any {
		for {
			ref, ok := s["$ref"].(string)
			if !ok {
				return s
			}
			s = doc["components"].(map[string]any)["schemas"].(map[string]any)[strings.TrimPrefix(ref, "#/components/schemas/")].(map[string]any)
		}
	}
	s := resolve(schema)
	if branches, ok := s["oneOf"].([]any); ok {
		var best []string
		for i, b := range branches {
			if u := undeclared(doc, b.(map[string]any), v, at); i == 0 || len(u) < len(best) {
				best = u
			}
		}
		return best
	}
	var out []string
	switch v := v.(type) {
	case []any:
		if items, ok := s["items"].(map[string]any); ok {
			for i, x := range v {
				out = append(out, undeclared(doc, items, x, fmt.Sprintf("%s[%d]", at, i))...)
			}
		}
	case map[string]any:
		props := map[string]any{}
		var collect func(map[string]any)
		collect = func(s map[string]any) {
			s = resolve(s)
			if p, ok := s["properties"].(map[string]any); ok {
				maps.Copy(props, p)
			}
			all, _ := s["allOf"].([]any)
			for _, b := range all {
				collect(b.(map[string]any))
			}
		}
		collect(s)
		if len(props) == 0 {
			return nil // a loose object: nothing to hold it to
		}
		for _, k := range slices.Sorted(maps.Keys(v)) {
			ps, ok := props[k].(map[string]any)
			if !ok {
				out = append(out, at+"."+k)
				continue
			}
			out = append(out, undeclared(doc, ps, v[k], at+"."+k)...)
		}
	}
	return out
}

// pathParam is a parameter of a path template, quoted by QuoteMeta.
var pathParam = regexp.MustCompile(`\\\{[^}\\]+\\\}`)

// answerSchema is the schema the document gives the answer of status to
// method on path (below /authmail), or nil when it gives none (HEAD).
func answerSchema(doc map[string]any, method, path string, status int) map[string]any {
	path, _, _ = strings.Cut(strings.TrimPrefix(path, "/authmail"), "?")
	for tmpl, item := range doc["paths"].(map[string]any) {
		re := regexp.MustCompile("^" + pathParam.ReplaceAllString(regexp.QuoteMeta(tmpl), "[^/]+") + "$")
		if !re.MatchString(path) {
			continue
		}
		var v any = item
		for _, k := range []string{strings.ToLower(method), "responses", strconv.Itoa(status), "content", "application/json", "schema"} {
			m, _ := v.(map[string]any)
			v = m[k]
		}
		s, _ := v.(map[string]any)
		return s
	}
	return nil
}

func validationProblems(errs []*vErrors.ValidationError) string {
	var b strings.Builder
	for _, e := range errs {
		fmt.Fprintf(&b, "\n  %s: %s", e.Message, e.Reason)
		for _, se := range e.SchemaValidationErrors {
			fmt.Fprintf(&b, "\n    at %s: %s", se.FieldPath, se.Reason)
		}
	}
	return b.String()
}

// exchange sends one request through the document's validator and then
// the handler, and validates the answer against the document, holding
// its fields to those the document declares (undeclared). It returns
// whether the validator accepted the request (with why not), and the
// answer.
func exchange(t *testing.T, h *Handler, doc map[string]any, v validator.Validator, method, path, body string, headers ...string) (bool, string, *httptest.ResponseRecorder, map[string]any) {
	t.Helper()
	ok, errs := v.ValidateHttpRequest(apiRequest(method, path, strings.NewReader(body), headers...))
	rec, out := serveRequest(t, h, apiRequest(method, path, strings.NewReader(body), headers...))
	res := rec.Result()
	res.Body = io.NopCloser(bytes.NewReader(rec.Body.Bytes()))
	if rok, rerrs := v.ValidateHttpResponse(apiRequest(method, path, strings.NewReader(body), headers...), res); !rok {
		t.Errorf("%s %s %s → %d %s: the answer does not match the document:%s", method, path, body, rec.Code, rec.Body, validationProblems(rerrs))
	}
	if s := answerSchema(doc, method, path, rec.Code); s != nil {
		if u := undeclared(doc, s, out, "$"); len(u) > 0 {
			t.Errorf("%s %s %s → %d %s: the document does not declare %v", method, path, body, rec.Code, rec.Body, u)
		}
	}
	return ok, validationProblems(errs), rec, out
}

// TestOpenAPIRequestFieldsAccepted sends, for every endpoint that takes
// a body, bodies that together hold every field of its schema through a
// validator built from the served document and then through the
// handler: both must accept each one, a real send and a dry run, and
// every answer (sent, queued, failed, skipped, dry run, verified, the
// test message) must match the document and hold no field it does not
// declare, so an answer field it lacks (locale) fails. Then every field
// name any request schema has is tried on every endpoint whose schema
// lacks it: the validator and the handler must both refuse it, the
// handler as an unknown field. So the document accepts exactly what the
// server does. GET and HEAD of /health, /openapi.json and the message
// status and list go through the same checks.
func TestOpenAPIRequestFieldsAccepted(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	recv := newHookReceiver(t, func(int) int { return http.StatusNoContent })
	t.Setenv("AUTHMAIL_UNIT_HOOK_SECRET", "configured-secret")
	h := newInstance(t, "").handler(withSMTP(t, srv), withCodes(t), withoutLimits, func(h *Handler) {
		h.Keys[0].Allow = slices.Concat(sendPerms, verifyPerms, adminPerms)
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "{env.AUTHMAIL_UNIT_HOOK_SECRET}"
		h.SecurityAlerts = map[string]bool{"new_login": true, "account_locked": false}
	})
	doc, v := servedValidator(t, h)
	hook := recv.srv.URL + "/hook"
	// for the verify endpoints; another recipient than the samples', whose
	// codes and tokens would replace these
	challenge, code := issueCode(t, h, srv, `{"to":"joe@example.org","code":"auto"}`)
	token := issueLink(t, h, srv, "magic-link", `{"to":"joe@example.org","token":"auto"}`)

	// samples are the bodies sent to each endpoint; together they hold
	// every field of its schema (some exclude each other, as token and
	// link do). A new field fails this test until it has a sample here.
	type sample struct {
		body  map[string]any
		mails int    // messages it sends
		want  string // the answer's status field
	}
	webhook := func(m map[string]any) map[string]any {
		m["webhook_url"], m["webhook_secret"] = hook, "hook-secret-0123456789"
		return m
	}
	linkSamples := func(extra map[string]any, mails int) []sample {
		full := webhook(map[string]any{"to": "Jane <jane@example.org>", "user_name": "Jane", "expires_in_minutes": 30,
			"token": "auto", "base_url": "https://app.example.com/auth", "locale": "ko"})
		maps.Copy(full, extra)
		return []sample{{full, mails, "sent"}, {map[string]any{"to": "jane@example.org", "link": "https://app.example.com/verify?t=abc", "locale": "de-AT"}, 1, "sent"}}
	}
	samples := map[string][]sample{
		"/send": {{webhook(map[string]any{"to": []string{"Jane <jane@example.org>"}, "cc": "cc@example.org", "bcc": []string{"bcc@example.org"},
			"reply_to": "help@example.org", "subject": "Your receipt", "html_body": "<p>Paid.</p>", "text_body": "Paid.",
			"list_unsubscribe": "<https://app.example.com/unsubscribe>", "list_unsubscribe_post": "List-Unsubscribe=One-Click",
			"priority": "normal"}), 1, "sent"}},
		"/send/otp": {
			{webhook(map[string]any{"to": "jane@example.org", "user_name": "Jane", "code": "auto", "purpose": "login",
				"expires_in_minutes": 10, "locale": "ko"}), 1, "sent"},
			{map[string]any{"to": "jane@example.org", "code": "482913", "locale": "de-AT"}, 1, "sent"},
		},
		"/send/magic-link":     linkSamples(nil, 1),
		"/send/password-reset": linkSamples(nil, 1),
		"/send/verify-email":   linkSamples(nil, 1),
		"/send/email-change":   linkSamples(map[string]any{"old_email": "jane.old@example.org"}, 2),
		"/send/security-alert": {
			{webhook(map[string]any{"to": "jane@example.org", "user_name": "Jane", "event": "new_login", "ip": "192.0.2.7",
				"user_agent": "Firefox/140.0", "location": "Seoul", "occurred_at": "2026-11-21T09:30:00Z", "locale": "ko"}), 1, "sent"},
			{map[string]any{"to": "jane@example.org", "event": "account_locked", "locale": "ko"}, 0, "skipped"},
		},
		"/verify/otp":   {{map[string]any{"challenge_id": challenge, "code": code, "ip": "192.0.2.7"}, 0, ""}},
		"/verify/token": {{map[string]any{"token": token, "flow": "magic-link", "ip": "2001:db8::7"}, 0, ""}},
		"/test":         {{map[string]any{"to": "ops@example.org"}, 1, "sent"}},
	}
	// a sample value of every field name, for the endpoints that lack it
	values := map[string]any{}
	for _, ss := range samples {
		for _, s := range ss {
			maps.Copy(values, s.body)
		}
	}
	mustJSON := func(m map[string]any) string {
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	drain := func(n int) {
		t.Helper()
		if n == 0 {
			return
		}
		if got := srv.WaitMessages(n, 10*time.Second); len(got) != n {
			t.Fatalf("%d messages arrived, want %d", len(got), n)
		}
		srv.ClearMessages()
	}

	sentIDs := []string{}
	n := 0
	for _, e := range documentedEndpoints() {
		op := doc["paths"].(map[string]any)[apiPath(e)].(map[string]any)[strings.ToLower(e.method())].(map[string]any)
		name := requestSchemaOf(op)
		if name == "" {
			continue
		}
		n++
		path := "/authmail" + e.path
		props := schemaProps(doc, name)
		ss, ok := samples[e.path]
		if !ok {
			t.Errorf("%s: no sample bodies", e.path)
			continue
		}
		covered := map[string]bool{}
		for _, s := range ss {
			body := mustJSON(s.body)
			for k := range s.body {
				covered[k] = true
			}
			if slices.Contains(sendKinds, e.kind) || e.kind == kindTest {
				ok, why, rec, _ := exchange(t, h, doc, v, http.MethodPost, path, body, "X-Dry-Run: true")
				if !ok || rec.Code != http.StatusOK {
					t.Errorf("%s %s, a dry run: the document accepts it: %v%s; the handler answers %d %s", e.path, body, ok, why, rec.Code, rec.Body)
				}
			}
			ok, why, rec, out := exchange(t, h, doc, v, http.MethodPost, path, body)
			if !ok {
				t.Errorf("%s %s: the document refuses it:%s", e.path, body, why)
			}
			if rec.Code != http.StatusOK || (s.want != "" && out["status"] != s.want) {
				t.Errorf("%s %s: the handler answers %d %s", e.path, body, rec.Code, rec.Body)
			}
			if loc, templated := s.body["locale"]; templated && s.want == "sent" && out["locale"] == nil {
				t.Errorf("%s %s (locale %v): the answer has no locale: %s", e.path, body, loc, rec.Body)
			}
			if id, _ := out["id"].(string); id != "" {
				sentIDs = append(sentIDs, id)
			}
			drain(s.mails)
		}
		for _, f := range props {
			if !covered[f] {
				t.Errorf("%s: no sample body holds %s's field %q", e.path, name, f)
			}
		}
		for f := range covered {
			if !slices.Contains(props, f) {
				t.Errorf("%s: a sample body holds %q, which %s lacks", e.path, f, name)
			}
		}
		// every other field name is refused by both
		for _, f := range slices.Sorted(maps.Keys(values)) {
			if slices.Contains(props, f) {
				continue
			}
			body := maps.Clone(ss[0].body)
			body[f] = values[f]
			ok, _, rec, out := exchange(t, h, doc, v, http.MethodPost, path, mustJSON(body))
			if ok {
				t.Errorf("%s: the document accepts %q, which %s lacks", e.path, f, name)
			}
			if rec.Code != http.StatusUnprocessableEntity || out["field"] != f || !strings.Contains(fmt.Sprint(out["message"]), "unknown field") {
				t.Errorf("%s: the handler does not refuse %q as unknown, though %s lacks it: %d %s", e.path, f, name, rec.Code, rec.Body)
			}
		}
	}
	if n < 9 {
		t.Fatalf("only %d endpoints with a request body", n)
	}

	// the other answers of a send: queued (202) and failed (502), with
	// the locale of their message
	otpBody := `{"to":"jane@example.org","code":"482913","locale":"ko"}`
	ok, why, rec, out := exchange(t, h, doc, v, http.MethodPost, "/authmail/send/otp", otpBody, "Prefer: respond-async")
	if !ok || rec.Code != http.StatusAccepted || out["locale"] != "ko" {
		t.Errorf("respond-async: %v%s; %d %s", ok, why, rec.Code, rec.Body)
	}
	drain(1)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpRefusal(550) }})
	ok, why, rec, out = exchange(t, h, doc, v, http.MethodPost, "/authmail/send/otp", otpBody)
	srv.SetHooks(smtptest.Hooks{})
	if !ok || rec.Code != http.StatusBadGateway || out["locale"] != "ko" {
		t.Errorf("refused send: %v%s; %d %s", ok, why, rec.Code, rec.Body)
	}
	// the bodyless endpoints: HEAD is documented wherever GET is
	if len(sentIDs) == 0 {
		t.Fatal("no message was sent")
	}
	for _, m := range []string{http.MethodGet, http.MethodHead} {
		for _, p := range []string{"/authmail/health", "/authmail/openapi.json", "/authmail/messages", "/authmail/messages/" + sentIDs[0]} {
			ok, why, rec, _ := exchange(t, h, doc, v, m, p, "")
			if !ok || rec.Code != http.StatusOK {
				t.Errorf("%s %s: the document accepts it: %v%s; the handler answers %d", m, p, ok, why, rec.Code)
			}
		}
	}
	// the validator refuses what the document does not declare, so its
	// acceptance above means something
	if ok, _ := v.ValidateHttpRequest(apiRequest(http.MethodPost, "/authmail/send/otp", strings.NewReader(`{"to":"jane@example.org","code":"1","colour":"red"}`))); ok {
		t.Error("the validator accepted an unknown field")
	}
	if ok, _ := v.ValidateHttpRequest(apiRequest(http.MethodPut, "/authmail/health", nil)); ok {
		t.Error("the validator accepted PUT /health")
	}
}
