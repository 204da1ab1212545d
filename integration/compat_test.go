package integration

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// relayClient calls authmail the way authmail-relay's Python client
// (EmailServiceClient) does: base_url without a trailing slash,
// "Authorization: Bearer <key>" on every request, JSON bodies with only
// the fields given, "X-Dry-Run: true" for dry runs, and on a 502
// body.get("detail", body)["error_code"]; other 4xx/5xx raise.
type relayClient struct {
	t   *testing.T
	key string
}

type relayResult struct {
	status    int
	raw       string
	json      map[string]any
	errorCode any // EmailServiceError.error_code on a 502
}

func (c relayClient) do(method, path string, payload map[string]any, dryRun bool) relayResult {
	c.t.Helper()
	var body io.Reader
	if payload != nil {
		body = strings.NewReader(mustJSON(payload))
	}
	req, _ := http.NewRequest(method, baseURL+path, body)
	req.Header.Set("Authorization", "Bearer "+c.key)
	if payload != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if dryRun {
		req.Header.Set("X-Dry-Run", "true")
	}
	res, err := client.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	r := relayResult{status: res.StatusCode, raw: string(raw)}
	_ = json.Unmarshal(raw, &r.json)
	if res.StatusCode == http.StatusBadGateway {
		detail, ok := r.json["detail"]
		if !ok {
			detail = any(r.json)
		}
		if d, ok := detail.(map[string]any); ok {
			r.errorCode = d["error_code"]
		}
	}
	return r
}

// hookSink records webhooks.
type hookSink struct {
	srv   *httptest.Server
	mu    sync.Mutex
	calls []hookCall
}

type hookCall struct {
	header http.Header
	body   []byte
}

func newHookSink(t *testing.T) *hookSink {
	s := &hookSink{}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s.mu.Lock()
		s.calls = append(s.calls, hookCall{r.Header.Clone(), b})
		s.mu.Unlock()
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *hookSink) next(t *testing.T) hookCall {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		if len(s.calls) > 0 {
			c := s.calls[0]
			s.calls = s.calls[1:]
			s.mu.Unlock()
			return c
		}
		s.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("no webhook arrived")
	return hookCall{}
}

var sentAtRelay = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$`)

// TestRelayClientInBothModes drives every endpoint of authmail-relay the
// way its client does, against authmail with path_prefix / (the relay's
// paths), once with authmail's own behaviour and once with compat
// authmail-relay, and checks what the client and a receiver written to
// the relay's webhook documentation get.
func TestRelayClientInBothModes(t *testing.T) {
	sink := newHookSink(t)
	const hookSecret = "5f4dcc3b5aa765d61d8327deb882cf995f4dcc3b5aa765d61d8327deb882cf99"
	secret(hookSecret)
	for _, compat := range []bool{false, true} {
		name := map[bool]string{false: "authmail", true: "compat"}[compat]
		t.Run(name, func(t *testing.T) {
			extra := "webhook_allow_hosts 127.0.0.1"
			if compat {
				extra += "\n\t\tcompat authmail-relay"
			}
			load(t, config{PathPrefix: "/", Extra: extra})
			c := relayClient{t: t, key: keyApp}

			// health
			if r := c.do("GET", "/health", nil, false); r.status != 200 || r.raw != `{"status":"ok"}`+"\n" {
				t.Fatalf("health: %d %s", r.status, r.raw)
			}
			// send, send_otp, send_magic_link
			r := c.do("POST", "/send", map[string]any{"to": "jane@example.org", "subject": "Hi", "html_body": "<p>x</p>"}, false)
			if r.status != 200 || r.json["sent"] != true || !strings.HasPrefix(r.json["message_id"].(string), "<") {
				t.Fatalf("send: %d %s", r.status, r.raw)
			}
			expectSentRaw(t, r.json["message_id"].(string))
			r = c.do("POST", "/send/otp", map[string]any{"to": "jane@example.org", "user_name": "홍길동", "code": "482901"}, false)
			if r.status != 200 || r.json["sent"] != true {
				t.Fatalf("send_otp: %d %s", r.status, r.raw)
			}
			// the relay's mail named 15 minutes for codes, in Korean
			wantExpiry := map[bool]string{false: "10 minutes", true: "15분"}[compat]
			if text := parseMail(t, expectSentRaw(t, r.json["message_id"].(string)).Data).Text; !strings.Contains(text, wantExpiry) {
				t.Errorf("OTP mail lacks %q:\n%s", wantExpiry, text)
			}
			tok := secret("relay-token-abc+/=")
			r = c.do("POST", "/send/magic-link", map[string]any{"to": "jane@example.org", "user_name": "홍길동", "token": tok}, false)
			if r.status != 200 || r.json["sent"] != true {
				t.Fatalf("send_magic_link: %d %s", r.status, r.raw)
			}
			m := expectSentRaw(t, r.json["message_id"].(string))
			wantLink := "https://app.example.com/magic-link?token=relay-token-abc%2B%2F%3D"
			if compat {
				wantLink = "https://app.example.com/set-password?token=relay-token-abc%2B%2F%3D"
			}
			secret(wantLink)
			if text := parseMail(t, m.Data).Text; !strings.Contains(text, wantLink) {
				t.Errorf("magic link: want %s in\n%s", wantLink, text)
			}
			// dry run
			r = c.do("POST", "/send/otp", map[string]any{"to": "jane@example.org", "user_name": "a", "code": "1"}, true)
			if r.status != 200 || r.raw != `{"sent":false,"dry_run":true,"message":"Email payload is valid"}`+"\n" {
				t.Fatalf("dry run: %d %s", r.status, r.raw)
			}
			// a wrong key raises HTTPStatusError(401)
			r = relayClient{t: t, key: "wrong-key-0123456789abcdef"}.do("POST", "/send", map[string]any{"to": "a@example.org", "subject": "s", "html_body": "b"}, false)
			want401 := `{"error_code":"unauthorized","message":"a valid API key is required: Authorization: Bearer <key>"}` + "\n"
			if compat {
				want401 = `{"detail":"a valid API key is required: Authorization: Bearer <key>","error_code":"unauthorized","message":"a valid API key is required: Authorization: Bearer <key>"}` + "\n"
			}
			if r.status != 401 || r.raw != want401 {
				t.Fatalf("wrong key: %d %s\nwant %s", r.status, r.raw, want401)
			}
			// a validation error names the field
			r = c.do("POST", "/send/otp", map[string]any{"to": "jane@example.org", "user_name": "a"}, false)
			if r.status != 422 || r.json["field"] != "code" {
				t.Fatalf("validation: %d %s", r.status, r.raw)
			}
			if compat {
				d, _ := r.json["detail"].([]any)
				item, _ := func() (map[string]any, bool) {
					if len(d) != 1 {
						return nil, false
					}
					m, ok := d[0].(map[string]any)
					return m, ok
				}()
				if item == nil || mustJSON(item["loc"]) != `["body","code"]` || item["msg"] != r.json["message"] || item["type"] != "invalid_request" {
					t.Fatalf("validation detail: %s", r.raw)
				}
			} else if _, ok := r.json["detail"]; ok {
				t.Fatalf("detail outside compat: %s", r.raw)
			}
			// 502 recipient_refused -> EmailServiceError("recipient_refused")
			smtpSrv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpErr(550, [3]int{5, 1, 1}, "no such user") }})
			r = c.do("POST", "/send/otp", map[string]any{"to": "nobody@example.org", "user_name": "a", "code": "1"}, false)
			smtpSrv.SetHooks(smtptest.Hooks{})
			if r.status != 502 || r.errorCode != "recipient_refused" || r.json["error_code"] != "recipient_refused" {
				t.Fatalf("refused: %d %s", r.status, r.raw)
			}
			if compat {
				if d, _ := r.json["detail"].(map[string]any); len(d) != 2 || d["message"] != r.json["message"] {
					t.Fatalf("502 detail: %s", r.raw)
				}
			}
			// a webhook without a secret
			r = c.do("POST", "/send/otp", map[string]any{"to": "jane@example.org", "user_name": "a", "code": "1", "webhook_url": sink.srv.URL + "/hook"}, false)
			if !compat {
				if r.status != 422 || r.json["field"] != "webhook_secret" {
					t.Fatalf("unsigned webhook outside compat: %d %s", r.status, r.raw)
				}
			} else {
				id, mid := r.json["id"], r.json["message_id"]
				if r.status != 200 || r.raw != fmt.Sprintf(`{"sent":false,"status":"accepted","id":"%s","message_id":"%s","locale":"ko"}`+"\n", id, mid) {
					t.Fatalf("accepted: %d %s", r.status, r.raw)
				}
				call := sink.next(t)
				if call.header.Get("X-Email-Service-Signature") != "" || call.header.Get("webhook-signature") != "" || call.header.Get("X-Email-Service-Timestamp") == "" {
					t.Fatalf("unsigned webhook headers %v", call.header)
				}
				checkRelayPayload(t, call.body, mid.(string), id.(string), "delivered", nil)
			}
			// a webhook with a secret, verified as the relay's docs say
			r = c.do("POST", "/send", map[string]any{"to": "jane@example.org", "subject": "Hi", "html_body": "<p>x</p>",
				"webhook_url": sink.srv.URL + "/hook", "webhook_secret": hookSecret}, false)
			wantStatus, wantSent := 200, !compat
			if r.status != wantStatus || r.json["sent"] != wantSent {
				t.Fatalf("send with webhook: %d %s", r.status, r.raw)
			}
			if compat && (r.json["status"] != "accepted" || r.json["message"] != "Send queued; final result will be delivered via webhook") {
				t.Fatalf("send with webhook: %s", r.raw)
			}
			call := sink.next(t)
			ts := call.header.Get("X-Email-Service-Timestamp")
			mac := hmac.New(sha256.New, []byte(hookSecret))
			mac.Write([]byte(ts + "."))
			mac.Write(call.body)
			n, _ := strconv.ParseInt(ts, 10, 64)
			if call.header.Get("X-Email-Service-Signature-V2") != "sha256="+hex.EncodeToString(mac.Sum(nil)) || time.Now().Unix()-n > 300 {
				t.Fatalf("relay V2 signature does not verify: %v", call.header)
			}
			if compat {
				checkRelayPayload(t, call.body, r.json["message_id"].(string), r.json["id"].(string), "delivered", nil)
			} else {
				var p map[string]any
				_ = json.Unmarshal(call.body, &p)
				if p["status"] != "sent" || p["refused"] != nil || p["id"] != r.json["id"] {
					t.Fatalf("authmail payload %s", call.body)
				}
			}
			// a webhook of a failed message
			if compat {
				smtpSrv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpErr(550, [3]int{5, 1, 1}, "no such user") }})
				r = c.do("POST", "/send/otp", map[string]any{"to": "nobody@example.org", "user_name": "a", "code": "1", "webhook_url": sink.srv.URL + "/hook"}, false)
				if r.status != 200 || r.json["status"] != "accepted" {
					t.Fatalf("accepted: %d %s", r.status, r.raw)
				}
				code := "recipient_refused"
				checkRelayPayload(t, sink.next(t).body, r.json["message_id"].(string), r.json["id"].(string), "failed", &code)
				smtpSrv.SetHooks(smtptest.Hooks{})
			}
			// path_prefix / passes the app's own paths to the next handler
			if r := call2(t, "GET", "/app/page"); r.status != 200 || r.raw != "next handler" {
				t.Fatalf("app path: %d %s", r.status, r.raw)
			}
		})
	}
}

func call2(t *testing.T, method, path string) response {
	t.Helper()
	return call(t, method, path, nil)
}

// checkRelayPayload checks a webhook body byte for byte against the
// relay's payload.
func checkRelayPayload(t *testing.T, body []byte, messageID, id, status string, code *string) {
	t.Helper()
	var p map[string]any
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatal(err)
	}
	sentAt, _ := p["sent_at"].(string)
	if !sentAtRelay.MatchString(sentAt) {
		t.Fatalf("sent_at %q", sentAt)
	}
	ec := "null"
	if code != nil {
		ec = strconv.Quote(*code)
	}
	want := fmt.Sprintf(`{"message_id":"%s","status":"%s","error_code":%s,"refused":[],"sent_at":"%s","attempts":1,"id":"%s"}`, messageID, status, ec, sentAt, id)
	if string(body) != want {
		t.Fatalf("payload\n%s\nwant\n%s", body, want)
	}
}

// expectSentRaw returns the one message the SMTP server received, with
// the given Message-ID, and forgets it.
func expectSentRaw(t *testing.T, messageID string) *smtptest.Message {
	t.Helper()
	msgs := smtpSrv.Messages()
	if len(msgs) != 1 || headerOf(t, msgs[0].Data, "Message-Id") != messageID {
		t.Fatalf("SMTP server received %d messages, want the one with %s", len(msgs), messageID)
	}
	smtpSrv.ClearMessages()
	return msgs[0]
}

// TestDefaultsASwitchDoesNotTripOver: with the default delivery wait a
// slow SMTP server (9 s to accept the message) gets the client a 202
// queued answer before a 10 s client timeout (authmail-relay's), and the
// message is still sent, once; with the default recipient limit ten OTPs
// to one address within the window go out, and the eleventh is refused.
func TestDefaultsASwitchDoesNotTripOver(t *testing.T) {
	slow := fmt.Sprintf(`smtp 127.0.0.1:%d {
			username mailer
			password {env.AUTHMAIL_IT_SMTP_PASSWORD}
			ca %s
			helo it.example
			timeout 20s
		}`, smtpSrv.Port, smtpSrv.CAFile)
	load(t, config{Delivery: slow, Limits: "auth_failures 1000/1m"})
	t.Run("wait", func(t *testing.T) {
		smtpSrv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { time.Sleep(9 * time.Second); return nil }})
		defer smtpSrv.SetHooks(smtptest.Hooks{})
		c := &http.Client{Timeout: 10 * time.Second}
		req, _ := http.NewRequest("POST", baseURL+"/authmail/send", strings.NewReader(`{"to":"slow@example.org","subject":"s","html_body":"<p>b</p>"}`))
		req.Header.Set("Authorization", "Bearer "+keyApp)
		req.Header.Set("Content-Type", "application/json")
		start := time.Now()
		res, err := c.Do(req)
		if err != nil {
			t.Fatalf("the client gave up: %v", err)
		}
		res.Body.Close()
		if d := time.Since(start); res.StatusCode != http.StatusAccepted || d < 7900*time.Millisecond || d > 9500*time.Millisecond {
			t.Fatalf("%d after %s, want 202 after the 8 s default wait", res.StatusCode, d)
		}
		if got := smtpSrv.WaitMessages(1, 5*time.Second); len(got) != 1 {
			t.Fatalf("%d messages, want the queued one sent once", len(got))
		}
		smtpSrv.ClearMessages()
	})
	t.Run("recipient limit", func(t *testing.T) {
		for i := range 10 {
			r := post(t, "/authmail/send/otp", `{"to":"resend@example.org","code":"1"}`)
			if r.status != 200 {
				t.Fatalf("OTP %d: %d %s", i+1, r.status, r.raw)
			}
		}
		expectRaw := post(t, "/authmail/send/otp", `{"to":"resend@example.org","code":"1"}`)
		if expectRaw.status != 429 || expectRaw.str("error_code") != "recipient_rate_limited" {
			t.Fatalf("11th OTP: %d %s", expectRaw.status, expectRaw.raw)
		}
		smtpSrv.ClearMessages()
	})
}

// TestStartupLogLine: every handler logs one line when its config loads:
// path, transport (SMTP host or capture directory), keys by id and
// storage, and no secret.
func TestStartupLogLine(t *testing.T) {
	dir := t.TempDir()
	before, _ := os.ReadFile(logFile)
	c := config{PathPrefix: "/mail", Delivery: "capture " + dir}
	load(t, c)
	logs, _ := os.ReadFile(logFile)
	var lines []map[string]any
	for _, line := range strings.Split(string(logs[len(before):]), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "authmail handler ready" {
			lines = append(lines, m)
		}
	}
	if len(lines) != 1 {
		t.Fatalf("%d ready lines, want 1", len(lines))
	}
	l := lines[0]
	if l["path_prefix"] != "/mail" || l["transport"] != "capture "+dir || mustJSON(l["keys"]) != `["app","other"]` || l["storage"] != "file_system "+storageFor(t) {
		t.Fatalf("ready line %v", l)
	}
	load(t, config{})
	logs2, _ := os.ReadFile(logFile)
	if !regexp.MustCompile(`"msg":"authmail handler ready","path_prefix":"/authmail","transport":"smtp 127\.0\.0\.1:\d+ \(starttls\)"`).Match(logs2[len(logs):]) {
		t.Fatalf("no ready line for the SMTP handler:\n%s", logs2[len(logs):])
	}
}
