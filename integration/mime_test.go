package integration

import (
	"bytes"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"strings"
	"testing"
)

// parsed is a received message with its headers and decoded parts.
type parsed struct {
	header  mail.Header
	subject string
	types   []string // content types: the top level first, then each part
	text    string
	html    string
}

func parseMail(t *testing.T, raw []byte) parsed {
	t.Helper()
	if bytes.Contains(bytes.ReplaceAll(raw, []byte("\r\n"), nil), []byte("\n")) {
		t.Fatal("message has bare LF line endings")
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("message does not parse: %v", err)
	}
	p := parsed{header: msg.Header}
	if p.subject, err = new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject")); err != nil {
		t.Fatal(err)
	}
	decode := func(enc string, r io.Reader) string {
		if strings.EqualFold(enc, "quoted-printable") {
			r = quotedprintable.NewReader(r)
		}
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		return strings.ReplaceAll(string(b), "\r\n", "\n")
	}
	ct := msg.Header.Get("Content-Type")
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil {
		t.Fatal(err)
	}
	p.types = append(p.types, mt)
	if !strings.HasPrefix(mt, "multipart/") {
		body := decode(msg.Header.Get("Content-Transfer-Encoding"), msg.Body)
		if mt == "text/html" {
			p.html = body
		} else {
			p.text = body
		}
		return p
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for {
		part, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		pt := part.Header.Get("Content-Type")
		p.types = append(p.types, pt)
		body := decode(part.Header.Get("Content-Transfer-Encoding"), part)
		switch {
		case strings.HasPrefix(pt, "text/plain"):
			p.text = body
		case strings.HasPrefix(pt, "text/html"):
			p.html = body
		}
	}
	return p
}

func headerOf(t *testing.T, raw []byte, name string) string {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("message does not parse: %v", err)
	}
	return msg.Header.Get(name)
}

// checkStandardHeaders asserts the headers every message carries, and
// the ones no message may carry.
func checkStandardHeaders(t *testing.T, p parsed) {
	t.Helper()
	if p.header.Get("From") != `"Example App" <no-reply@example.com>` {
		t.Errorf("From %q", p.header.Get("From"))
	}
	if p.header.Get("Mime-Version") != "1.0" {
		t.Errorf("MIME-Version %q", p.header.Get("Mime-Version"))
	}
	if _, err := p.header.Date(); err != nil {
		t.Errorf("Date: %v", err)
	}
	if id := p.header.Get("Message-Id"); !strings.HasSuffix(id, "@example.com>") || !strings.HasPrefix(id, "<") {
		t.Errorf("Message-ID %q", id)
	}
	for _, h := range []string{"Bcc", "X-Mailer", "User-Agent", "X-Authmail-Key"} {
		if _, ok := p.header[h]; ok {
			t.Errorf("header %s must not be sent", h)
		}
	}
}

// checkAlternative asserts multipart/alternative with text first.
func checkAlternative(t *testing.T, p parsed) {
	t.Helper()
	want := []string{"multipart/alternative", "text/plain; charset=UTF-8", "text/html; charset=UTF-8"}
	if strings.Join(p.types, "|") != strings.Join(want, "|") {
		t.Errorf("MIME structure %v, want %v", p.types, want)
	}
}
