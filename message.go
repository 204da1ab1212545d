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
	env.To = envelopeRecipients(m.to, m.cc, m.bcc)
	return env, nil
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
// line limits: unchanged when it is not ASCII (go-mail encodes it as
// encoded words of at most 75 characters) or when every word is short
// and single spaces separate them; otherwise as Q-encoded words of at
// most 75 characters that decode to exactly the subject.
func foldableSubject(subject string) string {
	plain := !strings.Contains(subject, "  ") && !strings.HasPrefix(subject, " ") && !strings.HasSuffix(subject, " ")
	for _, w := range strings.Split(subject, " ") {
		if len(w) > maxFoldedWord {
			plain = false
		}
	}
	for i := 0; i < len(subject); i++ {
		if c := subject[i]; c >= utf8.RuneSelf {
			return subject
		} else if c < ' ' || c == 0x7f {
			plain = false
		}
	}
	if plain {
		return subject
	}
	const prefix, suffix = "=?UTF-8?q?", "?="
	var words []string
	var b strings.Builder
	for i := 0; i < len(subject); i++ {
		var enc string
		switch c := subject[i]; {
		case c == ' ':
			enc = "_"
		case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!*+-/", c) >= 0:
			enc = string(c)
		default:
			enc = fmt.Sprintf("=%02X", c)
		}
		if len(prefix)+b.Len()+len(enc)+len(suffix) > 75 {
			words = append(words, prefix+b.String()+suffix)
			b.Reset()
		}
		b.WriteString(enc)
	}
	words = append(words, prefix+b.String()+suffix)
	// white space between adjacent encoded words is not part of the text
	return strings.Join(words, " ")
}
