// Package mailer delivers rendered messages: the Transport seam, the
// pooled SMTP Sender, Failover over several senders, and Capture, which
// writes .eml files instead.
//
// A Transport takes an Envelope (the envelope addresses and the
// finished RFC 5322 bytes) and returns a Result or an *Error whose Code
// and Phase classify the failure. The outbox decides on that alone:
//
//   - In doubt (Uncertain, code smtp_disconnect_uncertain) only when
//     the final dot of DATA may have reached the server and its reply
//     did not come back (phase end_of_data). Such a message is never
//     resent automatically. Every failure before the dot (connect,
//     greeting, hello, STARTTLS, AUTH, MAIL, RCPT, DATA, the body) left
//     nothing at the server and is safe to retry.
//   - Permanent (smtp_rejected, recipient_refused): a 5xx reply to the
//     message or a recipient; retrying cannot help.
//   - Everything else is transient and retried: 4xx replies, timeouts
//     and dropped connections before the dot, a sender's setup that an
//     operator fixes with a reload (530 "authentication required", a
//     refused STARTTLS), smtp_throttled (retried at RetryAt, when the
//     server's lowered rate allows).
//   - Envelope.BeforeDot runs just before the dot (before a capture
//     file gets its name). If it fails the message is not committed:
//     the connection closes inside DATA, which the server discards, and
//     the failure is outbox_unavailable, nothing delivered.
//
// A refusal of some recipients sends nothing: the transaction is reset
// before DATA, so a message never reaches part of its recipients.
//
// A Sender keeps up to Connections SMTP connections open and reuses
// them; a dead idle connection costs a redial, never a message. With
// PIPELINING (RFC 2920) MAIL, the RCPTs and DATA go in one round trip.
// Senders live in a caddy.UsagePool keyed by PoolKey (every setting
// that changes a connection; the password only hashed), so a config
// reload that keeps a server keeps its connections, its OAuth2 token
// and its pacer (internal/pace) with its current rate.
//
// Errors never hold a secret: not the password, not a token, not the
// message. What a server or token endpoint wrote (a reply's text, a
// token endpoint's error, an error's text) leaves a Sender cleaned of
// the sender's secrets in every encoding (internal/redact), then cut and
// stripped of control characters; an Error's Code is one of the Code
// constants, and a token endpoint's own error code shows only when it
// is a plain one.
package mailer
