package pace

import "strings"

// Kind is what a server's reply says about the sending rate.
type Kind int

// Kinds of reply, from Classify.
const (
	// None: the reply says nothing about the rate; the engine's normal
	// handling (retry_backoff for 4xx, a bounce for 5xx) applies.
	None Kind = iota
	// Rate: the account or the sending client is over the server's
	// message rate. The pacer lowers the server's current rate and the
	// message is retried as soon as the lowered rate allows it.
	Rate
	// Connections: too many concurrent connections or sessions. Treated
	// like Rate by the pacer; the engine should also use fewer
	// connections to the server.
	Connections
	// Quota: a daily (or other long-period) quota is used up. More
	// attempts only earn more refusals until the quota resets, so the
	// pacer pauses the server for QuotaPause instead of halving its rate.
	// Some providers say so with a 5xx (Gmail's 550 5.4.5, Microsoft
	// 365's 554 5.2.0): the message must stay queued, not bounce.
	Quota
	// Recipient: one recipient's mailbox is receiving too fast (Gmail
	// 450 4.2.1). The server itself is fine: its rate is not touched and
	// the message takes the normal retry_backoff.
	Recipient
)

func (k Kind) String() string {
	switch k {
	case Rate:
		return "rate"
	case Connections:
		return "connections"
	case Quota:
		return "quota"
	case Recipient:
		return "recipient"
	}
	return "none"
}

// Slows reports whether the kind slows or pauses the whole server.
func (k Kind) Slows() bool { return k == Rate || k == Connections || k == Quota }

// rule matches a reply: a reply code (0: any 4xx), an enhanced status
// code prefix ("" any) and, when texts is not empty, one of the texts
// (lowercase, matched as substrings of the lowercased reply text).
type rule struct {
	code     int
	enhanced string
	texts    []string
	kind     Kind
	// permanent lets the rule match a 5xx reply too
	permanent bool
}

// rules are tried in order; the first match decides. Exclusions come
// first (greylisting and server trouble that merely say "try again
// later"), then the recipient-only limits, the quotas, the rates, and
// last the enhanced codes that mean "slow down" whatever the text says.
//
// Not in the list on purpose: enhanced code 4.7.0 and 4.7.1 alone. 4.7.0
// is also "TLS not available" and "temporary authentication failure",
// 4.7.1 is "delivery not authorized" and what greylisting answers: a
// rate signal there needs one of the texts below.
var rules = []rule{
	// greylisting (postgrey, rspamd, sqlgrey, milter-greylist): one
	// message is asked to come back later; the server's rate is fine
	{texts: []string{"greylist", "graylist", "grey-list", "gray-list", "greylisting", "grey listed", "gray listed"}, kind: None},
	// Gmail: "421 4.7.0 Temporary System Problem. Try again later."
	{texts: []string{"temporary system problem"}, kind: None},

	// Gmail relay, customer-wide (450 4.2.1 "Peak SMTP relay limit
	// exceeded for customer"): the account's rate, before the
	// per-recipient 4.2.1 below
	{texts: []string{"peak smtp relay limit"}, kind: Rate},
	// Gmail 450 4.2.1: "The user you are trying to contact is receiving
	// mail too quickly" / "... receiving mail at a rate that prevents
	// additional messages from being delivered"
	{texts: []string{"receiving mail too quickly", "receiving mail at a rate"}, kind: Recipient},

	// Amazon SES "454 Throttling failure: Daily message quota exceeded"
	{texts: []string{"daily message quota exceeded"}, kind: Quota, permanent: true},
	// Gmail 550 5.4.5 "Daily user sending limit exceeded" / "Daily
	// sending quota exceeded" / "Daily SMTP relay limit exceeded for user"
	{enhanced: "5.4.5", texts: []string{"daily"}, kind: Quota, permanent: true},
	{texts: []string{"daily user sending limit exceeded", "daily sending quota exceeded", "daily smtp relay limit exceeded"}, kind: Quota, permanent: true},
	// Microsoft 365, more than 10,000 recipients a day from a mailbox:
	// "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
	{texts: []string{"submissionquotaexceeded"}, kind: Quota, permanent: true},
	// Microsoft 365 tenant limits: 550 5.7.232/5.7.233 "... has exceeded
	// its daily limit for sending email to external recipients"
	{texts: []string{"exceeded its daily limit", "exceeded their daily limit", "exceeded the daily limit"}, kind: Quota, permanent: true},

	// Postfix anvil: "421 4.7.0 host Error: too many connections from
	// 192.0.2.1", "... too many new TLS sessions from ..."
	{texts: []string{"too many connections", "too many concurrent", "concurrent connections limit", "concurrent connection limit", "too many new tls sessions", "too many sessions"}, kind: Connections},
	// Microsoft 365 SMTP AUTH: "432 4.3.2 STOREDRV.ClientSubmit; sender
	// thread limit exceeded"
	{texts: []string{"sender thread limit exceeded"}, kind: Connections},

	// Amazon SES "454 Throttling failure: Maximum sending rate exceeded";
	// SendGrid, Mailgun and most relays say "throttl…" or "rate limit…"
	{texts: []string{"throttl", "rate limit", "rate-limit", "ratelimit", "maximum sending rate", "sending rate exceeded"}, kind: Rate},
	// Postfix anvil: "450 4.7.1 Error: too much mail from 192.0.2.1",
	// "450 4.7.1 Error: too many recipients from 192.0.2.1"
	{texts: []string{"too much mail from", "too many recipients from", "too many messages", "too many mails", "too many emails"}, kind: Rate},
	// Exchange receive connectors (MessageRateLimit): "421 4.4.2 Message
	// submission rate for this client has exceeded the configured limit"
	{texts: []string{"submission rate"}, kind: Rate},
	// Gmail: "421 4.7.0 Our system has detected an unusual rate of
	// unsolicited mail ..." (also 4.7.28), "421 4.7.0 Try again later,
	// closing connection." (the relay's flood protection at HELO), "421
	// 4.4.5 Server busy, try again later."; Yahoo: "421 4.7.0 [TSS04]
	// Messages from ... temporarily deferred due to unexpected volume or
	// user complaints"
	{texts: []string{"unusual rate", "try again later, closing connection", "server busy", "unexpected volume", "sending too fast", "slow down"}, kind: Rate},

	// enhanced codes that mean "slow down" whatever the text
	// Gmail 4.7.28: rate limited for an unusual rate of unsolicited mail
	{enhanced: "4.7.28", kind: Rate},
	// RFC 3463 X.4.5 "mail system congestion"
	{enhanced: "4.4.5", kind: Rate},
	// RFC 3463 X.3.2 "system not accepting network messages": Microsoft
	// 365 "432 4.3.2 Concurrent connections limit exceeded"
	{enhanced: "4.3.2", kind: Connections},
}

// Classify tells what a server's reply (code, RFC 3463 enhanced code
// without the text, the text) says about the sending rate. It reads
// only the reply and is cheap: a few substring searches on the text.
// 2xx and 3xx replies are None; a 5xx is None unless it announces a
// used-up quota.
func Classify(code int, enhanced, text string) Kind {
	if code < 400 || code >= 600 {
		return None
	}
	lower := strings.ToLower(text)
	for i := range rules {
		r := &rules[i]
		if code >= 500 && !r.permanent {
			continue
		}
		if r.code != 0 && r.code != code {
			continue
		}
		if r.enhanced != "" && enhanced != r.enhanced {
			continue
		}
		if len(r.texts) > 0 && !containsAny(lower, r.texts) {
			continue
		}
		return r.kind
	}
	return None
}

// Throttling reports whether the reply means "slow down" for the whole
// server: Classify gives Rate, Connections or Quota.
func Throttling(code int, enhanced, text string) bool {
	return Classify(code, enhanced, text).Slows()
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
