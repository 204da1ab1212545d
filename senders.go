package authmail

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// failoverPool holds one failover transport per list of senders, so that
// the servers' health survives config reloads like the senders do.
var failoverPool = caddy.NewUsagePool()

// failoverKey names the transport of a list of sender pool keys.
func failoverKey(keys []string) string {
	h := sha256.New()
	for _, k := range keys {
		fmt.Fprintf(h, "%d:%s|", len(k), k)
	}
	return "authmail.failover." + hex.EncodeToString(h.Sum(nil))
}

// route names the list for the sender profile: the servers' routes in
// order.
func failoverRoute(settings []mailer.SMTPSettings) string {
	var rs []string
	for i := range settings {
		rs = append(rs, settings[i].Route())
	}
	return "failover " + strings.Join(rs, " | ")
}

// checkSMTPServers validates smtp_servers.
func (h *Handler) checkSMTPServers() error {
	if h.SMTP != nil {
		return errors.New("smtp and smtp_servers are mutually exclusive; list every server in smtp_servers, in priority order")
	}
	if h.Capture != "" {
		return errors.New("smtp_servers and capture are mutually exclusive; configure exactly one")
	}
	if len(h.SMTPServers) > 10 {
		return fmt.Errorf("smtp_servers: at most 10 servers, not %d", len(h.SMTPServers))
	}
	for i := range h.SMTPServers {
		if err := h.SMTPServers[i].check(); err != nil {
			return fmt.Errorf("smtp_servers[%d]: %w", i, err)
		}
	}
	return nil
}

// provisionFailover resolves every server of smtp_servers, takes a
// reference on each sender and on the failover transport over them.
func (h *Handler) provisionFailover(repl *caddy.Replacer) (route string, conns int, err error) {
	var settings []mailer.SMTPSettings
	var senders []*mailer.Sender
	for i := range h.SMTPServers {
		st, err := h.SMTPServers[i].resolve(repl, h.logger)
		if err != nil {
			return "", 0, fmt.Errorf("smtp_servers[%d]: %w", i, err)
		}
		key := st.PoolKey()
		val, _, err := smtpPool.LoadOrNew(key, func() (caddy.Destructor, error) { return mailer.NewSender(st), nil })
		if err != nil {
			return "", 0, err
		}
		h.poolKeys = append(h.poolKeys, key)
		settings = append(settings, st)
		senders = append(senders, val.(*mailer.Sender))
		conns = max(conns, st.Connections)
	}
	fkey := failoverKey(h.poolKeys)
	val, _, err := failoverPool.LoadOrNew(fkey, func() (caddy.Destructor, error) { return mailer.NewFailover(senders), nil })
	if err != nil {
		return "", 0, err
	}
	h.failKey = fkey
	h.transport = val.(*mailer.Failover)
	return failoverRoute(settings), conns, nil
}

// cleanupFailover releases what provisionFailover took.
func (h *Handler) cleanupFailover() []error {
	var errs []error
	if h.failKey != "" {
		if _, err := failoverPool.Delete(h.failKey); err != nil {
			errs = append(errs, err)
		}
		h.failKey = ""
	}
	for _, k := range h.poolKeys {
		if _, err := smtpPool.Delete(k); err != nil {
			errs = append(errs, err)
		}
	}
	h.poolKeys = nil
	return errs
}

// smtpPool holds one sender per distinct SMTP identity. It is package-level
// so that senders, and their open connections, survive config reloads:
// the new config provisions (and takes a reference) before the old one
// is cleaned up.
var smtpPool = caddy.NewUsagePool()
