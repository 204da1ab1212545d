package mailer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"strings"
	"time"
	"unicode"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/redact"
)

// Envelope is one fully rendered message, ready to hand to a transport.
// The handler builds it; a transport delivers it and owns every connection.
type Envelope struct {
	// ID is authmail's opaque message id.
	ID string
	// MessageID is the Message-ID header value, angle brackets included.
	MessageID string
	// From is the envelope sender (MAIL FROM), a bare ASCII address.
	From string
	// To holds the envelope recipients (RCPT TO): To, Cc and Bcc, deduplicated.
	To []string
	// Data is the RFC 5322 message with CRLF line endings.
	Data []byte
	// BeforeDot, when set, is called right before the transport commits
	// the message: before the final dot of SMTP's DATA, before a capture
	// file gets its name. If it fails, the transport does not commit (it
	// closes the connection inside DATA, which the server discards) and
	// fails with outbox_unavailable: nothing was delivered.
	BeforeDot func() error
	// Urgent marks mail a person waits for (the auth lane): a paced
	// server gives it the next slot ahead of other waiting mail.
	Urgent bool
}

// Transport delivers rendered messages. Implementations are safe for
// concurrent use. A non-nil error is always an *Error.
type Transport interface {
	Send(ctx context.Context, env *Envelope) (Result, error)
}

// RateSharer is a transport whose SMTP servers may have a configured
// rate, which the instances of a cluster share through the storage.
type RateSharer interface {
	ShareRate(st certmagic.Storage, instance string, demand func() int, logger *zap.Logger)
}

// Result describes an accepted message.
type Result struct {
	// Status is "sent" or "captured".
	Status string
	// Response is the server's reply to the end of DATA, e.g.
	// "2.0.0 Ok: queued as 4Xyz". Empty for capture.
	Response string
	// raw is the whole reply, before the cut, for Sender.redacted
	raw string
}

// Error codes for delivery outcomes, as returned in the API's error_code.
const (
	CodeSMTPConnection      = "smtp_connection"
	CodeSMTPTimeout         = "smtp_timeout"
	CodeSMTPAuthFailed      = "smtp_auth_failed"
	CodeStartTLSUnsupported = "starttls_unsupported"
	CodeRecipientRefused    = "recipient_refused"
	CodeSMTPRejected        = "smtp_rejected"
	CodeSMTPTransient       = "smtp_transient"
	// CodeSMTPThrottled: the server said "slow down" (a rate, connection
	// or quota reply); retried when its lowered rate allows
	CodeSMTPThrottled = "smtp_throttled"
	CodeUncertain     = "smtp_disconnect_uncertain"
	CodeCaptureFailed = "capture_failed"
	// CodeOutboxUnavailable: the message's body could not be read back
	// from storage for a retry, or its attempt could not be recorded
	// before the final dot; nothing was delivered.
	CodeOutboxUnavailable = "outbox_unavailable"
	// CodeExpired: an OTP or link was still queued when its
	// expires_in_minutes ran out; it is not sent (state expired)
	CodeExpired = "expired_in_queue"
)

// ErrExpired is the outcome of a message whose code or link expired
// while it waited in the queue.
func ErrExpired() *Error { return &Error{Code: CodeExpired} }

// SMTP phases, in order. A failure's phase tells whether the server can
// have accepted anything: only PhaseEnd (waiting for the reply to the
// final dot) is ambiguous.
const (
	PhaseConnect  = "connect"
	PhaseGreeting = "greeting"
	PhaseHello    = "hello"
	PhaseStartTLS = "starttls"
	PhaseAuth     = "auth"
	PhaseMail     = "mail"
	PhaseRcpt     = "rcpt"
	PhaseData     = "data"
	PhaseBody     = "body"
	PhaseEnd      = "end_of_data"
	// PhaseStopped: the instance stopped (crash, kill, lost lease) with
	// the final dot possibly sent and no reply recorded
	PhaseStopped = "instance_stopped"
)

// Reply is a server reply, sanitised for logs and API messages.
type Reply struct {
	Code     int
	Enhanced string
	Text     string
	// raw is the whole text, before the cut: Sender.redacted removes the
	// sender's secrets from it before cutting, so that a cut never
	// leaves half of one
	raw string
}

func (r *Reply) String() string {
	if r == nil {
		return ""
	}
	s := fmt.Sprintf("%d", r.Code)
	if r.Enhanced != "" {
		s += " " + r.Enhanced
	}
	if r.Text != "" {
		s += " " + r.Text
	}
	return s
}

// Error is a classified delivery failure.
type Error struct {
	// Code is the API error code (smtp_*, capture_failed or
	// outbox_unavailable).
	Code string
	// Phase is the SMTP phase that failed.
	Phase string
	// Reply is the server's reply, when the failure was a reply.
	Reply *Reply
	// Refused and Recipients count refused and attempted recipients
	// when Phase is rcpt.
	Refused, Recipients int
	// Err is the underlying error, if any. It never holds a secret:
	// authentication data is never part of an error, and a Sender's
	// errors leave it with their text (and the reply's) cleaned of the
	// sender's secrets, which a server may echo (Sender.redacted).
	Err error
	// rejectedToken is the OAuth2 access token the server refused (auth
	// failures only); never shown
	rejectedToken string
	// fresh marks a failure on a reused connection that a new
	// connection may not have (dead idle connection, 421 before DATA).
	fresh bool
	// RetryAt, for smtp_throttled, is when the server's pacer lets the
	// next message go: the outbox retries then instead of after
	// retry_backoff.
	RetryAt time.Time
}

// Error returns a human-readable message that is safe to show to API
// callers and to log: no credentials, no message content.
func (e *Error) Error() string {
	switch e.Code {
	case CodeStartTLSUnsupported:
		if e.Reply != nil {
			return "the SMTP server refused STARTTLS (" + e.Reply.String() + "); authmail never falls back to plaintext"
		}
		return "the SMTP server does not offer STARTTLS; authmail never falls back to plaintext (use tls implicit for port 465, or tls none only for a trusted local relay)"
	case CodeSMTPAuthFailed:
		if e.Reply != nil && e.Reply.Code == 530 {
			return "the SMTP server requires authentication (" + e.Reply.String() + "); check the smtp username and password"
		}
		if e.Reply != nil {
			return "the SMTP server rejected the credentials: " + e.Reply.String()
		}
		return "SMTP authentication failed: " + ErrText(e.Err)
	case CodeRecipientRefused:
		return fmt.Sprintf("the SMTP server refused %d of %d recipients (%s); nothing was sent", e.Refused, e.Recipients, e.Reply.String())
	case CodeSMTPRejected:
		return fmt.Sprintf("the SMTP server rejected the message at %s: %s", e.Phase, e.Reply.String())
	case CodeSMTPTransient:
		if e.Phase == PhaseRcpt {
			return fmt.Sprintf("the SMTP server temporarily refused %d of %d recipients (%s); nothing was sent", e.Refused, e.Recipients, e.Reply.String())
		}
		return fmt.Sprintf("the SMTP server temporarily refused the message at %s: %s; nothing was sent", e.Phase, e.Reply.String())
	case CodeSMTPThrottled:
		if e.Reply == nil {
			return "waiting for the SMTP server's sending rate (a slow rate, or a pause after a quota reply); nothing was sent yet"
		}
		return fmt.Sprintf("the SMTP server asked to slow down at %s: %s; nothing was sent, authmail lowered its sending rate and retries", e.Phase, e.Reply.String())
	case CodeSMTPTimeout:
		return fmt.Sprintf("timed out talking to the SMTP server (%s); nothing was sent", e.Phase)
	case CodeUncertain:
		if e.Phase == PhaseStopped {
			return InterruptedError
		}
		return "the connection to the SMTP server was lost after the whole message was transmitted; the server may or may not have accepted it, so it was not resent"
	case CodeExpired:
		return "the code or link expired (expires_in_minutes) while the message waited in the queue, so it was not sent: a late code only confuses; the user asks for a new one"
	case CodeCaptureFailed:
		return "could not write the message to the capture directory: " + ErrText(e.Err)
	case CodeOutboxUnavailable:
		if e.Phase == PhaseBody {
			return "could not record the delivery attempt in storage before the end of the message, so the message was not completed; nothing was sent: " + ErrText(e.Err)
		}
		return "could not read the message from storage; nothing was sent: " + ErrText(e.Err)
	default:
		if e.Reply != nil {
			return fmt.Sprintf("the SMTP server refused the connection at %s: %s", e.Phase, e.Reply.String())
		}
		if isTLSError(e.Err) {
			return "TLS with the SMTP server failed: " + ErrText(e.Err)
		}
		return fmt.Sprintf("could not talk to the SMTP server (%s): %s", e.Phase, ErrText(e.Err))
	}
}

func (e *Error) Unwrap() error { return e.Err }

// codes is the fixed vocabulary of Error.Code.
var codes = map[string]bool{
	CodeSMTPConnection: true, CodeSMTPTimeout: true, CodeSMTPAuthFailed: true, CodeStartTLSUnsupported: true,
	CodeRecipientRefused: true, CodeSMTPRejected: true, CodeSMTPTransient: true, CodeSMTPThrottled: true,
	CodeUncertain: true, CodeCaptureFailed: true, CodeOutboxUnavailable: true, CodeExpired: true,
}

// redact removes r's secrets from every text of e that a server, the
// token endpoint or the network wrote: the reply's text (whole, then
// cut) and the underlying error's. The code is one of the fixed
// vocabulary: it becomes last_error_code and a metric label as it is.
func (e *Error) redact(r *redact.Set) {
	if !codes[e.Code] {
		e.Code = CodeSMTPConnection
	}
	if e.Reply != nil {
		text := e.Reply.raw
		if text == "" {
			text = e.Reply.Text
		}
		e.Reply.Text, e.Reply.raw = r.Line(text, 200), ""
		if !isEnhancedCode(e.Reply.Enhanced) {
			e.Reply.Enhanced = ""
		}
	}
	if e.Err != nil {
		e.Err = &redactedError{msg: r.Line(e.Err.Error(), 300), err: e.Err}
	}
}

// redactedError is an error whose text is cleaned of secrets. The
// original stays reachable for errors.Is and errors.As (isTLSError, a
// timeout), not for display: nothing prints an unwrapped cause.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// Uncertain reports whether the server may have accepted the message.
// Such a message must never be resent automatically.
func (e *Error) Uncertain() bool { return e.Code == CodeUncertain }

// Permanent reports whether retrying the same message cannot help
// without a change on the recipient's or the sender's side.
func (e *Error) Permanent() bool {
	return e.Code == CodeSMTPRejected || e.Code == CodeRecipientRefused
}

// ErrText is err's message on one line, sanitised and cut for logs and
// API messages.
func ErrText(err error) string {
	if err == nil {
		return "unknown error"
	}
	return sanitizeLine(err.Error(), 300)
}

// sanitizeLine makes server- or OS-provided text safe for a single log
// field or JSON message: control characters become spaces, runs of
// spaces collapse, and the result is cut to max bytes.
func sanitizeLine(s string, max int) string {
	var b strings.Builder
	space := false
	for _, r := range s {
		if unicode.IsControl(r) || unicode.IsSpace(r) {
			if !space && b.Len() > 0 {
				b.WriteByte(' ')
			}
			space = true
			continue
		}
		space = false
		b.WriteRune(r)
		if b.Len() >= max {
			break
		}
	}
	out := strings.TrimSpace(b.String())
	if len(out) > max {
		out = out[:max]
		for len(out) > 0 && !isRuneStart(out[len(out)-1]) {
			out = out[:len(out)-1]
		}
		if len(out) > 0 {
			out = out[:len(out)-1]
		}
	}
	return out
}

func isRuneStart(b byte) bool { return b&0xC0 != 0x80 }

// replyFrom extracts a server reply from an error returned by the SMTP
// client, or nil when the error is not a server reply (network, TLS…).
func replyFrom(err error) *Reply {
	var te *textproto.Error
	if !errors.As(err, &te) {
		return nil
	}
	text := te.Msg
	// multi-line replies are joined with \n by textproto
	text = strings.ReplaceAll(text, "\n", " ")
	r := &Reply{Code: te.Code}
	if esc, rest, ok := strings.Cut(text, " "); ok && isEnhancedCode(esc) {
		r.Enhanced = esc
		text = rest
	} else if isEnhancedCode(text) {
		r.Enhanced = text
		text = ""
	}
	r.Text, r.raw = sanitizeLine(text, 200), text
	return r
}

// isEnhancedCode reports whether s looks like an RFC 3463 status code.
func isEnhancedCode(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return false
	}
	if len(parts[0]) != 1 || (parts[0][0] != '2' && parts[0][0] != '4' && parts[0][0] != '5') {
		return false
	}
	for _, p := range parts[1:] {
		if len(p) == 0 || len(p) > 3 {
			return false
		}
		for i := 0; i < len(p); i++ {
			if p[i] < '0' || p[i] > '9' {
				return false
			}
		}
	}
	return true
}

func isTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func isTLSError(err error) bool {
	if err == nil {
		return false
	}
	var (
		cve *tls.CertificateVerificationError
		ae  tls.AlertError
		rhe tls.RecordHeaderError
		uae x509.UnknownAuthorityError
		hne x509.HostnameError
		cie x509.CertificateInvalidError
		ech *tls.ECHRejectionError
	)
	return errors.As(err, &cve) || errors.As(err, &ae) || errors.As(err, &rhe) ||
		errors.As(err, &uae) || errors.As(err, &hne) || errors.As(err, &cie) || errors.As(err, &ech) ||
		strings.Contains(err.Error(), "tls: ")
}

// classifyReply maps a server reply in a phase to an error code.
//
// Rejections of the sender's setup are retried, like failed
// authentication, because an operator fixes them with a reload: 530
// "authentication required" (an account configured without credentials)
// in any phase, and a 5xx answer to STARTTLS.
func classifyReply(phase string, r *Reply) string {
	if r.Code == 530 {
		return CodeSMTPAuthFailed
	}
	if r.Code >= 500 {
		if phase == PhaseAuth {
			return CodeSMTPAuthFailed
		}
		if phase == PhaseStartTLS {
			return CodeStartTLSUnsupported
		}
		if phase == PhaseRcpt {
			return CodeRecipientRefused
		}
		return CodeSMTPRejected
	}
	if phase == PhaseAuth && r.Code != 421 {
		return CodeSMTPAuthFailed
	}
	return CodeSMTPTransient
}

// classify turns an error from the SMTP client in the given phase into a
// deliveryError.
func classify(phase string, err error) *Error {
	if de, ok := err.(*Error); ok {
		return de
	}
	de := &Error{Phase: phase, Err: err}
	if r := replyFrom(err); r != nil {
		de.Reply = r
		de.Code = classifyReply(phase, r)
		return de
	}
	switch {
	case phase == PhaseEnd:
		// The final dot went out completely; the reply never came.
		de.Code = CodeUncertain
	case isTimeout(err):
		de.Code = CodeSMTPTimeout
	case phase == PhaseAuth:
		de.Code = CodeSMTPAuthFailed
	default:
		de.Code = CodeSMTPConnection
	}
	return de
}

// InterruptedError is recorded for a message whose delivery attempt was
// cut short by a crash: it may or may not have reached the server.
const InterruptedError = "the instance stopped (a crash, a kill or a lost lease) after this message's final dot was sent and before the server's reply was recorded; it may or may not have been delivered, so it is not resent automatically"

// The transports, and which of them share a rate; the outbox finds a
// RateSharer by a type assertion, so these keep a renamed method from
// turning sharing off silently.
var (
	_ Transport  = (*Sender)(nil)
	_ Transport  = (*Failover)(nil)
	_ Transport  = (*Capture)(nil)
	_ RateSharer = (*Sender)(nil)
	_ RateSharer = (*Failover)(nil)
)
