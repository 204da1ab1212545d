package authmail

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net/mail"
	"strings"
	"time"
	"unicode/utf8"

	gomail "github.com/wneessen/go-mail"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
)

// newMessageID returns a Message-ID value, angle brackets included, with
// 160 random bits on the sender's domain.
func newMessageID(domain string) string {
	var b [20]byte
	_, _ = rand.Read(b[:])
	return "<" + outbox.IDEncoding.EncodeToString(b[:]) + "@" + domain + ">"
}

// buildEnvelope renders m into RFC 5322 bytes. The headers are From,
// To, Cc, Reply-To, Subject, Date, Message-ID and MIME-Version; Bcc
// recipients appear only in the envelope. With a text and an HTML part
// the body is multipart/alternative, text first.
func (h *Handler) buildEnvelope(m *outMessage, now time.Time) (*mailer.Envelope, error) {
	env, err := h.buildUnsigned(m, now)
	if err != nil {
		return nil, err
	}
	if h.dkim != nil {
		// signed once, here: the outbox stores and every retry resends
		// exactly these bytes. A signing failure fails the request before
		// anything is stored.
		sig, err := h.dkim.sign(env.Data)
		if err != nil {
			return nil, fmt.Errorf("dkim signing: %w", err)
		}
		env.Data = append([]byte(sig), env.Data...)
	}
	return env, nil
}

// buildUnsigned builds the message without a DKIM signature: what the
// preview hands out. A signature made with the production key over text
// a caller chose, for any recipient, is a signing oracle: the signed
// message could be replayed through any SMTP server as this domain's
// mail, outside every rate limit and log. Only mail that goes through
// the outbox is signed.
//
// Every header value that a caller or a template can influence passes
// headerValueProblem here, whatever path built the message, so that a
// check missed at the request's edge cannot put a line break or an
// encoded word that decodes to one into a header.
func (h *Handler) buildUnsigned(m *outMessage, now time.Time) (*mailer.Envelope, error) {
	if err := m.headerProblem(); err != nil {
		return nil, err
	}
	env := &mailer.Envelope{
		ID:        outbox.NewID(now),
		MessageID: newMessageID(h.from.domain()),
		From:      h.from.Addr,
	}
	msg := gomail.NewMsg(gomail.WithNoDefaultUserAgent())
	msg.SetAddrHeaderFromMailAddress(gomail.HeaderFrom, h.from.mail())
	msg.SetAddrHeaderFromMailAddress(gomail.HeaderTo, mailAddresses(m.to)...)
	if len(m.cc) > 0 {
		msg.SetAddrHeaderFromMailAddress(gomail.HeaderCc, mailAddresses(m.cc)...)
	}
	replyTo := m.replyTo
	if len(replyTo) == 0 {
		replyTo = h.replyTo
	}
	if len(replyTo) > 0 {
		msg.SetAddrHeaderFromMailAddress(gomail.HeaderReplyTo, mailAddresses(replyTo)...)
	}
	msg.Subject(foldableSubject(m.subject))
	if m.listUnsub != "" {
		// validated ASCII URIs (checkUnsubscribe), so go-mail writes them as is
		msg.SetGenHeader(gomail.HeaderListUnsubscribe, m.listUnsub)
		if m.listUnsubPost != "" {
			msg.SetGenHeader(gomail.HeaderListUnsubscribePost, m.listUnsubPost)
		}
	}
	msg.SetDateWithValue(now)
	msg.SetMessageIDWithValue(strings.TrimSuffix(strings.TrimPrefix(env.MessageID, "<"), ">"))
	if m.text != "" {
		msg.SetBodyString(gomail.TypeTextPlain, m.text)
		if m.html != "" {
			msg.AddAlternativeString(gomail.TypeTextHTML, m.html)
		}
	} else {
		msg.SetBodyString(gomail.TypeTextHTML, m.html)
	}
	var buf bytes.Buffer
	buf.Grow(len(m.text) + len(m.html) + 2048)
	if _, err := msg.WriteTo(&buf); err != nil {
		return nil, fmt.Errorf("rendering message: %w", err)
	}
	env.Data = buf.Bytes()
	env.To = envelopeRecipients(m.to, m.cc, m.bcc)
	return env, nil
}

// headerError is a header value that must not go into a message.
type headerError struct{ field, problem string }

func (e *headerError) Error() string { return e.field + " " + e.problem }

// headerValueProblem reports why v cannot be a header value, or "": the
// one check for every value a caller or template influences (line breaks
// and control characters, raw or in an encoded word a mail client would
// decode).
func headerValueProblem(v string) string {
	if p := headerProblem(v); p != "" {
		return p
	}
	return encodedWordProblem(v)
}

// headerProblem checks every header value of m that a caller or a
// template influences.
func (m *outMessage) headerProblem() error {
	check := func(field, v string) error {
		if p := headerValueProblem(v); p != "" {
			return &headerError{field, p}
		}
		return nil
	}
	if err := check("subject", m.subject); err != nil {
		return err
	}
	for _, l := range []struct {
		field string
		as    []mailAddr
	}{{"to", m.to}, {"cc", m.cc}, {"reply_to", m.replyTo}} {
		for _, a := range l.as {
			if err := check(l.field, a.Name); err != nil {
				return err
			}
		}
	}
	if err := check("list_unsubscribe", m.listUnsub); err != nil {
		return err
	}
	return check("list_unsubscribe_post", m.listUnsubPost)
}

func mailAddresses(as []mailAddr) []*mail.Address {
	out := make([]*mail.Address, len(as))
	for i, a := range as {
		out[i] = a.mail()
	}
	return out
}

// envelopeRecipients returns the RCPT TO addresses: every recipient once,
// compared case-insensitively.
func envelopeRecipients(lists ...[]mailAddr) []string {
	seen := map[string]bool{}
	var out []string
	for _, l := range lists {
		for _, a := range l {
			k := strings.ToLower(a.Addr)
			if seen[k] {
				continue
			}
			seen[k] = true
			out = append(out, a.Addr)
		}
	}
	return out
}

// maxFoldedWord is the longest space-separated word go-mail may put on
// a header line of its own: go-mail folds header values only at spaces
// and writes a longer word on one line, so a 998-character subject
// without spaces became a 999-octet line, beyond the 998 octets RFC 5322
// (2.1.1) and SMTP allow. 76 keeps such a line within the recommended 78.
const maxFoldedWord = 76

// foldableSubject returns the subject as go-mail can fold it within the
// line limits: unchanged when it is ASCII, every word is short and
// single spaces separate them; otherwise as Q-encoded words that decode
// to exactly the subject, split only between characters, the first short
// enough to stay on the "Subject: " line. go-mail's own encoding of a
// non-ASCII subject put the first encoded word on a folded line of its
// own ("Subject:" CRLF SP "=?UTF-8?q?…"): valid, but some parsers read
// the fold as a leading space of the subject.
func foldableSubject(subject string) string {
	plain := !strings.Contains(subject, "  ") && !strings.HasPrefix(subject, " ") && !strings.HasSuffix(subject, " ")
	for _, w := range strings.Split(subject, " ") {
		if len(w) > maxFoldedWord {
			plain = false
		}
	}
	for i := 0; i < len(subject); i++ {
		if c := subject[i]; c >= utf8.RuneSelf || c < ' ' || c == 0x7f {
			plain = false
		}
	}
	if plain {
		return subject
	}
	const prefix, suffix = "=?UTF-8?q?", "?="
	// go-mail (msgWriter.writeHeader) starts a new line before a word
	// unless the word leaves more than one character of its budget:
	// MaxHeaderLength less CRLF, "Subject: " on the first line, a space
	// on the others. Words within that stay where they are: the first on
	// the "Subject: " line.
	limit := gomail.MaxHeaderLength - 2 - len("Subject: ") - 2
	var words []string
	var b strings.Builder
	for i := 0; i < len(subject); {
		_, size := utf8.DecodeRuneInString(subject[i:])
		var enc strings.Builder
		for _, c := range []byte(subject[i : i+size]) {
			switch {
			case c == ' ':
				enc.WriteByte('_')
			case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!*+-/", c) >= 0:
				enc.WriteByte(c)
			default:
				fmt.Fprintf(&enc, "=%02X", c)
			}
		}
		i += size
		if b.Len() > 0 && len(prefix)+b.Len()+enc.Len()+len(suffix) > limit {
			words = append(words, prefix+b.String()+suffix)
			b.Reset()
			limit = gomail.MaxHeaderLength - 3 - 2
		}
		b.WriteString(enc.String())
	}
	words = append(words, prefix+b.String()+suffix)
	// white space between adjacent encoded words is not part of the text
	return strings.Join(words, " ")
}
