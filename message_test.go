package authmail

import (
	"bytes"
	"mime"
	"net/mail"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/mailtest"
	"github.com/caddy-authmail/authmail/internal/outbox"
)

func parseMessage(t *testing.T, raw []byte) (*mailtest.Message, []mailtest.Part) {
	t.Helper()
	m, err := mailtest.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return m, m.Parts
}

func TestBuildEnvelope(t *testing.T) {
	h := &Handler{from: mailAddr{Name: "Acme, Inc.", Addr: "no-reply@acme.example"}}
	now := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	m := &outMessage{
		flow:    "send",
		to:      []mailAddr{{Name: "Jane Doe", Addr: "jane@example.org"}, {Addr: "bob@example.net"}},
		cc:      []mailAddr{{Addr: "carol@example.com"}, {Addr: "JANE@example.org"}},
		bcc:     []mailAddr{{Addr: "hidden@example.com"}},
		replyTo: []mailAddr{{Name: "Support", Addr: "help@acme.example"}},
		subject: "Grüße — your order",
		text:    "Hello Jane,\nline two with a very long sentence that will need quoted-printable soft line breaks to stay under the limit.\n",
		html:    "<p>Hello <b>Jane</b></p>",
	}
	env, err := h.buildEnvelope(m, now)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9a-hjkmnp-tv-z]{26}$`).MatchString(env.ID) {
		t.Errorf("id %q", env.ID)
	}
	if !regexp.MustCompile(`^<[0-9a-hjkmnp-tv-z]{32}@acme\.example>$`).MatchString(env.MessageID) {
		t.Errorf("message id %q", env.MessageID)
	}
	if env.From != "no-reply@acme.example" {
		t.Errorf("envelope from %q", env.From)
	}
	if got := strings.Join(env.To, ","); got != "jane@example.org,bob@example.net,carol@example.com,hidden@example.com" {
		t.Errorf("envelope recipients %q (deduplicated, bcc included)", got)
	}
	msg, parts := parseMessage(t, env.Data)
	hdr := msg.Header
	for name, want := range map[string]string{
		"From":         `"Acme, Inc." <no-reply@acme.example>`,
		"To":           `"Jane Doe" <jane@example.org>, <bob@example.net>`,
		"Cc":           `<carol@example.com>, <JANE@example.org>`,
		"Reply-To":     `"Support" <help@acme.example>`,
		"Date":         "Wed, 04 Mar 2026 05:06:07 +0000",
		"Message-Id":   env.MessageID,
		"Mime-Version": "1.0",
	} {
		if got := hdr.Get(name); got != want {
			t.Errorf("%s: %q, want %q", name, got, want)
		}
	}
	if msg.Subject != "Grüße — your order" {
		t.Errorf("subject %q", msg.Subject)
	}
	for _, forbidden := range []string{"Bcc", "X-Mailer", "User-Agent"} {
		if _, ok := hdr[forbidden]; ok {
			t.Errorf("header %s must not be present", forbidden)
		}
	}
	if bytes.Contains(env.Data, []byte("hidden@example.com")) {
		t.Error("the bcc address appears in the message")
	}
	if len(parts) != 2 || msg.Types[0] != "multipart/alternative" {
		t.Fatalf("parts %+v", parts)
	}
	if parts[0].ContentType != "text/plain; charset=UTF-8" || parts[0].Body != strings.ReplaceAll(m.text, "\n", "\r\n") {
		t.Errorf("text part %q %q", parts[0].ContentType, parts[0].Body)
	}
	if parts[1].ContentType != "text/html; charset=UTF-8" || parts[1].Body != m.html {
		t.Errorf("html part %q %q", parts[1].ContentType, parts[1].Body)
	}
	for _, line := range strings.Split(string(env.Data), "\r\n") {
		if len(line) > 998 {
			t.Fatal("line longer than 998 octets")
		}
	}
}

func TestBuildEnvelopeTextOnlyAndDefaultReplyTo(t *testing.T) {
	h := &Handler{from: mailAddr{Addr: "a@example.com"}, replyTo: []mailAddr{{Addr: "r@example.com"}}}
	env, err := h.buildEnvelope(&outMessage{to: []mailAddr{{Addr: "b@example.com"}}, subject: "s", text: "just text\n"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	msg, parts := parseMessage(t, env.Data)
	if len(parts) != 1 || parts[0].ContentType != "text/plain" || parts[0].Body != "just text\r\n" {
		t.Errorf("parts %+v", parts)
	}
	if msg.Header.Get("Reply-To") != "<r@example.com>" || msg.Header.Get("From") != "<a@example.com>" {
		t.Errorf("headers %v", msg.Header)
	}
}

func TestIDsAreUniqueAndOrdered(t *testing.T) {
	seen := map[string]bool{}
	prev := ""
	for i := range 2000 {
		id := outbox.NewID(time.UnixMilli(int64(1_700_000_000_000 + i)))
		if seen[id] || id <= prev {
			t.Fatalf("id %q repeats or is out of order after %q", id, prev)
		}
		seen[id] = true
		prev = id
	}
}

// TestLongSubjectsFoldWithinTheLineLimit: the longest accepted subject,
// 998 characters without a space, was written on one 999-octet line;
// every header line now stays within 78 octets and the subject decodes
// to exactly what was given.
func TestLongSubjectsFoldWithinTheLineLimit(t *testing.T) {
	h := &Handler{from: mailAddr{Addr: "no-reply@acme.example"}}
	for _, subject := range []string{strings.Repeat("a", maxSubjectRunes), "a " + strings.Repeat("b", 77) + " c", "two  spaces", "tab\there", "=?not?an?encoded?word?="} {
		env, err := h.buildEnvelope(&outMessage{to: []mailAddr{{Addr: "jane@example.org"}}, subject: subject, text: "x"}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		checkHeaderLines(t, env.Data, 78)
		if m, _ := parseMessage(t, env.Data); m.Subject != subject {
			t.Errorf("subject %q decodes to %q", subject, m.Subject)
		}
	}
	// short ASCII subjects are written as they are
	env, _ := h.buildEnvelope(&outMessage{to: []mailAddr{{Addr: "jane@example.org"}}, subject: "Your receipt", text: "x"}, time.Now())
	if !bytes.Contains(env.Data, []byte("\r\nSubject: Your receipt\r\n")) {
		t.Errorf("plain subject not written as is:\n%s", env.Data)
	}
}

// checkHeaderLines asserts that every header line ends in CR LF, holds
// no other CR or LF, is at most limit octets long, and, when it is a
// continuation line, holds more than white space.
func checkHeaderLines(t testing.TB, data []byte, limit int) {
	t.Helper()
	head, _, ok := bytes.Cut(data, []byte("\r\n\r\n"))
	if !ok {
		t.Fatalf("no end of header in %q", data)
	}
	for i, line := range bytes.Split(head, []byte("\r\n")) {
		if bytes.ContainsAny(line, "\r\n") {
			t.Fatalf("header line %d holds a bare CR or LF: %q", i, line)
		}
		if len(line) > limit {
			t.Fatalf("header line %d is %d octets long: %q", i, len(line), line)
		}
		if len(line) > 0 && (line[0] == ' ' || line[0] == '\t') && len(bytes.TrimLeft(line, " \t")) == 0 {
			t.Fatalf("header line %d is white space only", i)
		}
	}
}

// TestSubjectStartsOnItsLine: a non-ASCII subject (the built-in Korean
// templates', a Cyrillic one, a long one) starts on the "Subject:" line,
// with no fold before its first encoded word — some parsers read such a
// fold as a leading space — and decodes to exactly the subject.
func TestSubjectStartsOnItsLine(t *testing.T) {
	h := provisionedHandler(t)
	for _, subject := range []string{"[Example App] 인증 코드 안내", "Короткая тема", strings.Repeat("인증 코드 ", 12) + "끝",
		"Ünïcödé", "a\tb ünd  two  spaces", strings.Repeat("ü", 300)} {
		env, err := h.buildEnvelope(&outMessage{to: []mailAddr{{Addr: "a@example.org"}}, subject: subject, text: "x"}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		head := string(env.Data[:bytes.Index(env.Data, []byte("\r\n\r\n"))])
		i := strings.Index(head, "\r\nSubject:") + 2
		if !strings.HasPrefix(head[i:], "Subject: =?UTF-8?q?") {
			t.Errorf("%q: the subject does not start on its line: %q", subject, head[i:min(len(head), i+40)])
		}
		msg, err := mail.ReadMessage(bytes.NewReader(env.Data))
		if err != nil {
			t.Fatal(err)
		}
		if got, err := new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject")); err != nil || got != subject {
			t.Errorf("%q decodes to %q (%v)", subject, got, err)
		}
		checkHeaderLines(t, env.Data, 78)
	}
}
