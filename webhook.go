package authmail

import (
	"bytes"
	"container/heap"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Webhook delivery states.
const (
	hookPending   = "pending"
	hookDelivered = "delivered"
	hookFailed    = "failed"
)

// Tunables that are not part of the public config. Tests shorten them.
var (
	webhookTimeout = 10 * time.Second
	webhookBackoff = 10 * time.Second
	webhookMaxWait = 10 * time.Minute
	webhookMaxAge  = 24 * time.Hour
)

// webhookState is the durable state of a message's final-state webhook;
// the zero value means none was asked for.
type webhookState struct {
	URL string `json:"url"`
	// Secret is the per-request secret, when the request gave one; the
	// configured webhook_secret is never copied to storage.
	Secret    string    `json:"secret,omitempty"`
	Status    string    `json:"status,omitempty"`
	Attempts  int       `json:"attempts,omitempty"`
	NextAt    time.Time `json:"next_at,omitzero"`
	LastError string    `json:"last_error,omitempty"`
}

// webhookPayload is the JSON body POSTed when a message is final.
type webhookPayload struct {
	ID        string `json:"id"`
	MessageID string `json:"message_id"`
	Status    string `json:"status"`
	ErrorCode string `json:"error_code,omitempty"`
	Attempts  int    `json:"attempts"`
	SentAt    string `json:"sent_at,omitempty"`
}

// checkWebhookURL validates a caller's webhook_url.
func checkWebhookURL(raw string, allow []string) *apiError {
	u, p := parseHTTPURL(raw)
	if p != "" {
		return invalid("webhook_url", "%s", p)
	}
	host := strings.ToLower(u.Hostname())
	if hostAllowed(host, allow) {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && blockedIP(ip) {
		return &apiError{Status: http.StatusUnprocessableEntity, Code: "invalid_request", Field: "webhook_url",
			Message: "webhook_url points to a loopback, private, link-local or metadata address; list the host in webhook_allow_hosts to allow it"}
	}
	return nil
}

func hostAllowed(host string, allow []string) bool {
	host = strings.TrimSuffix(strings.ToLower(strings.Trim(host, "[]")), ".")
	return slices.ContainsFunc(allow, func(a string) bool { return strings.EqualFold(strings.Trim(a, "[]"), host) })
}

// blockedIP reports whether webhooks may not reach ip: loopback, private,
// link-local (which includes cloud metadata at 169.254.169.254),
// unspecified, multicast, carrier-grade NAT and other reserved ranges.
func blockedIP(ip netip.Addr) bool {
	ip = ip.Unmap()
	if ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() ||
		ip.IsInterfaceLocalMulticast() || ip.IsMulticast() || ip.IsUnspecified() {
		return true
	}
	for _, p := range blockedPrefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

var blockedPrefixes = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("240.0.0.0/4"),
	netip.MustParsePrefix("64:ff9b::/96"),
	netip.MustParsePrefix("2001:db8::/32"),
}

var errWebhookBlocked = errors.New("the webhook address is loopback, private, link-local or metadata, and its host is not in webhook_allow_hosts")

// webhookClient returns an HTTP client that never follows redirects and
// checks every address it connects to, after DNS resolution, unless the
// URL's host is allowed.
func webhookClient(allow []string, timeout time.Duration) *http.Client {
	dialer := &net.Dialer{Timeout: timeout}
	safe := &net.Dialer{Timeout: timeout, Control: func(network, address string, _ syscall.RawConn) error {
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return err
		}
		ip, err := netip.ParseAddr(host)
		if err != nil || blockedIP(ip) {
			return errWebhookBlocked
		}
		return nil
	}}
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			if hostAllowed(host, allow) {
				return dialer.DialContext(ctx, network, addr)
			}
			return safe.DialContext(ctx, network, addr)
		},
		TLSHandshakeTimeout:   timeout,
		ResponseHeaderTimeout: timeout,
		MaxIdleConnsPerHost:   4,
		IdleConnTimeout:       30 * time.Second,
	}
	return &http.Client{
		Transport:     tr,
		Timeout:       timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// signWebhook sets the signature headers: Standard Webhooks
// (webhook-id, webhook-timestamp, webhook-signature "v1,<base64>") and
// authmail-relay's (X-Email-Service-Timestamp, X-Email-Service-Signature
// "sha256=<hex>" over the body, -V2 over "timestamp.body"). A secret that
// starts with "whsec_" is base64 after the prefix, as Standard Webhooks
// secrets are; any other secret is used as is.
func signWebhook(h http.Header, secret, msgID string, ts int64, body []byte) {
	key, err := webhookKey(secret)
	if err != nil {
		key = []byte(secret) // refused when configured or requested; kept for old records
	}
	tsStr := strconv.FormatInt(ts, 10)
	mac := func(parts ...[]byte) []byte {
		m := hmac.New(sha256.New, key)
		for _, p := range parts {
			m.Write(p)
		}
		return m.Sum(nil)
	}
	h.Set("webhook-id", msgID)
	h.Set("webhook-timestamp", tsStr)
	h.Set("webhook-signature", "v1,"+base64.StdEncoding.EncodeToString(mac([]byte(msgID+"."+tsStr+"."), body)))
	h.Set("X-Email-Service-Timestamp", tsStr)
	h.Set("X-Email-Service-Signature", "sha256="+hex.EncodeToString(mac(body)))
	h.Set("X-Email-Service-Signature-V2", "sha256="+hex.EncodeToString(mac([]byte(tsStr+"."), body)))
}

// webhookKey returns the HMAC key of a webhook secret: the base64 after
// "whsec_" for a Standard Webhooks secret, else the secret's bytes. A
// "whsec_" secret that is not valid base64 is an error, since every
// signature made with it would fail verification.
func webhookKey(secret string) ([]byte, error) {
	rest, ok := strings.CutPrefix(secret, "whsec_")
	if !ok {
		return []byte(secret), nil
	}
	key, err := base64.StdEncoding.DecodeString(rest)
	if err != nil || len(key) == 0 {
		return nil, errors.New("must be base64 after whsec_ (a Standard Webhooks secret)")
	}
	return key, nil
}

// webhookWorker delivers due webhooks.
func (e *engine) webhookWorker() {
	// one client per allow list, so that sites with different lists keep
	// their connections alive
	clients := map[string]*http.Client{}
	for {
		en := e.nextHook()
		if en == nil {
			return
		}
		cfg := e.hookConfigFor(en)
		key := strings.Join(cfg.webhookAllow, ",")
		client := clients[key]
		if client == nil {
			client = webhookClient(cfg.webhookAllow, e.tun.hookTimeout)
			clients[key] = client
		}
		e.deliverHook(client, cfg, en)
	}
}

// hookConfigFor returns the settings that sign and route a message's
// webhook (webhook_secret, webhook_allow_hosts): those of the handler
// that sends it (regForLocked), so that two sites sharing a storage keep
// their own secrets; else the engine's last settings.
func (e *engine) hookConfigFor(en *entry) *engineConfig {
	e.mu.Lock()
	defer e.mu.Unlock()
	if r := e.regForLocked(en.st.Profile); r != nil {
		return r.cfg
	}
	return e.config()
}

func (e *engine) nextHook() *entry {
	for {
		e.mu.Lock()
		if e.closing {
			e.mu.Unlock()
			return nil
		}
		wait := time.Duration(-1)
		if e.hooks.Len() > 0 {
			top := e.hooks[0]
			if d := time.Until(top.st.Webhook.NextAt); d <= 0 {
				heap.Pop(&e.hooks)
				e.attempts.Add(1)
				e.mu.Unlock()
				return top
			} else {
				wait = d
			}
		}
		wake := e.wakeCh
		e.mu.Unlock()
		if wait < 0 {
			wait = time.Hour
		}
		t := time.NewTimer(wait)
		select {
		case <-wake:
		case <-t.C:
		case <-e.stopCh:
			t.Stop()
			return nil
		}
		t.Stop()
	}
}

func (e *engine) deliverHook(client *http.Client, cfg *engineConfig, en *entry) {
	defer e.attempts.Done()
	e.mu.Lock()
	st := en.st
	hook := st.Webhook
	e.mu.Unlock()
	secret := hook.Secret
	if secret == "" {
		secret = cfg.webhookSecret
	}
	p := webhookPayload{ID: st.ID, MessageID: st.MessageID, Status: st.Status, Attempts: st.Attempts}
	if st.Status != stSent {
		p.ErrorCode = st.LastCode
	}
	if !st.SentAt.IsZero() {
		p.SentAt = st.SentAt.UTC().Format(time.RFC3339)
	}
	// the same encoding as the API's answers ("<…@example.com>", not
	// "\u003c…"), without the trailing newline
	body := bytes.TrimSuffix(marshalJSON(p), []byte("\n"))
	err := e.postHook(client, hook.URL, secret, st.ID, body)
	now := time.Now()
	e.mu.Lock()
	w := &en.st.Webhook
	w.Attempts++
	done := false
	switch {
	case err == nil:
		w.Status, w.LastError, done = hookDelivered, "", true
	case errors.Is(err, errWebhookBlocked) || now.Sub(st.Updated) > e.tun.hookMaxAge:
		w.Status, w.LastError, done = hookFailed, errText(err), true
	default:
		d := e.tun.hookBackoff
		for i := 1; i < w.Attempts && d < e.tun.hookMaxWait; i++ {
			d *= 2
		}
		w.NextAt, w.LastError = now.Add(min(d, e.tun.hookMaxWait)), errText(err)
	}
	if !done {
		heap.Push(&e.hooks, en)
	}
	e.markDirtyLocked(en.b, func(error) {
		if done {
			e.mu.Lock()
			e.closeEntryLocked(en)
			e.mu.Unlock()
		}
	}, false)
	e.mu.Unlock()
	result := w.Status
	if !done {
		result = "retry"
	}
	metricWebhook(result)
	fields := []zap.Field{zap.String("id", st.ID), zap.String("result", result), zap.Int("webhook_attempts", w.Attempts)}
	if err != nil {
		e.log().Warn("webhook delivery failed", append(fields, zap.String("error", errText(err)))...)
	} else {
		e.log().Info("webhook delivered", fields...)
	}
}

// postHook sends one webhook request; any answer but 2xx is an error.
func (e *engine) postHook(client *http.Client, target, secret, id string, body []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), e.tun.hookTimeout)
	defer cancel()
	// errors name the host only: the text of Go's *url.Error quotes the
	// whole URL, and a webhook URL's path or query often carries a token
	host := "the webhook"
	if u, err := url.Parse(target); err == nil && u.Host != "" {
		host = u.Host
	}
	withoutURL := func(err error) error {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err
		}
		return fmt.Errorf("posting to %s: %w", host, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		return withoutURL(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "authmail-webhook")
	if secret != "" {
		signWebhook(req.Header, secret, id, time.Now().Unix(), body)
	}
	res, err := client.Do(req)
	if err != nil {
		return withoutURL(err)
	}
	defer res.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
	if res.StatusCode < 200 || res.StatusCode > 299 {
		return fmt.Errorf("webhook answered %d", res.StatusCode)
	}
	return nil
}

// hookHeap orders pending webhooks by next attempt time.
type hookHeap []*entry

func (h hookHeap) Len() int { return len(h) }
func (h hookHeap) Less(i, j int) bool {
	return h[i].st.Webhook.NextAt.Before(h[j].st.Webhook.NextAt)
}
func (h hookHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].hookIdx, h[j].hookIdx = i, j
}
func (h *hookHeap) Push(x any) {
	en := x.(*entry)
	en.hookIdx = len(*h)
	*h = append(*h, en)
}
func (h *hookHeap) Pop() any {
	old := *h
	en := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	en.hookIdx = -1
	return en
}
