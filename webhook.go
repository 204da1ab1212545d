package authmail

import (
	"net/http"
	"net/netip"
	"strings"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// checkWebhookURL validates a caller's webhook_url.
func checkWebhookURL(raw string, allow []string) *apiError {
	u, p := parseHTTPURL(raw)
	if p != "" {
		return invalid("webhook_url", "%s", p)
	}
	host := strings.ToLower(u.Hostname())
	if outbox.HostAllowed(host, allow) {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && outbox.BlockedIP(ip) {
		return &apiError{Status: http.StatusUnprocessableEntity, Code: "invalid_request", Field: "webhook_url",
			Message: "webhook_url points to a loopback, private, link-local, metadata or other reserved address; list the host in webhook_allow_hosts to allow it"}
	}
	return nil
}
