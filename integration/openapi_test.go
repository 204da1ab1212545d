package integration

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// liveDoc fetches /openapi.json from the running Caddy, without a key,
// and builds a validator from it.
func liveDoc(t *testing.T) (map[string]any, validator.Validator) {
	t.Helper()
	r := call(t, http.MethodGet, "/authmail/openapi.json", nil)
	if r.status != http.StatusOK {
		t.Fatalf("GET /openapi.json: %d %s", r.status, r.raw)
	}
	doc, err := libopenapi.NewDocument([]byte(r.raw))
	if err != nil {
		t.Fatal(err)
	}
	v, errs := validator.NewValidator(doc)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	if ok, verrs := v.ValidateDocument(); !ok {
		t.Fatalf("the served document is not valid OpenAPI 3.1: %v", verrs)
	}
	return r.json, v
}

// conform sends one request to Caddy and checks the answer against the
// document: its status must be documented for the operation, and its
// body must match that status's schema. It returns the answer.
func conform(t *testing.T, v validator.Validator, method, path, body string, headers ...string) response {
	t.Helper()
	return conformAs(t, v, method, method, path, body, headers...)
}

// conformAs checks the answer to a request sent with method against the
// operation of docMethod: a 405 is documented by the operation the path
// does have.
func conformAs(t *testing.T, v validator.Validator, docMethod, method, path, body string, headers ...string) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, baseURL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range headers {
		k, val, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(val))
	}
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(res.Body)
	res.Body.Close()
	r := response{status: res.StatusCode, header: res.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &r.json)
	res.Body = io.NopCloser(bytes.NewReader(raw))
	// the validator reads the request body again for the request check
	req2, _ := http.NewRequest(docMethod, baseURL+path, strings.NewReader(body))
	req2.Header = req.Header
	if ok, errs := v.ValidateHttpResponse(req2, res); !ok {
		for _, e := range errs {
			t.Errorf("%s %s → %d %s: %s: %s", method, path, res.StatusCode, raw, e.Message, e.Reason)
			for _, se := range e.SchemaValidationErrors {
				t.Errorf("  %s: %s", se.FieldPath, se.Reason)
			}
		}
	}
	if res.Header.Get("X-Request-ID") == "" {
		t.Errorf("%s %s: no X-Request-ID", method, path)
	}
	return r
}

// operations maps "METHOD /template" to the document's operation.
func operations(doc map[string]any) map[string]map[string]any {
	out := map[string]map[string]any{}
	for p, item := range doc["paths"].(map[string]any) {
		for m, op := range item.(map[string]any) {
			out[strings.ToUpper(m)+" "+p] = op.(map[string]any)
		}
	}
	return out
}

func documentedStatuses(op map[string]any) []int {
	var out []int
	for k := range op["responses"].(map[string]any) {
		n, _ := strconv.Atoi(k)
		out = append(out, n)
	}
	sort.Ints(out)
	return out
}

func example(op map[string]any) string {
	rb, ok := op["requestBody"].(map[string]any)
	if !ok {
		return ""
	}
	ex := rb["content"].(map[string]any)["application/json"].(map[string]any)["example"]
	b, _ := json.Marshal(ex)
	return string(b)
}

// TestOpenAPIConformance sends each endpoint's documented example to a
// real Caddy and real SMTP server, and then a request for each
// documented error status, and validates every answer (status, fields,
// types, error_code enums) against the document Caddy serves. A status
// documented but triggered by no case here fails the test, unless it is
// in untriggered, with the reason.
func TestOpenAPIConformance(t *testing.T) {
	t.Setenv("AUTHMAIL_IT_CODES_SECRET", secret("it-codes-secret-0123456789abcdef"))
	t.Setenv("AUTHMAIL_IT_SLOW_KEY", secret("it-slow-key-0123456789abcdef"))
	t.Setenv("AUTHMAIL_IT_NARROW_KEY", secret("it-narrow-key-0123456789abcdef"))
	load(t, config{
		Keys: `key app {env.AUTHMAIL_IT_KEY} {
			allow send otp magic-link password-reset verify-email email-change security-alert verify status test preview
			rate off
		}
		key slow {env.AUTHMAIL_IT_SLOW_KEY} {
			allow send otp magic-link password-reset verify-email email-change security-alert verify status test preview
			rate 1/1h
		}
		key narrow {env.AUTHMAIL_IT_NARROW_KEY} {
			allow test
			rate off
		}
		key other {env.AUTHMAIL_IT_KEY2} {
			allow otp
			rate off
		}`,
		Extra: `codes {
			secret {env.AUTHMAIL_IT_CODES_SECRET}
			length 8
			alphabet ABCDEFGHJKMNPQRSTVWXYZ
		}
		delivery {
			replay_window 10m
		}`,
	})
	doc, v := liveDoc(t)
	ops := operations(doc)
	app := []string{"Authorization: Bearer " + keyApp, "Content-Type: application/json"}
	slow := []string{"Authorization: Bearer it-slow-key-0123456789abcdef", "Content-Type: application/json"}
	narrow := []string{"Authorization: Bearer it-narrow-key-0123456789abcdef", "Content-Type: application/json"}
	// spend the slow key's one request
	if r := call(t, http.MethodGet, "/authmail/status", nil, slow...); r.status != http.StatusOK {
		t.Fatalf("slow key: %d %s", r.status, r.raw)
	}

	// statuses that no case below triggers, and why
	untriggered := map[int]string{
		http.StatusInternalServerError: "internal_error means a template failed at request time: templates are checked at load",
		http.StatusServiceUnavailable:  "outbox_unavailable and queue_full need a failing storage or a full queue (storage_faults_test.go, outbox_test.go)",
		http.StatusGone:                "code_expired, code_burned, token_expired: codes_test.go moves the clock, which a live Caddy cannot",
		http.StatusSeeOther:            "the retry button's redirect: TestRetryFromPreviewForm and TestPreviewOutboxInChromium (this client follows redirects)",
	}
	idRe := regexp.MustCompile(`^[0-9a-z]{28}$`)

	covered := map[string]map[int]bool{}
	check := func(opKey string, r response, want int) {
		t.Helper()
		if r.status != want {
			t.Errorf("%s: got %d %s, want %d", opKey, r.status, r.raw, want)
		}
		if !slices.Contains(documentedStatuses(ops[opKey]), r.status) {
			t.Errorf("%s answered %d, which it does not document", opKey, r.status)
		}
		if covered[opKey] == nil {
			covered[opKey] = map[int]bool{}
		}
		covered[opKey][r.status] = true
	}
	// /messages: 422 for a bad query parameter
	check("GET /messages", conform(t, v, http.MethodGet, "/authmail/messages?status=lost", "", app...), http.StatusUnprocessableEntity)
	check("HEAD /messages", conform(t, v, http.MethodHead, "/authmail/messages?status=lost", "", app...), http.StatusUnprocessableEntity)
	var keys []string
	for k := range ops {
		keys = append(keys, k)
	}
	// the status endpoint last: it reads a message sent before
	sort.Slice(keys, func(i, j int) bool {
		a, b := strings.Contains(keys[i], "{id}"), strings.Contains(keys[j], "{id}")
		if a != b {
			return b
		}
		return keys[i] < keys[j]
	})
	var sentID string
	for _, opKey := range keys {
		op := ops[opKey]
		method, tmpl, _ := strings.Cut(opKey, " ")
		path := "/authmail" + strings.ReplaceAll(strings.ReplaceAll(tmpl, "{id}", "0000000000000000000000000000"), "{flow}", "otp")
		body := example(op)
		statuses := documentedStatuses(op)
		smtpSrv.SetHooks(smtptest.Hooks{})
		t.Run(opKey, func(t *testing.T) {
			sec, explicit := op["security"].([]any)
			needsKey := !explicit || len(sec) > 0
			// the documented example succeeds
			switch tmpl {
			case "/verify/otp":
				r := conform(t, v, http.MethodPost, "/authmail/send/otp", `{"to":"jane@example.org","code":"auto"}`, app...)
				msgs := smtpSrv.WaitMessages(1, 10*time.Second)
				smtpSrv.ClearMessages()
				if len(msgs) != 1 {
					t.Fatalf("%d messages", len(msgs))
				}
				m := itCodeLine.FindStringSubmatch(parseMail(t, msgs[0].Data).Text)
				if m == nil {
					t.Fatal("no code in the mail")
				}
				code := secret(m[1])
				r = conform(t, v, method, path, mustJSON(map[string]string{"challenge_id": r.str("challenge_id"), "code": code}), app...)
				check(opKey, r, http.StatusOK)
				r = conform(t, v, method, path, body, app...)
				check(opKey, r, http.StatusNotFound) // the example's challenge does not exist
				// a wrong code: 422 code_invalid
				r = conform(t, v, http.MethodPost, "/authmail/send/otp", `{"to":"jane@example.org","code":"auto"}`, app...)
				smtpSrv.WaitMessages(1, 10*time.Second)
				smtpSrv.ClearMessages()
				r = conform(t, v, method, path, mustJSON(map[string]string{"challenge_id": r.str("challenge_id"), "code": "WRONG"}), app...)
				check(opKey, r, http.StatusUnprocessableEntity)
			case "/verify/token":
				conform(t, v, http.MethodPost, "/authmail/send/magic-link", `{"to":"jane@example.org","token":"auto"}`, app...)
				tok := issuedToken(t, 1)
				r := conform(t, v, method, path, mustJSON(map[string]string{"token": tok, "flow": "magic-link"}), app...)
				check(opKey, r, http.StatusOK)
				r = conform(t, v, method, path, body, app...)
				check(opKey, r, http.StatusNotFound)
			case "/messages/{id}/retry":
				smtpSrv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpErr(550, [3]int{5, 1, 1}, "no such user") }})
				r := conform(t, v, http.MethodPost, "/authmail/send/otp", `{"to":"jane@example.org","code":"12345678"}`, app...)
				smtpSrv.SetHooks(smtptest.Hooks{})
				if r.status != http.StatusBadGateway {
					t.Fatalf("refused send: %d %s", r.status, r.raw)
				}
				failed := r.str("id")
				deadline := time.Now().Add(10 * time.Second)
				for {
					r = conform(t, v, method, "/authmail/messages/"+failed+"/retry", "", app...)
					if r.status != http.StatusConflict || time.Now().After(deadline) {
						break
					}
					check(opKey, r, http.StatusConflict) // retry_later: the batch is retiring
					time.Sleep(20 * time.Millisecond)
				}
				check(opKey, r, http.StatusAccepted)
				smtpSrv.WaitMessages(1, 10*time.Second)
				smtpSrv.ClearMessages()
				check(opKey, conform(t, v, method, "/authmail/messages/"+sentID+"/retry", "", app...), http.StatusConflict)
				check(opKey, conform(t, v, method, path, "", app...), http.StatusNotFound)
			case "/preview", "/preview/{flow}.eml":
				check(opKey, conform(t, v, method, path+"?user_name=Jane", "", app...), http.StatusOK)
				check(opKey, conform(t, v, method, path+"?colour=red", "", app...), http.StatusUnprocessableEntity)
				if tmpl != "/preview" {
					check(opKey, conform(t, v, method, "/authmail/preview/nope.eml", "", app...), http.StatusNotFound)
				}
			case "/messages/{id}":
				r := conform(t, v, method, "/authmail/messages/"+sentID, "", app...)
				check(opKey, r, http.StatusOK)
				r = conform(t, v, method, path, "", app...)
				check(opKey, r, http.StatusNotFound)
			default:
				r := conform(t, v, method, path, body, app...)
				want := http.StatusOK
				check(opKey, r, want)
				if id := r.str("id"); idRe.MatchString(id) {
					sentID = id
				}
				smtpSrv.ClearMessages()
			}
			if method == http.MethodPost && body != "" {
				// a dry run
				r := conform(t, v, method, path, body, append(app, "X-Dry-Run: true")...)
				if tmpl == "/verify/otp" || tmpl == "/verify/token" {
					check(opKey, r, http.StatusBadRequest)
				} else {
					check(opKey, r, http.StatusOK)
				}
			}
			if slices.Contains(statuses, http.StatusAccepted) && body != "" {
				r := conform(t, v, method, path, body, append(app, "Prefer: respond-async")...)
				check(opKey, r, http.StatusAccepted)
				smtpSrv.WaitMessages(1, 10*time.Second)
				smtpSrv.ClearMessages()
			}
			if slices.Contains(statuses, http.StatusBadGateway) {
				smtpSrv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpErr(550, [3]int{5, 1, 1}, "no such user") }})
				r := conform(t, v, method, path, body, app...)
				check(opKey, r, http.StatusBadGateway)
				smtpSrv.SetHooks(smtptest.Hooks{})
				smtpSrv.ClearMessages()
			}
			if needsKey {
				r := conform(t, v, method, path, body, "Content-Type: application/json")
				check(opKey, r, http.StatusUnauthorized)
				r = conform(t, v, method, path, body, slow...)
				check(opKey, r, http.StatusTooManyRequests)
			}
			if slices.Contains(statuses, http.StatusForbidden) {
				k := narrow
				if tmpl == "/test" {
					k = []string{"Authorization: Bearer " + keyOther, "Content-Type: application/json"}
				}
				r := conform(t, v, method, path, body, k...)
				check(opKey, r, http.StatusForbidden)
			}
			other := http.MethodPost
			if method == http.MethodPost {
				other = http.MethodGet
			}
			check(opKey, conformAs(t, v, method, other, path, "", app...), http.StatusMethodNotAllowed)
			if method != http.MethodPost || body == "" {
				return
			}
			check(opKey, conform(t, v, method, path, body, "Authorization: Bearer "+keyApp, "Content-Type: text/plain"), http.StatusUnsupportedMediaType)
			check(opKey, conform(t, v, method, path, "{", app...), http.StatusBadRequest)
			check(opKey, conform(t, v, method, path, `{"to":"`+strings.Repeat("a", 70<<10)+`"}`, app...), http.StatusRequestEntityTooLarge)
			check(opKey, conform(t, v, method, path, `{"nope":1}`, app...), http.StatusUnprocessableEntity)
			if slices.Contains(statuses, http.StatusConflict) {
				r := conform(t, v, method, path, body, append(app, "Idempotency-Key: conformance-"+tmpl)...)
				if r.status/100 != 2 {
					t.Fatalf("idempotent first request: %d %s", r.status, r.raw)
				}
				smtpSrv.WaitMessages(1, 10*time.Second)
				smtpSrv.ClearMessages()
				changed := strings.Replace(body, "jane@example.com", "john@example.com", 1)
				r = conform(t, v, method, path, changed, append(app, "Idempotency-Key: conformance-"+tmpl)...)
				check(opKey, r, http.StatusConflict)
			}
		})
	}
	for _, opKey := range keys {
		for _, st := range documentedStatuses(ops[opKey]) {
			if !covered[opKey][st] && untriggered[st] == "" {
				t.Errorf("%s documents %d, which no case triggered", opKey, st)
			}
		}
	}
}
