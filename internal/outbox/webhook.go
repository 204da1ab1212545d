package outbox

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
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// Webhook delivery states.
const (
	HookPending   = "pending"
	HookDelivered = "delivered"
	HookFailed    = "failed"
)

// Tunables that are not part of the public config. Tests shorten them.
var (
	webhookTimeout = 10 * time.Second
	webhookBackoff = 10 * time.Second
	webhookMaxWait = 10 * time.Minute
	webhookMaxAge  = 24 * time.Hour
)

// WebhookState is the durable state of a message's final-state webhook;
// the zero value means none was asked for.
type WebhookState struct {
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

func HostAllowed(host string, allow []string) bool {
	host = strings.TrimSuffix(strings.ToLower(strings.Trim(host, "[]")), ".")
	return slices.ContainsFunc(allow, func(a string) bool { return strings.EqualFold(strings.Trim(a, "[]"), host) })
}

// BlockedIP reports whether webhooks may not reach ip: any address of
// the IANA special-purpose address registries (reservedRanges), multicast,
// and IPv6 outside global unicast space. An address that embeds an IPv4
// address (IPv4-mapped, NAT64, 6to4, Teredo) is refused when the embedded
// address is, so that [::ffff:127.0.0.1], [64:ff9b::a00:1] or
// [2002:7f00:1::1] cannot reach what 127.0.0.1 or 10.0.0.1 would. The
// request check (checkWebhookURL, for IP literals) and the dial check
// (webhookClient, for every address a host name resolves to) both use it.
func BlockedIP(ip netip.Addr) bool {
	if !ip.IsValid() {
		return true
	}
	// a zone (fe80::1%eth0) would make every prefix miss
	ip = ip.Unmap().WithZone("")
	r := reservedRangeOf(ip)
	if r.embeds == nil {
		return r.refuse
	}
	for _, v4 := range r.embeds(ip) {
		if BlockedIP(v4) {
			return true
		}
	}
	return false
}

// reservedRange is an entry of the webhook block list. With embeds set,
// the range is refused only where the IPv4 addresses it returns are.
type reservedRange struct {
	prefix netip.Prefix
	name   string // the registry's name and RFC
	refuse bool
	embeds func(netip.Addr) []netip.Addr
}

// reservedRangeOf returns the most specific entry of reservedRanges that
// holds ip (an IPv4 address is never IPv4-mapped here).
func reservedRangeOf(ip netip.Addr) reservedRange {
	best := -1
	for i, r := range reservedRanges {
		if r.prefix.Contains(ip) && (best < 0 || r.prefix.Bits() > reservedRanges[best].prefix.Bits()) {
			best = i
		}
	}
	return reservedRanges[best]
}

// v4At returns the IPv4 address in bytes i..i+3 of ip, XORed with x.
func v4At(ip netip.Addr, i int, x byte) netip.Addr {
	b := ip.As16()
	return netip.AddrFrom4([4]byte{b[i] ^ x, b[i+1] ^ x, b[i+2] ^ x, b[i+3] ^ x})
}

func reserved(prefix, name string) reservedRange {
	return reservedRange{prefix: netip.MustParsePrefix(prefix), name: name, refuse: true}
}

// reservedRanges is the webhook block list: every entry of the IANA IPv4
// and IPv6 Special-Purpose Address Registries (as of 2025), whatever its
// "globally reachable" column says (the reachable ones are anycast
// services such as PCP, TURN and AS112, which no webhook receiver runs
// on, and the PCP anycast reaches the local gateway), plus multicast and,
// for IPv6, everything outside global unicast space 2000::/3 (from the
// IPv6 Address Space registry: reserved, site-local, multicast). The
// ranges that embed an IPv4 address are checked by that address instead:
// refusing them whole would cut off IPv6-only hosts that reach IPv4
// receivers through NAT64. The most specific entry decides.
var reservedRanges = []reservedRange{
	// the rest of IPv4 is reachable; the rest of IPv6 is not
	{prefix: netip.MustParsePrefix("0.0.0.0/0"), name: "IPv4 unicast"},
	reserved("::/0", "IPv6 outside global unicast, RFC 4291"),
	{prefix: netip.MustParsePrefix("2000::/3"), name: "IPv6 global unicast, RFC 4291"},

	// IANA IPv4 Special-Purpose Address Registry
	reserved("0.0.0.0/8", `"This network", RFC 791 section 3.2`),
	reserved("0.0.0.0/32", `"This host on this network", RFC 1122 section 3.2.1.3`),
	reserved("10.0.0.0/8", "Private-Use, RFC 1918"),
	reserved("100.64.0.0/10", "Shared Address Space, RFC 6598"),
	reserved("127.0.0.0/8", "Loopback, RFC 1122 section 3.2.1.3"),
	reserved("169.254.0.0/16", "Link Local (cloud metadata at 169.254.169.254), RFC 3927"),
	reserved("172.16.0.0/12", "Private-Use, RFC 1918"),
	reserved("192.0.0.0/24", "IETF Protocol Assignments, RFC 6890 section 2.1"),
	reserved("192.0.0.0/29", "IPv4 Service Continuity Prefix, RFC 7335"),
	reserved("192.0.0.8/32", "IPv4 dummy address, RFC 7600"),
	reserved("192.0.0.9/32", "Port Control Protocol Anycast, RFC 7723"),
	reserved("192.0.0.10/32", "Traversal Using Relays around NAT Anycast, RFC 8155"),
	reserved("192.0.0.170/32", "NAT64/DNS64 Discovery, RFC 8880 and RFC 7050 section 2.2"),
	reserved("192.0.0.171/32", "NAT64/DNS64 Discovery, RFC 8880 and RFC 7050 section 2.2"),
	reserved("192.0.2.0/24", "Documentation (TEST-NET-1), RFC 5737"),
	reserved("192.31.196.0/24", "AS112-v4, RFC 7535"),
	reserved("192.52.193.0/24", "AMT, RFC 7450"),
	reserved("192.88.99.0/24", "Deprecated (6to4 Relay Anycast), RFC 7526"),
	reserved("192.88.99.2/32", "6a44-relay anycast address, RFC 6751"),
	reserved("192.168.0.0/16", "Private-Use, RFC 1918"),
	reserved("192.175.48.0/24", "Direct Delegation AS112 Service, RFC 7534"),
	reserved("198.18.0.0/15", "Benchmarking, RFC 2544"),
	reserved("198.51.100.0/24", "Documentation (TEST-NET-2), RFC 5737"),
	reserved("203.0.113.0/24", "Documentation (TEST-NET-3), RFC 5737"),
	reserved("240.0.0.0/4", "Reserved, RFC 1112 section 4"),
	reserved("255.255.255.255/32", "Limited Broadcast, RFC 8190 and RFC 919 section 7"),
	// IANA Multicast Address Space Registry
	reserved("224.0.0.0/4", "Multicast, RFC 5771"),

	// IANA IPv6 Special-Purpose Address Registry
	reserved("::1/128", "Loopback Address, RFC 4291"),
	reserved("::/128", "Unspecified Address, RFC 4291"),
	// IPv4-mapped addresses are unmapped before the lookup; the entry
	// documents it and checks the embedded address if one ever arrives
	{prefix: netip.MustParsePrefix("::ffff:0:0/96"), name: "IPv4-mapped Address, RFC 4291",
		embeds: func(ip netip.Addr) []netip.Addr { return []netip.Addr{v4At(ip, 12, 0)} }},
	{prefix: netip.MustParsePrefix("64:ff9b::/96"), name: "IPv4-IPv6 Translat. (NAT64 well-known prefix), RFC 6052",
		embeds: func(ip netip.Addr) []netip.Addr { return []netip.Addr{v4At(ip, 12, 0)} }},
	// local-use NAT64 prefixes may embed the IPv4 address at several
	// offsets (RFC 6052 section 2.2); the range is not globally reachable,
	// so it is refused whole (list a host in webhook_allow_hosts to use one)
	reserved("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local-use), RFC 8215"),
	reserved("100::/64", "Discard-Only Address Block, RFC 6666"),
	reserved("100:0:0:1::/64", "Dummy IPv6 Prefix, RFC 9780"),
	reserved("2001::/23", "IETF Protocol Assignments, RFC 2928"),
	// Teredo: the server's IPv4 address in bits 32-63, the client's,
	// inverted, in bits 96-127 (RFC 4380 section 4)
	{prefix: netip.MustParsePrefix("2001::/32"), name: "TEREDO, RFC 4380 and RFC 8190",
		embeds: func(ip netip.Addr) []netip.Addr { return []netip.Addr{v4At(ip, 4, 0), v4At(ip, 12, 0xff)} }},
	reserved("2001:1::1/128", "Port Control Protocol Anycast, RFC 7723"),
	reserved("2001:1::2/128", "Traversal Using Relays around NAT Anycast, RFC 8155"),
	reserved("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast, RFC 9665"),
	reserved("2001:2::/48", "Benchmarking, RFC 5180"),
	reserved("2001:3::/32", "AMT, RFC 7450"),
	reserved("2001:4:112::/48", "AS112-v6, RFC 7535"),
	reserved("2001:10::/28", "Deprecated (previously ORCHID), RFC 4843"),
	reserved("2001:20::/28", "ORCHIDv2, RFC 7343"),
	reserved("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix, RFC 9374"),
	reserved("2001:db8::/32", "Documentation, RFC 3849"),
	// 6to4: the router's IPv4 address in bits 16-47 (RFC 3056 section 2)
	{prefix: netip.MustParsePrefix("2002::/16"), name: "6to4, RFC 3056",
		embeds: func(ip netip.Addr) []netip.Addr { return []netip.Addr{v4At(ip, 2, 0)} }},
	reserved("2620:4f:8000::/48", "Direct Delegation AS112 Service, RFC 7534"),
	reserved("3fff::/20", "Documentation, RFC 9637"),
	reserved("5f00::/16", "Segment Routing (SRv6) SIDs, RFC 9602"),
	reserved("fc00::/7", "Unique-Local, RFC 4193 and RFC 8190"),
	reserved("fe80::/10", "Link-Local Unicast, RFC 4291"),
	// outside 2000::/3, listed for clarity: IPv4-compatible addresses
	// (::/96, deprecated, RFC 4291 section 2.5.5.1) are refused whole, as
	// are site-local (fec0::/10, RFC 3879) and multicast (ff00::/8)
	reserved("::/96", "IPv4-compatible Address (deprecated), RFC 4291 section 2.5.5.1"),
	reserved("fec0::/10", "Site-Local (deprecated), RFC 3879"),
	reserved("ff00::/8", "Multicast, RFC 4291"),
}

var ErrWebhookBlocked = errors.New("the webhook address is loopback, private, link-local, metadata or otherwise reserved, and its host is not in webhook_allow_hosts")

// WebhookClient returns an HTTP client that never follows redirects and
// checks every address it connects to, after DNS resolution, unless the
// URL's host is allowed.
func WebhookClient(allow []string, timeout time.Duration) *http.Client {
	dialer := &net.Dialer{Timeout: timeout}
	safe := &net.Dialer{Timeout: timeout, Control: func(network, address string, _ syscall.RawConn) error {
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return err
		}
		ip, err := netip.ParseAddr(host)
		if err != nil || BlockedIP(ip) {
			return ErrWebhookBlocked
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
			if HostAllowed(host, allow) {
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

// SignWebhook sets the signature headers: Standard Webhooks
// (webhook-id, webhook-timestamp, webhook-signature "v1,<base64>") and
// authmail-relay's (X-Email-Service-Timestamp, X-Email-Service-Signature
// "sha256=<hex>" over the body, -V2 over "timestamp.body"). The two use
// different keys from the one secret, each as its receivers derive it, so
// that one secret serves both kinds: Standard Webhooks receivers decode a
// "whsec_" secret's base64 (webhookKey), and take any other secret as raw
// bytes in their libraries' raw mode; authmail-relay receivers (hmac.new(
// secret.encode(), …)) use the secret's bytes as written, "whsec_" and
// all. (Signing the relay headers with the decoded key made every relay
// receiver given a whsec_ secret fail verification.)
func SignWebhook(h http.Header, secret, msgID string, ts int64, body []byte) {
	key, err := WebhookKey(secret)
	if err != nil {
		key = []byte(secret) // refused when configured or requested; kept for old records
	}
	tsStr := strconv.FormatInt(ts, 10)
	mac := func(key []byte, parts ...[]byte) []byte {
		m := hmac.New(sha256.New, key)
		for _, p := range parts {
			m.Write(p)
		}
		return m.Sum(nil)
	}
	h.Set("webhook-id", msgID)
	h.Set("webhook-timestamp", tsStr)
	h.Set("webhook-signature", "v1,"+base64.StdEncoding.EncodeToString(mac(key, []byte(msgID+"."+tsStr+"."), body)))
	relayKey := []byte(secret)
	h.Set("X-Email-Service-Timestamp", tsStr)
	h.Set("X-Email-Service-Signature", "sha256="+hex.EncodeToString(mac(relayKey, body)))
	h.Set("X-Email-Service-Signature-V2", "sha256="+hex.EncodeToString(mac(relayKey, []byte(tsStr+"."), body)))
}

// WebhookKey returns the HMAC key of a webhook secret: the base64 after
// "whsec_" for a Standard Webhooks secret, else the secret's bytes. A
// "whsec_" secret that is not valid base64 is an error, since every
// signature made with it would fail verification.
func WebhookKey(secret string) ([]byte, error) {
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

// Webhook concurrency. Not part of the public config.
const (
	// WebhookPerHost is how many webhooks to one host (host and port of
	// the URL) are posted at once.
	WebhookPerHost = 2
	// WebhookPerTenant is how many webhooks of messages of one key
	// (tenant) are posted at once, over all hosts: a key cannot take every
	// slot by spreading its webhooks over many hanging hosts or ports.
	WebhookPerTenant = 16
	// webhookMaxInFlight bounds the webhooks posted at once: it takes
	// webhookMaxInFlight / WebhookPerTenant keys whose webhooks go to
	// receivers that never answer to hold every slot.
	webhookMaxInFlight = 64
)

// hookSlots counts the webhooks being posted; the engine's mu guards it.
// The zero value is ready.
type hookSlots struct {
	byHost   map[string]int
	byTenant map[string]int
	n        int
	// freed wakes a dispatcher waiting for a slot (buffered, 1)
	freed chan struct{}
}

// hookSlot is what a webhook being posted holds a slot of.
type hookSlot struct{ host, tenant string }

// hookSlotOf names the host and tenant of a pending webhook; a message
// from before tenants counts against its key id.
func hookSlotOf(en *Entry) hookSlot {
	return hookSlot{host: hookHost(en.st.Webhook.URL), tenant: tenantKey(en.st.Tenant, en.st.KeyID)}
}

// webhookWorker dispatches due webhooks, each posted by a goroutine of its
// own, so that a receiver that accepts and never answers holds only its
// own host's slots: at most WebhookPerHost webhooks to one host and
// WebhookPerTenant of one key are in flight, a host or key that has as
// many waits while the next due webhook of another goes out, and up to
// webhookMaxInFlight are posted at once. (Two workers that each waited
// out their post let eight webhooks to such a receiver delay every other
// webhook by 40 s.) start runs two dispatchers; either may dispatch any
// webhook, and the slots are shared.
func (e *Engine) webhookWorker() {
	// one client per allow list, so that sites with different lists keep
	// their connections alive
	clients := map[string]*http.Client{}
	for {
		en, slot := e.nextHook()
		if en == nil {
			return
		}
		cfg := e.hookConfigFor(en)
		key := strings.Join(cfg.WebhookAllow, ",")
		client := clients[key]
		if client == nil {
			client = WebhookClient(cfg.WebhookAllow, e.tun.HookTimeout)
			clients[key] = client
		}
		go func() {
			e.deliverHook(client, cfg, en)
			e.releaseHookSlot(slot)
		}()
	}
}

// hookConfigFor returns the settings that sign and route a message's
// webhook (webhook_secret, webhook_allow_hosts): those of the handler
// that sends it (regForLocked), so that two sites sharing a storage keep
// their own secrets; else the engine's last settings.
func (e *Engine) hookConfigFor(en *Entry) *Config {
	e.mu.Lock()
	defer e.mu.Unlock()
	if r := e.regForLocked(en.st.Profile); r != nil {
		return r.cfg
	}
	return e.Config()
}

// hookHost is the host (and port) a webhook URL posts to, lowercased: the
// unit of WebhookPerHost. The URL was checked when the request arrived
// (parseHTTPURL refuses user info), so the host is what follows "//" up
// to the path, query or fragment.
func hookHost(rawURL string) string {
	_, rest, _ := strings.Cut(rawURL, "//")
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	return strings.ToLower(rest)
}

// nextHook waits for a webhook that is due and whose host and key have a
// free slot, takes it off the heap and takes its slot; nil when the engine
// stops. The heap orders by due time, so the earliest due webhook with a
// free slot is found without looking past due ones: a subtree is skipped
// once its root is not due or can be taken.
func (e *Engine) nextHook() (*Entry, hookSlot) {
	for {
		e.mu.Lock()
		if e.closing {
			e.mu.Unlock()
			return nil, hookSlot{}
		}
		slots := &e.hookSlots
		if slots.freed == nil {
			slots.freed = make(chan struct{}, 1)
			slots.byHost, slots.byTenant = map[string]int{}, map[string]int{}
		}
		now := time.Now()
		wait := time.Duration(-1)
		best, bestSlot := -1, hookSlot{}
		if slots.n < webhookMaxInFlight {
			stack := []int{0}
			for len(stack) > 0 {
				i := stack[len(stack)-1]
				stack = stack[:len(stack)-1]
				if i >= e.hooks.Len() {
					continue
				}
				en := e.hooks.Items()[i]
				if d := en.st.Webhook.NextAt.Sub(now); d > 0 {
					if wait < 0 || d < wait {
						wait = d
					}
					continue
				}
				if slot := hookSlotOf(en); slots.byHost[slot.host] < WebhookPerHost && slots.byTenant[slot.tenant] < WebhookPerTenant {
					if best < 0 || en.st.Webhook.NextAt.Before(e.hooks.Items()[best].st.Webhook.NextAt) {
						best, bestSlot = i, slot
					}
					continue
				}
				stack = append(stack, 2*i+1, 2*i+2)
			}
		}
		if best >= 0 {
			en := e.hooks.Items()[best]
			e.hooks.Remove(en)
			slots.byHost[bestSlot.host]++
			slots.byTenant[bestSlot.tenant]++
			slots.n++
			e.attempts.Add(1)
			e.mu.Unlock()
			return en, bestSlot
		}
		wake, freed := e.wakeCh, slots.freed
		e.mu.Unlock()
		if wait < 0 {
			wait = time.Hour
		}
		t := time.NewTimer(wait)
		select {
		case <-wake:
		case <-freed:
		case <-t.C:
		case <-e.stopCh:
			t.Stop()
			return nil, hookSlot{}
		}
		t.Stop()
	}
}

// releaseHookSlot gives back the slot nextHook took for a webhook, after
// deliverHook put the webhook back on the heap or finished it.
func (e *Engine) releaseHookSlot(slot hookSlot) {
	e.mu.Lock()
	slots := &e.hookSlots
	slots.n--
	if slots.byHost[slot.host]--; slots.byHost[slot.host] <= 0 {
		delete(slots.byHost, slot.host)
	}
	if slots.byTenant[slot.tenant]--; slots.byTenant[slot.tenant] <= 0 {
		delete(slots.byTenant, slot.tenant)
	}
	e.mu.Unlock()
	select {
	case slots.freed <- struct{}{}:
	default:
	}
}

func (e *Engine) deliverHook(client *http.Client, cfg *Config, en *Entry) {
	defer e.attempts.Done()
	e.mu.Lock()
	st := en.st
	hook := st.Webhook
	e.mu.Unlock()
	secret := hook.Secret
	if secret == "" {
		secret = cfg.WebhookSecret
	}
	// The body is built from the state alone, and carries no provider
	// text: error_code is one of mailer's fixed codes, and last_error and
	// smtp_response, which quote the server or the token endpoint, are
	// not in it. They are cleaned of secrets where they enter anyway, as
	// a mailer.Sender hands a result or failure back (its redacted
	// method, with internal/redact), so a payload that adds them stays
	// clean.
	var p any
	if cfg.WebhookBody != nil {
		p = cfg.WebhookBody(st)
	} else {
		ap := webhookPayload{ID: st.ID, MessageID: st.MessageID, Status: st.Status, Attempts: st.Attempts}
		if st.Status != Sent {
			ap.ErrorCode = st.LastCode
		}
		if !st.SentAt.IsZero() {
			ap.SentAt = st.SentAt.UTC().Format(time.RFC3339)
		}
		p = ap
	}
	// the same encoding as the API's answers ("<…@example.com>", not
	// "\u003c…"), without the trailing newline
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(p) // plain strings and numbers: it cannot fail
	body := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	err := e.postHook(client, hook.URL, secret, st.ID, body)
	now := time.Now()
	e.mu.Lock()
	w := &en.st.Webhook
	w.Attempts++
	done := false
	switch {
	case err == nil:
		w.Status, w.LastError, done = HookDelivered, "", true
	case errors.Is(err, ErrWebhookBlocked) || now.Sub(st.Updated) > e.tun.HookMaxAge:
		w.Status, w.LastError, done = HookFailed, mailer.ErrText(err), true
	default:
		d := e.tun.HookBackoff
		for i := 1; i < w.Attempts && d < e.tun.HookMaxWait; i++ {
			d *= 2
		}
		w.NextAt, w.LastError = now.Add(min(d, e.tun.HookMaxWait)), mailer.ErrText(err)
	}
	if !done {
		e.hooks.Push(en)
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
	e.obs.Webhook(result)
	fields := []zap.Field{zap.String("id", st.ID), zap.String("result", result), zap.Int("webhook_attempts", w.Attempts)}
	if err != nil {
		e.log().Warn("webhook delivery failed", append(fields, zap.String("error", mailer.ErrText(err)))...)
	} else {
		e.log().Info("webhook delivered", fields...)
	}
}

// postHook sends one webhook request; any answer but 2xx is an error.
func (e *Engine) postHook(client *http.Client, target, secret, id string, body []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), e.tun.HookTimeout)
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
		SignWebhook(req.Header, secret, id, time.Now().Unix(), body)
	} else {
		// unsigned (compat authmail-relay only): the relay still sent its
		// timestamp
		req.Header.Set("X-Email-Service-Timestamp", strconv.FormatInt(time.Now().Unix(), 10))
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
