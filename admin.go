package authmail

import (
	"context"
	"fmt"
	"html"
	"net/http"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
)

// adminStatus is the answer of GET /status: the effective configuration
// with every secret left out or masked, and the outbox's figures.
type adminStatus struct {
	Delivery       adminDelivery     `json:"delivery"`
	From           string            `json:"from"`
	FromName       string            `json:"from_name,omitempty"`
	ReplyTo        string            `json:"reply_to,omitempty"`
	AppName        string            `json:"app_name"`
	BaseURL        string            `json:"base_url,omitempty"`
	AllowedOrigins []string          `json:"allowed_origins"`
	LinkPolicy     string            `json:"link_policy"`
	Links          map[string]string `json:"links,omitempty"`
	Flows          []string          `json:"flows"`
	SecurityAlerts map[string]bool   `json:"security_alerts"`
	Keys           []adminKey        `json:"keys"`
	Limits         adminLimits       `json:"limits"`
	Queue          adminQueue        `json:"queue"`
	Settings       map[string]any    `json:"settings"`
	Webhooks       map[string]any    `json:"webhooks"`
	Templates      string            `json:"templates"`
	Privacy        map[string]any    `json:"privacy"`
}

type adminDelivery struct {
	Mode            string `json:"mode"` // smtp or capture
	Host            string `json:"host,omitempty"`
	Port            int    `json:"port,omitempty"`
	TLS             string `json:"tls,omitempty"`
	Username        string `json:"username,omitempty"`
	HELO            string `json:"helo,omitempty"`
	Connections     int    `json:"connections,omitempty"`
	OpenConnections int64  `json:"open_connections"`
	CaptureDir      string `json:"capture_dir,omitempty"`
	// Auth is xoauth2 or oauthbearer with OAuth2 tokens, from
	// TokenSource "refresh_token" (authmail refreshes) or "access_token"
	Auth        string `json:"auth,omitempty"`
	TokenSource string `json:"token_source,omitempty"`
	// Rate is the server's sending rate (the first server's with
	// smtp_servers; each server's own is in Servers)
	Rate *adminRate `json:"rate,omitempty"`
	// Servers lists smtp_servers in priority order with their state;
	// the fields above describe the first
	Servers []adminServer `json:"servers,omitempty"`
}

// adminRate is one SMTP server's sending rate: the configured cap and
// what the throttling replies left of it.
type adminRate struct {
	// Configured is the smtp rate setting ("14/1s"), "off" without one.
	Configured string `json:"configured"`
	// ConfiguredPerSecond and CurrentPerSecond are messages per second;
	// 0 means unlimited. Current is below the configured rate after the
	// server throttled, and climbs back as sends succeed.
	ConfiguredPerSecond float64 `json:"configured_per_second"`
	CurrentPerSecond    float64 `json:"current_per_second"`
	Burst               int     `json:"burst,omitempty"`
	// Share is this instance's fraction of a configured rate: 1 alone,
	// about 1/n of n busy instances sharing the storage.
	Share *float64 `json:"share,omitempty"`
	// Throttles counts the replies that meant "slow down" since the
	// sender started; Decreases how often they lowered the rate.
	Throttles uint64 `json:"throttles"`
	Decreases uint64 `json:"decreases"`
	// PausedUntil is set while a used-up quota stops the server.
	PausedUntil string `json:"paused_until,omitempty"`
}

func rateOf(s *mailer.Sender) *adminRate {
	snap := s.Pacer().Snapshot(time.Now())
	r := &adminRate{Configured: "off", ConfiguredPerSecond: snap.Configured, CurrentPerSecond: snap.Current,
		Throttles: snap.Throttles, Decreases: snap.Decreases}
	if s.Settings().Rate.N > 0 {
		r.Configured, r.Burst = s.Settings().Rate.String(), snap.Burst
		r.Share = &snap.Share
	}
	if !snap.PausedUntil.IsZero() {
		r.PausedUntil = snap.PausedUntil.UTC().Format(time.RFC3339)
	}
	return r
}

type adminKey struct {
	ID    string   `json:"id"`
	Allow []string `json:"allow"`
	Rate  string   `json:"rate"`
}

type adminLimits struct {
	AuthFailures  string            `json:"auth_failures"`
	RecipientRate map[string]string `json:"recipient_rate"`
}

type adminQueue struct {
	Instance         string  `json:"instance"`
	Depth            int     `json:"depth"`
	OldestAgeSeconds float64 `json:"oldest_age_seconds"`
	MaxQueued        int     `json:"max_queued"`
	// AuthReserve is the part of MaxQueued that /send mail may not fill
	// (kept for codes and links); MaxQueuedPerKey bounds one key's
	// unfinished messages (0: no bound).
	AuthReserve     int `json:"auth_reserve"`
	MaxQueuedPerKey int `json:"max_queued_per_key"`
	// InMemory is the number of unfinished messages held in memory; the
	// rest of Depth is parked in storage until its next attempt nears.
	InMemory      int `json:"in_memory"`
	ParkedBatches int `json:"parked_batches"`
	// QueuedByPriority counts the messages in memory waiting for an
	// attempt, by lane: auth (codes, links, alerts), send and bulk.
	QueuedByPriority map[string]int `json:"queued_by_priority"`
}

// maskUser shows enough of a user name to recognise it: "you@gmail.com"
// becomes "you***ail.com". A name without "@" is often a token (Postmark
// uses the server token as user name and password), so it shows only its
// first three characters; short names only their first.
func maskUser(u string) string {
	r := []rune(u)
	switch {
	case len(r) == 0:
		return ""
	case len(r) <= 10:
		return string(r[:1]) + "***"
	case !strings.Contains(u, "@"):
		return string(r[:3]) + "***"
	}
	return string(r[:3]) + "***" + string(r[len(r)-min(7, len(r)-6):])
}

func (h *Handler) serveAdminStatus(w http.ResponseWriter, rc *requestCtx) error {
	st := adminStatus{
		From: h.from.Addr, FromName: h.FromName, AppName: h.appName, BaseURL: h.BaseURL,
		AllowedOrigins: append([]string{}, h.origins...), LinkPolicy: firstNonEmpty(h.LinkPolicy, "off"),
		Links: h.Links, Templates: firstNonEmpty(h.Templates, "built-in"),
		SecurityAlerts: map[string]bool{},
	}
	if len(h.replyTo) > 0 {
		st.ReplyTo = h.replyTo[0].Addr
	}
	for _, e := range endpointsInOrder() {
		if listedFlow(flowNamed(e.flow)) {
			st.Flows = append(st.Flows, e.flow)
		}
	}
	for _, ev := range securityEventNames() {
		st.SecurityAlerts[ev] = h.alertEnabled(ev)
	}
	var servers []adminServer
	smtpTransport := h.transport
	if f, ok := h.transport.(*mailer.Failover); ok {
		list := f.Status()
		for _, v := range list {
			c := v.Sender.Settings()
			state := "up"
			if v.Down {
				state = "down"
			}
			servers = append(servers, adminServer{Host: c.Host, Port: c.Port, Username: maskUser(c.Username), State: state,
				Since: v.Since.UTC().Format(time.RFC3339), LastError: v.LastError, Rate: rateOf(v.Sender)})
		}
		smtpTransport = list[0].Sender
	}
	if h.Capture != "" {
		st.Delivery = adminDelivery{Mode: "capture", CaptureDir: h.Capture}
	} else if s, ok := smtpTransport.(*mailer.Sender); ok {
		c := s.Settings()
		st.Delivery = adminDelivery{Mode: "smtp", Host: c.Host, Port: c.Port, TLS: c.TLSMode, Username: maskUser(c.Username),
			HELO: c.HELO, Connections: c.Connections, OpenConnections: s.OpenConnections(), Rate: rateOf(s)}
		if c.OAuth != nil {
			st.Delivery.Auth, st.Delivery.TokenSource = c.OAuth.Mech, "access_token"
			if c.OAuth.TokenURL != "" {
				st.Delivery.TokenSource = "refresh_token"
			}
		}
		st.Delivery.Servers = servers
	}
	for _, k := range h.keys {
		ak := adminKey{ID: k.id, Rate: k.rate.String()}
		for _, p := range slices.Concat(sendPerms, verifyPerms, adminPerms) {
			if k.allow[p] {
				ak.Allow = append(ak.Allow, p)
			}
		}
		st.Keys = append(st.Keys, ak)
	}
	st.Limits = adminLimits{AuthFailures: h.authFail.String(), RecipientRate: map[string]string{}}
	for flow, r := range h.rcptRates {
		st.Limits.RecipientRate[flow] = r.String()
	}
	depth, age := h.engine.QueueStats()
	cfg := h.dcfg
	inMemory, parked := h.engine.Residency()
	st.Queue = adminQueue{Instance: h.engine.Instance(), Depth: depth, OldestAgeSeconds: age.Seconds(), MaxQueued: cfg.MaxQueued,
		AuthReserve: outbox.AuthReserveOf(cfg), MaxQueuedPerKey: cfg.MaxQueuedPerKey, InMemory: inMemory, ParkedBatches: parked, QueuedByPriority: h.engine.LaneStats()}
	st.Settings = map[string]any{
		"path_prefix": h.prefix, "max_body_size": h.MaxBodySize, "wait": cfg.Wait.String(),
		"retry_backoff": cfg.RetryBackoff.String(), "max_backoff": cfg.MaxBackoff.String(), "max_age": cfg.MaxAge.String(),
		"retention": cfg.Retention.String(), "idempotency_ttl": cfg.IdemTTL.String(), "lease": cfg.Lease.String(),
		"drain_timeout": cfg.Drain.String(), "retry_uncertain": cfg.RetryUncertain,
		"bulk_share": fmt.Sprintf("%g%%", outbox.BulkSharePercent(cfg.BulkShare)),
	}
	st.Webhooks = map[string]any{"secret_configured": cfg.WebhookSecret != "", "allow_hosts": append([]string{}, h.WebhookAllowHosts...)}
	st.Privacy = map[string]any{"log_recipients": h.LogRecipients}
	st.Settings["locale"] = h.locale // the default locale of templated messages
	// issued codes: the settings, never the secret
	st.Settings["codes"] = nil
	if is := h.codes; is != nil {
		st.Settings["codes"] = map[string]any{"issue": is.issue, "length": is.length, "alphabet": is.alphabet}
	}
	// dkim: where the key is published, never the key
	st.Settings["dkim"] = nil
	if k := h.dkim; k != nil {
		st.Settings["dkim"] = map[string]any{"domain": k.domain, "selector": k.selector, "algorithm": k.algorithm(), "record": k.recordName()}
	}
	rc.setStatus("ok", "")
	return writeJSON(w, http.StatusOK, st)
}

func endpointsInOrder() []*endpoint {
	var out []*endpoint
	for _, e := range endpoints {
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b *endpoint) int { return strings.Compare(a.path, b.path) })
	return out
}

// testRequest is the body of POST /test.
type testRequest struct {
	To addressList `json:"to"`
}

type testResponse struct {
	Sent         bool   `json:"sent"`
	Status       string `json:"status"`
	MessageID    string `json:"message_id"`
	SMTPResponse string `json:"smtp_response,omitempty"`
	ErrorCode    string `json:"error_code,omitempty"`
	Message      string `json:"message,omitempty"`
	DurationMS   int64  `json:"duration_ms"`
}

// testMessage is the short message of POST /test and caddy authmail test.
func (h *Handler) testMessage(to mailAddr) *outMessage {
	text := "This is a test message from " + h.appName + ", sent through authmail to check the mail setup.\n\nNo action is needed.\n"
	return &outMessage{flow: "test", to: []mailAddr{to}, replyTo: h.replyTo, subject: h.appName + " test message",
		text: text, html: "<p>" + strings.ReplaceAll(html.EscapeString(text), "\n\n", "</p><p>") + "</p>"}
}

// serveTest sends a short test message synchronously, outside the outbox,
// and reports what the SMTP server answered.
func (h *Handler) serveTest(w http.ResponseWriter, r *http.Request, rc *requestCtx, body []byte, dryRun bool) error {
	var req testRequest
	if aerr := decodeJSON(body, &req); aerr != nil {
		return h.reject(w, rc, aerr)
	}
	to, aerr := req.To.single("to")
	if aerr == nil {
		aerr = h.checkRecipients("to", []mailAddr{to})
	}
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	env, err := h.buildEnvelope(h.testMessage(to), time.Now())
	if err != nil {
		return h.reject(w, rc, &apiError{Status: http.StatusInternalServerError, Code: "internal_error", Message: "the test message could not be rendered"})
	}
	if dryRun {
		// like every endpoint: validated and rendered, nothing sent
		rc.setStatus("dry_run", "")
		return writeJSON(w, http.StatusOK, dryRunResponse{Sent: false, DryRun: true, Message: "Email payload is valid"})
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	d, serr := h.transport.Send(ctx, env)
	resp := testResponse{MessageID: env.MessageID, DurationMS: time.Since(start).Milliseconds()}
	fields := []zap.Field{zap.String("key_id", rc.keyID), zap.String("request_id", rc.requestID), zap.Strings("rcpt", h.logRcpts(env.To))}
	if serr == nil {
		resp.Sent, resp.Status, resp.SMTPResponse = true, d.Status, d.Response
		rc.setStatus(d.Status, "")
		h.logger.Info("test message "+d.Status, fields...)
		return writeJSON(w, http.StatusOK, resp)
	}
	de, _ := serr.(*mailer.Error)
	if de == nil {
		de = &mailer.Error{Code: mailer.CodeSMTPConnection, Phase: mailer.PhaseConnect, Err: serr}
	}
	resp.Status, resp.ErrorCode, resp.Message = "failed", de.Code, de.Error()
	if de.Reply != nil {
		resp.SMTPResponse = de.Reply.String()
	}
	rc.setStatus("failed", de.Code)
	h.logger.Warn("test message failed", append(fields, zap.String("error_code", de.Code))...)
	return writeJSON(w, http.StatusBadGateway, resp)
}

// adminServer is one server of a failover list in /status.
type adminServer struct {
	Host      string `json:"host"`
	Port      int    `json:"port"`
	Username  string `json:"username,omitempty"`
	State     string `json:"state"`
	Since     string `json:"since"`
	LastError string `json:"last_error_code,omitempty"`
	// Rate is the server's sending rate; see adminRate.
	Rate *adminRate `json:"rate,omitempty"`
}
