package authmail

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

type hookCall struct {
	header http.Header
	body   []byte
}

// hookReceiver records webhook calls; status decides the answers.
type hookReceiver struct {
	mu     sync.Mutex
	calls  []hookCall
	status func(n int) int
	srv    *httptest.Server
}

func newHookReceiver(t *testing.T, status func(n int) int) *hookReceiver {
	r := &hookReceiver{status: status}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		b, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		r.calls = append(r.calls, hookCall{req.Header.Clone(), b})
		n := len(r.calls)
		r.mu.Unlock()
		code := r.status(n)
		if code == http.StatusFound {
			w.Header().Set("Location", r.srv.URL+"/elsewhere")
		}
		w.WriteHeader(code)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *hookReceiver) wait(t *testing.T, n int) []hookCall {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.mu.Lock()
		calls := append([]hookCall(nil), r.calls...)
		r.mu.Unlock()
		if len(calls) >= n || time.Now().After(deadline) {
			return calls
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func fastWebhooks(t *testing.T) {
	old := outbox.SetWebhookBackoff(20 * time.Millisecond)
	t.Cleanup(func() { outbox.SetWebhookBackoff(old) })
}

func TestWebhookSignedAndDelivered(t *testing.T) {
	fastWebhooks(t)
	srv := authServer(t, smtptest.StartTLS)
	recv := newHookReceiver(t, func(int) int { return 204 })
	t.Setenv("AUTHMAIL_UNIT_HOOK_SECRET", "configured-secret")
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "{env.AUTHMAIL_UNIT_HOOK_SECRET}"
	})
	body := fmt.Sprintf(`{"to":"jane@example.org","code":"1","webhook_url":%q}`, recv.srv.URL+"/hook")
	rec, out := call(t, h, "POST", "/authmail/send/otp", body)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	calls := recv.wait(t, 1)
	if len(calls) != 1 {
		t.Fatalf("%d webhook calls", len(calls))
	}
	c := calls[0]
	var p map[string]any
	if err := json.Unmarshal(c.body, &p); err != nil {
		t.Fatal(err)
	}
	if p["id"] != out["id"] || p["message_id"] != out["message_id"] || p["status"] != "sent" || p["attempts"] != 1.0 || p["sent_at"] == nil || p["error_code"] != nil {
		t.Fatalf("payload %s", c.body)
	}
	// byte for byte, as the API writes the message id, without escapes
	if want := `,"message_id":"` + out["message_id"].(string) + `",`; !bytes.Contains(c.body, []byte(want)) || bytes.HasSuffix(c.body, []byte("\n")) {
		t.Fatalf("payload %s, want it to contain %s and no trailing newline", c.body, want)
	}
	ts := c.header.Get("webhook-timestamp")
	if c.header.Get("webhook-id") != out["id"] || ts != c.header.Get("X-Email-Service-Timestamp") {
		t.Fatalf("headers %v", c.header)
	}
	if n, _ := strconv.ParseInt(ts, 10, 64); time.Since(time.Unix(n, 0)) > time.Minute {
		t.Fatalf("timestamp %s", ts)
	}
	mac := func(parts ...string) []byte {
		m := hmac.New(sha256.New, []byte("configured-secret"))
		for _, p := range parts {
			m.Write([]byte(p))
		}
		return m.Sum(nil)
	}
	if got, want := c.header.Get("webhook-signature"), "v1,"+base64.StdEncoding.EncodeToString(mac(out["id"].(string)+"."+ts+".", string(c.body))); got != want {
		t.Errorf("webhook-signature %q, want %q", got, want)
	}
	if got, want := c.header.Get("X-Email-Service-Signature"), "sha256="+hex.EncodeToString(mac(string(c.body))); got != want {
		t.Errorf("X-Email-Service-Signature %q, want %q", got, want)
	}
	if got, want := c.header.Get("X-Email-Service-Signature-V2"), "sha256="+hex.EncodeToString(mac(ts+".", string(c.body))); got != want {
		t.Errorf("X-Email-Service-Signature-V2 %q, want %q", got, want)
	}
	st := waitState(t, h, out["id"].(string), func(s outbox.State) bool { return s.Webhook.Status == outbox.HookDelivered })
	if st.Webhook.Secret != "" {
		t.Error("the configured secret was copied into storage")
	}
}

func TestWebhookPerRequestSecretRetriesAndFailures(t *testing.T) {
	fastWebhooks(t)
	srv := authServer(t, smtptest.StartTLS)
	// first answer 500, then a redirect (not followed), then success
	recv := newHookReceiver(t, func(n int) int {
		switch n {
		case 1:
			return 500
		case 2:
			return http.StatusFound
		}
		return 200
	})
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) { h.WebhookAllowHosts = []string{"127.0.0.1"} })
	secret := "whsec_" + base64.StdEncoding.EncodeToString([]byte("raw-key-bytes"))
	body := fmt.Sprintf(`{"to":"bad@example.org","code":"1","webhook_url":%q,"webhook_secret":%q}`, recv.srv.URL, secret)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpRefusal(550) }})
	rec, out := call(t, h, "POST", "/authmail/send/otp", body)
	if rec.Code != 502 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	calls := recv.wait(t, 3)
	if len(calls) != 3 {
		t.Fatalf("%d webhook calls, want 3 (500, 302 not followed, 200)", len(calls))
	}
	for _, c := range calls {
		if c.header.Get("X-Forwarded-For") != "" {
			t.Error("unexpected proxy header")
		}
	}
	var p map[string]any
	_ = json.Unmarshal(calls[2].body, &p)
	if p["status"] != "failed" || p["error_code"] != "recipient_refused" || p["sent_at"] != nil {
		t.Fatalf("payload %s", calls[2].body)
	}
	// relay signatures use the secret as given, whsec_ and all
	m := hmac.New(sha256.New, []byte(secret))
	m.Write(calls[2].body)
	if got := calls[2].header.Get("X-Email-Service-Signature"); got != "sha256="+hex.EncodeToString(m.Sum(nil)) {
		t.Errorf("relay signature with a whsec_ secret: %s", got)
	}
	if err := verifyStandardWebhook(secret, false, calls[2].header, calls[2].body, time.Now()); err != nil {
		t.Errorf("Standard Webhooks signature with a whsec_ secret: %v", err)
	}
	st := waitState(t, h, out["id"].(string), func(s outbox.State) bool { return s.Webhook.Status == outbox.HookDelivered })
	if st.Webhook.Attempts != 3 {
		t.Errorf("webhook attempts %d", st.Webhook.Attempts)
	}
	time.Sleep(100 * time.Millisecond)
	recv.mu.Lock()
	defer recv.mu.Unlock()
	if len(recv.calls) != 3 {
		t.Errorf("%d webhook calls: the redirect was followed, or delivered twice", len(recv.calls))
	}
}

func TestWebhookRefusesPrivateAddresses(t *testing.T) {
	fastWebhooks(t)
	srv := authServer(t, smtptest.StartTLS)
	recv := newHookReceiver(t, func(int) int { return 200 })
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) { h.WebhookSecret = "s" })
	// an IP literal is refused when the request arrives
	for _, u := range []string{recv.srv.URL, "http://10.0.0.1/x", "http://169.254.169.254/latest", "http://[::1]:80/", "http://[::ffff:127.0.0.1]/", "http://100.64.0.1/",
		"http://[::7f00:1]/", "http://[::a00:1]/", "http://[64:ff9b:1::7f00:1]/", "http://[2002:7f00:1::1]/", "http://192.0.2.1/", "http://198.51.100.1/", "http://203.0.113.1/"} {
		rec, out := call(t, h, "POST", "/authmail/send/otp", fmt.Sprintf(`{"to":"a@example.org","code":"1","webhook_url":%q}`, u))
		if rec.Code != 422 || out["field"] != "webhook_url" {
			t.Errorf("%s: %d %s", u, rec.Code, rec.Body)
		}
	}
	for _, bad := range []string{"ftp://example.com/", "https://user:pw@example.com/", "not a url"} {
		if rec, _ := call(t, h, "POST", "/authmail/send/otp", fmt.Sprintf(`{"to":"a@example.org","code":"1","webhook_url":%q}`, bad)); rec.Code != 422 {
			t.Errorf("%s: %d", bad, rec.Code)
		}
	}
	// a host name that resolves to loopback passes the request check but
	// is refused when connecting
	_, port, _ := netipPort(recv.srv.URL)
	rec, out := call(t, h, "POST", "/authmail/send/otp", fmt.Sprintf(`{"to":"a@example.org","code":"1","webhook_url":"http://localhost:%d/hook/CAPABILITY-PATH?token=CAPABILITY-TOKEN"}`, port))
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	st := waitState(t, h, out["id"].(string), func(s outbox.State) bool { return s.Webhook.Status == outbox.HookFailed })
	if st.Webhook.Attempts != 1 {
		t.Errorf("a blocked webhook is not retried: %+v", st.Webhook)
	}
	// the recorded error names the host, never the URL's path or query
	// (which often carry a token); the log line is the same text
	if e := st.Webhook.LastError; strings.Contains(e, "CAPABILITY") || !strings.Contains(e, fmt.Sprintf("localhost:%d", port)) {
		t.Errorf("webhook error %q", e)
	}
	if calls := recv.wait(t, 0); len(calls) != 0 {
		t.Fatal("the webhook reached a loopback address")
	}
	// no secret anywhere: refused, since the webhook could not be signed
	h2 := newInstance(t, "").handler(withSMTP(t, srv))
	if rec, out := call(t, h2, "POST", "/authmail/send/otp", `{"to":"a@example.org","code":"1","webhook_url":"https://hooks.example.com/x"}`); rec.Code != 422 || out["field"] != "webhook_secret" {
		t.Fatalf("unsigned webhook: %d %s", rec.Code, rec.Body)
	}
}

// TestWebhookDialRefusesReservedAddresses: the check when connecting
// (after DNS) is outbox.BlockedIP too, and a webhook_url with such an IP
// literal is refused when the request arrives.
func TestWebhookDialRefusesReservedAddresses(t *testing.T) {
	client := outbox.WebhookClient(nil, 2*time.Second)
	_, v6err := net.ListenPacket("udp6", "[::1]:0")
	for _, host := range []string{"192.0.2.1", "198.51.100.1", "203.0.113.1", "127.0.0.1", "[::7f00:1]", "[::a00:1]", "[64:ff9b:1::7f00:1]", "[2002:7f00:1::1]", "[64:ff9b::a00:1]"} {
		u := "http://" + host + ":9/hook"
		if aerr := checkWebhookURL(u, nil); aerr == nil || aerr.Status != 422 || aerr.Field != "webhook_url" {
			t.Errorf("request check of %s: %+v", u, aerr)
		}
		if strings.HasPrefix(host, "[") && v6err != nil {
			continue // no IPv6 sockets here: the dial fails before the check
		}
		res, err := client.Post(u, "application/json", strings.NewReader("{}"))
		if err == nil {
			res.Body.Close()
		}
		if !errors.Is(err, outbox.ErrWebhookBlocked) {
			t.Errorf("dial %s: %v, want the block error", u, err)
		}
	}
}

func netipPort(u string) (string, int, error) {
	ap, err := netip.ParseAddrPort(u[len("http://"):])
	return ap.Addr().String(), int(ap.Port()), err
}

// TestWebhookSettingsStayWithTheirSite: two sites share a storage (one
// outbox) and send through different routes with different webhook
// secrets; each site's webhooks are signed with its own secret, whichever
// site was loaded last.
func TestWebhookSettingsStayWithTheirSite(t *testing.T) {
	fastWebhooks(t)
	recv := newHookReceiver(t, func(int) int { return 204 })
	in := newInstance(t, "")
	site := func(secret string) *Handler {
		return in.handler(func(h *Handler) {
			h.WebhookAllowHosts = []string{"127.0.0.1"}
			h.WebhookSecret = secret
		})
	}
	a, b := site("secret-of-site-a-0123"), site("secret-of-site-b-0123")
	for _, c := range []struct {
		h      *Handler
		secret string
	}{{a, "secret-of-site-a-0123"}, {b, "secret-of-site-b-0123"}} {
		recv.mu.Lock()
		recv.calls = nil
		recv.mu.Unlock()
		body := fmt.Sprintf(`{"to":"jane@example.org","code":"1","webhook_url":%q}`, recv.srv.URL+"/hook")
		if rec, _ := call(t, c.h, "POST", "/authmail/send/otp", body); rec.Code != 200 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		calls := recv.wait(t, 1)
		if len(calls) != 1 {
			t.Fatalf("%d webhook calls", len(calls))
		}
		m := hmac.New(sha256.New, []byte(c.secret))
		m.Write(calls[0].body)
		if got := calls[0].header.Get("X-Email-Service-Signature"); got != "sha256="+hex.EncodeToString(m.Sum(nil)) {
			t.Errorf("webhook of the site with %q signed with another secret", c.secret)
		}
	}
}

// TestQueueFiguresAndWebhookMetric: the queue depth and the age of the
// oldest unfinished message follow the outbox (a message in an attempt
// counts), and webhook deliveries are counted by result.
func TestQueueFiguresAndWebhookMetric(t *testing.T) {
	fastWebhooks(t)
	srv := authServer(t, smtptest.StartTLS)
	recv := newHookReceiver(t, func(int) int { return 204 })
	h := newInstance(t, "").handler(withSMTP(t, srv), func(h *Handler) {
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "metric-hook-secret-0123"
	})
	delivered := func() float64 {
		var m dto.Metric
		if err := mWebhooks.WithLabelValues("delivered").Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetCounter().GetValue()
	}
	before := delivered()
	// the server holds every message in DATA until released
	release := make(chan struct{})
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { <-release; return nil }})
	body := fmt.Sprintf(`{"to":"jane@example.org","code":"1","webhook_url":%q}`, recv.srv.URL+"/hook")
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", body, "Prefer: respond-async"); rec.Code != 202 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	time.Sleep(150 * time.Millisecond)
	depth, age := h.engine.QueueStats()
	if depth != 1 || age < 100*time.Millisecond {
		t.Errorf("while the attempt hangs: depth %d, oldest age %s", depth, age)
	}
	close(release)
	if calls := recv.wait(t, 1); len(calls) != 1 {
		t.Fatalf("%d webhook calls", len(calls))
	}
	deadline := time.Now().Add(5 * time.Second)
	for delivered() < before+1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := delivered() - before; got != 1 {
		t.Errorf("webhooks_total{result=delivered} grew by %v, want 1", got)
	}
	if depth, age := h.engine.QueueStats(); depth != 0 || age != 0 {
		t.Errorf("after delivery: depth %d, oldest age %s", depth, age)
	}
}

// TestWhsecSecretsMustBeBase64: a Standard Webhooks secret ("whsec_"
// followed by base64) that does not decode would make every signature
// fail verification; it is refused in the request and in the config.
func TestWhsecSecretsMustBeBase64(t *testing.T) {
	h := newInstance(t, "").handler(func(h *Handler) { h.WebhookAllowHosts = []string{"hooks.example.com"} })
	rec, out := call(t, h, "POST", "/authmail/send/otp", `{"to":"a@example.org","code":"1","webhook_url":"https://hooks.example.com/x","webhook_secret":"whsec_not*base64!"}`)
	if rec.Code != 422 || out["field"] != "webhook_secret" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	bad := &Handler{Capture: t.TempDir(), From: "no-reply@example.com", Keys: []Key{{ID: "app", Secret: "0123456789abcdef0123"}},
		WebhookSecret: "whsec_%%%", storageOverride: &certmagic.FileStorage{Path: t.TempDir()}}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := bad.Provision(ctx); err == nil || !strings.Contains(err.Error(), "webhook_secret") {
		t.Errorf("provision with an invalid whsec_ secret: %v", err)
	}
	_ = bad.Cleanup()
	if k, err := outbox.WebhookKey("whsec_" + base64.StdEncoding.EncodeToString([]byte("key"))); err != nil || string(k) != "key" {
		t.Errorf("valid whsec_: %q %v", k, err)
	}
}

// hangingReceiver accepts connections, reads them and never answers; it
// counts the connections it got. Its connections close at the end of the
// test.
func hangingReceiver(t *testing.T) (string, *atomic.Int32) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns atomic.Int32
	var mu sync.Mutex
	var open []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			go func() { _, _ = io.Copy(io.Discard, c) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range open {
			c.Close()
		}
	})
	return "http://" + ln.Addr().String() + "/hook", &conns
}

// TestWebhookToAHangingHostDelaysNoOtherHost: fifty webhooks go to a
// receiver that accepts and never answers (each post waits the whole
// 10 s timeout); a webhook to a healthy receiver arrives at once
// all the same, and the hanging host never gets more than
// outbox.WebhookPerHost posts at a time.
func TestWebhookToAHangingHostDelaysNoOtherHost(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	recv := newHookReceiver(t, func(int) int { return 204 })
	h := newInstance(t, "").handler(withSMTP(t, srv), withoutLimits, func(h *Handler) {
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "fairness-hook-secret-0123"
	})
	// registered after the handler, so that it runs before the engine
	// stops: the posts in flight fail at once instead of timing out
	hanging, conns := hangingReceiver(t)
	if h.engine.Tunables().HookTimeout < 10*time.Second {
		t.Fatalf("webhook timeout %s; the test needs posts that hang for long", h.engine.Tunables().HookTimeout)
	}
	ids := make([]string, 50)
	for i := range ids {
		body := fmt.Sprintf(`{"to":"hang%d@example.org","code":"1","webhook_url":%q}`, i, hanging)
		rec, out := call(t, h, "POST", "/authmail/send/otp", body, "Prefer: respond-async")
		if rec.Code != 202 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		ids[i] = out["id"].(string)
	}
	for _, id := range ids {
		waitState(t, h, id, status(outbox.Sent))
	}
	// the hanging host holds its posts
	deadline := time.Now().Add(5 * time.Second)
	for conns.Load() < outbox.WebhookPerHost && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	body := fmt.Sprintf(`{"to":"healthy@example.org","code":"1","webhook_url":%q}`, recv.srv.URL+"/hook")
	rec, out := call(t, h, "POST", "/authmail/send/otp", body)
	if rec.Code != 200 || out["status"] != "sent" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	final := time.Now()
	calls := recv.wait(t, 1)
	if len(calls) != 1 {
		t.Fatalf("%d calls to the healthy receiver", len(calls))
	}
	if d := time.Since(final); d > 2*time.Second {
		t.Errorf("the healthy webhook arrived %s after its message was sent, behind the hanging host's", d)
	}
	var p map[string]any
	if err := json.Unmarshal(calls[0].body, &p); err != nil || p["id"] != out["id"] {
		t.Fatalf("payload %s", calls[0].body)
	}
	// more webhooks than slots to the healthy host: each freed slot
	// takes the next
	for i := range 3 * outbox.WebhookPerHost {
		body := fmt.Sprintf(`{"to":"healthy%d@example.org","code":"1","webhook_url":%q}`, i, recv.srv.URL+"/hook")
		if rec, _ := call(t, h, "POST", "/authmail/send/otp", body, "Prefer: respond-async"); rec.Code != 202 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
	}
	if calls := recv.wait(t, 1+3*outbox.WebhookPerHost); len(calls) != 1+3*outbox.WebhookPerHost {
		t.Fatalf("%d calls to the healthy receiver, want %d", len(calls), 1+3*outbox.WebhookPerHost)
	}
	if n := conns.Load(); n != outbox.WebhookPerHost {
		t.Errorf("the hanging host got %d connections at once, want %d", n, outbox.WebhookPerHost)
	}
}

// TestWebhooksOfOneKeyHoldAtMostItsShare: a key that spreads its webhooks
// over many receivers that never answer (here twenty ports, two webhooks
// each) has at most outbox.WebhookPerTenant posts in flight, so it cannot take
// every slot; another key's webhook goes out at once.
func TestWebhooksOfOneKeyHoldAtMostItsShare(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	recv := newHookReceiver(t, func(int) int { return 204 })
	const otherKey = "other-key-of-this-site-0123"
	h := newInstance(t, "").handler(withSMTP(t, srv), withoutLimits, func(h *Handler) {
		h.WebhookAllowHosts = []string{"127.0.0.1"}
		h.WebhookSecret = "share-hook-secret-0123"
		h.Keys = append(h.Keys, Key{ID: "other", Secret: otherKey})
	})
	var all []*atomic.Int32
	var ids []string
	for r := range 20 {
		url, conns := hangingReceiver(t)
		all = append(all, conns)
		for i := range 2 {
			body := fmt.Sprintf(`{"to":"hang%d-%d@example.org","code":"1","webhook_url":%q}`, r, i, url)
			rec, out := call(t, h, "POST", "/authmail/send/otp", body, "Prefer: respond-async")
			if rec.Code != 202 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			ids = append(ids, out["id"].(string))
		}
	}
	for _, id := range ids {
		waitState(t, h, id, status(outbox.Sent))
	}
	total := func() int {
		n := 0
		for _, c := range all {
			n += int(c.Load())
		}
		return n
	}
	deadline := time.Now().Add(5 * time.Second)
	for total() < outbox.WebhookPerTenant && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	body := fmt.Sprintf(`{"to":"healthy@example.org","code":"1","webhook_url":%q}`, recv.srv.URL+"/hook")
	rec, _ := call(t, h, "POST", "/authmail/send/otp", body, "Authorization: Bearer "+otherKey)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	final := time.Now()
	if calls := recv.wait(t, 1); len(calls) != 1 {
		t.Fatalf("%d calls to the healthy receiver", len(calls))
	}
	if d := time.Since(final); d > 2*time.Second {
		t.Errorf("the other key's webhook arrived %s after its message was sent", d)
	}
	if n := total(); n != outbox.WebhookPerTenant {
		t.Errorf("the key's hanging receivers got %d connections at once, want %d", n, outbox.WebhookPerTenant)
	}
}

// verifyStandardWebhook verifies a webhook as the Standard Webhooks
// specification and its reference libraries do, written here from the
// spec rather than from signWebhook: the key is the base64 after an
// optional "whsec_" prefix (raw: the secret's bytes, the libraries' raw
// mode, NewWebhookRaw / {format: "raw"}), the signed content is
// "webhook-id.webhook-timestamp.body", the timestamp must be within five
// minutes, and webhook-signature is a space-separated list of
// "v1,<base64>" of which one must match.
func verifyStandardWebhook(secret string, raw bool, h http.Header, body []byte, now time.Time) error {
	var key []byte
	if raw {
		key = []byte(secret)
	} else {
		var err error
		if key, err = base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_")); err != nil {
			return fmt.Errorf("secret is not base64: %v", err)
		}
	}
	id, ts, sigs := h.Get("webhook-id"), h.Get("webhook-timestamp"), h.Get("webhook-signature")
	if id == "" || ts == "" || sigs == "" {
		return errors.New("missing required headers")
	}
	n, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return errors.New("invalid timestamp")
	}
	if d := now.Sub(time.Unix(n, 0)); d > 5*time.Minute || d < -5*time.Minute {
		return errors.New("timestamp outside the tolerance")
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte(id + "." + ts + "."))
	m.Write(body)
	want := m.Sum(nil)
	for _, s := range strings.Split(sigs, " ") {
		version, sig, ok := strings.Cut(s, ",")
		if !ok || version != "v1" {
			continue
		}
		got, err := base64.StdEncoding.DecodeString(sig)
		if err == nil && hmac.Equal(got, want) {
			return nil
		}
	}
	return errors.New("no matching signature")
}

// verifyRelayWebhook verifies a webhook as authmail-relay's webhook
// documentation tells receivers to: V2 over "timestamp.body" with
// hmac.new(SECRET.encode(), …) and a five-minute window, and the legacy
// V1 over the body.
func verifyRelayWebhook(secret string, h http.Header, body []byte, now time.Time) error {
	ts := h.Get("X-Email-Service-Timestamp")
	n, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return errors.New("invalid timestamp")
	}
	if d := now.Unix() - n; d > 300 || d < -300 {
		return errors.New("stale webhook timestamp")
	}
	v2 := hmac.New(sha256.New, []byte(secret))
	v2.Write([]byte(ts + "."))
	v2.Write(body)
	if !hmac.Equal([]byte(h.Get("X-Email-Service-Signature-V2")), []byte("sha256="+hex.EncodeToString(v2.Sum(nil)))) {
		return errors.New("bad V2 signature")
	}
	v1 := hmac.New(sha256.New, []byte(secret))
	v1.Write(body)
	if !hmac.Equal([]byte(h.Get("X-Email-Service-Signature")), []byte("sha256="+hex.EncodeToString(v1.Sum(nil)))) {
		return errors.New("bad V1 signature")
	}
	return nil
}

// TestOneSecretServesBothReceivers: with a whsec_ secret, a Standard
// Webhooks receiver (default key handling) and an authmail-relay receiver
// (the secret as written) both verify the same webhook; with a plain
// (hex) secret the relay receiver verifies it as is and a Standard
// Webhooks receiver in its libraries' raw mode, while the default mode,
// which base64-decodes the hex, does not (as docs/api.md says).
func TestOneSecretServesBothReceivers(t *testing.T) {
	body := []byte(`{"id":"x","message_id":"<a@example.com>","status":"sent","attempts":1}`)
	now := time.Now()
	whsec := "whsec_" + base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))
	hexSecret := "5f4dcc3b5aa765d61d8327deb882cf995f4dcc3b5aa765d61d8327deb882cf99"
	for _, c := range []struct {
		secret           string
		standard, stdRaw bool
	}{
		{whsec, true, false},
		{hexSecret, false, true},
	} {
		h := http.Header{}
		outbox.SignWebhook(h, c.secret, "06gzsmsg", now.Unix(), body)
		if err := verifyRelayWebhook(c.secret, h, body, now); err != nil {
			t.Errorf("%s: relay receiver: %v", c.secret[:8], err)
		}
		err := verifyStandardWebhook(c.secret, false, h, body, now)
		if c.standard != (err == nil) {
			t.Errorf("%s: Standard Webhooks receiver, default key handling: %v", c.secret[:8], err)
		}
		err = verifyStandardWebhook(c.secret, true, h, body, now)
		if c.stdRaw != (err == nil) {
			t.Errorf("%s: Standard Webhooks receiver, raw key: %v", c.secret[:8], err)
		}
		// a stale timestamp is refused by both
		if verifyRelayWebhook(c.secret, h, body, now.Add(10*time.Minute)) == nil ||
			verifyStandardWebhook(c.secret, !c.standard, h, body, now.Add(10*time.Minute)) == nil {
			t.Errorf("%s: a stale webhook verified", c.secret[:8])
		}
	}
}
