package authmail

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// serve runs one request through a provisioned handler and returns the
// recorder and the request's replacer.
func serve(t *testing.T, h *Handler, method, path, body string, headers ...string) (*httptest.ResponseRecorder, map[string]string) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	for _, kv := range headers {
		k, v, _ := strings.Cut(kv, ":")
		req.Header.Set(k, strings.TrimSpace(v))
	}
	repl := caddy.NewReplacer()
	req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, repl))
	rec := httptest.NewRecorder()
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusTeapot)
		return nil
	})
	if err := h.ServeHTTP(rec, req, next); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, k := range []string{"id", "message_id", "flow", "key_id", "status", "error_code"} {
		out[k], _ = repl.GetString("http.authmail." + k)
	}
	return rec, out
}

func TestPlaceholders(t *testing.T) {
	h := provisionedHandler(t)
	auth := []string{"Authorization: Bearer 0123456789abcdef0123", "Content-Type: application/json"}

	rec, ph := serve(t, h, "POST", "/authmail/send/otp", `{"to":"a@example.com","code":"1"}`, auth...)
	var resp map[string]any
	_ = json.Unmarshal(rec.Body.Bytes(), &resp)
	if rec.Code != 200 || ph["status"] != "captured" || ph["flow"] != "otp" || ph["key_id"] != "app" ||
		ph["id"] != resp["id"] || ph["message_id"] != resp["message_id"] || ph["error_code"] != "" {
		t.Errorf("after a send: %d %v %s", rec.Code, ph, rec.Body)
	}
	_, ph = serve(t, h, "POST", "/authmail/send/otp", `{"to":"bad","code":"1"}`, auth...)
	if ph["status"] != "rejected" || ph["error_code"] != "invalid_request" || ph["key_id"] != "app" {
		t.Errorf("after a 422: %v", ph)
	}
	_, ph = serve(t, h, "POST", "/authmail/send/otp", `{"to":"a@example.com","code":"1"}`, append(auth, "X-Dry-Run: 1")...)
	if ph["status"] != "dry_run" {
		t.Errorf("after a dry run: %v", ph)
	}
	h.SecurityAlerts["two_factor_enabled"] = false
	_, ph = serve(t, h, "POST", "/authmail/send/security-alert", `{"to":"a@example.com","event":"two_factor_enabled"}`, auth...)
	if ph["status"] != "skipped" || ph["flow"] != "security-alert" {
		t.Errorf("after a disabled alert: %v", ph)
	}
	_, ph = serve(t, h, "POST", "/authmail/send", `{}`, "Content-Type: application/json")
	if ph["status"] != "rejected" || ph["error_code"] != "unauthorized" || ph["key_id"] != "" {
		t.Errorf("after a 401: %v", ph)
	}
	// not for authmail: the next handler runs, no placeholders
	rec, ph = serve(t, h, "GET", "/elsewhere", "")
	if rec.Code != http.StatusTeapot || ph["status"] != "" {
		t.Errorf("pass-through: %d %v", rec.Code, ph)
	}
}

// TestDocsJSONExample keeps the JSON config of docs/configuration.md
// valid: it decodes strictly into Handler and passes the config checks.
func TestDocsJSONExample(t *testing.T) {
	doc, err := os.ReadFile("docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(doc), "## JSON config")
	if !ok {
		t.Fatal("docs/configuration.md has no JSON config section")
	}
	_, block, ok := strings.Cut(after, "```json\n")
	if !ok {
		t.Fatal("no json block in the JSON config section")
	}
	block, _, _ = strings.Cut(block, "```")
	var raw map[string]any
	if err := json.Unmarshal([]byte(block), &raw); err != nil {
		t.Fatalf("docs/configuration.md JSON does not parse: %v", err)
	}
	if raw["handler"] != "authmail" {
		t.Fatalf("handler = %v", raw["handler"])
	}
	delete(raw, "handler")
	b, _ := json.Marshal(raw)
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var h Handler
	if err := dec.Decode(&h); err != nil {
		t.Fatalf("docs/configuration.md JSON has a field Handler does not know: %v", err)
	}
	if err := h.checkConfig(); err != nil {
		t.Fatalf("docs/configuration.md JSON fails the config checks: %v", err)
	}
}
