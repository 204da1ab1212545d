// Package mailtest parses RFC 5322 messages for tests and for the preview
// page's dev mailbox (captured .eml files): headers, the
// decoded subject, and every MIME part decoded from quoted-printable.
package mailtest

import (
	"bytes"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"strings"
)

// Part is one decoded body part.
type Part struct {
	ContentType string
	// Body is decoded, with CRLF line endings kept as sent.
	Body string
}

// Message is a parsed message.
type Message struct {
	Header  mail.Header
	Subject string
	// Types lists the top-level content type, then each part's.
	Types []string
	Parts []Part
	// Text and HTML are the text/plain and text/html bodies with line
	// endings normalised to LF.
	Text, HTML string
}

// Parse parses raw. It refuses bare LF line endings.
func Parse(raw []byte) (*Message, error) {
	if bytes.Contains(bytes.ReplaceAll(raw, []byte("\r\n"), nil), []byte("\n")) {
		return nil, errors.New("message has bare LF line endings")
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		return nil, err
	}
	m := &Message{Header: msg.Header}
	if m.Subject, err = new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject")); err != nil {
		return nil, err
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		return nil, err
	}
	m.Types = append(m.Types, mt)
	if !strings.HasPrefix(mt, "multipart/") {
		body, err := decode(msg.Header.Get("Content-Transfer-Encoding"), msg.Body)
		if err != nil {
			return nil, err
		}
		m.add(Part{mt, body})
		return m, nil
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for {
		p, err := mr.NextRawPart()
		if err == io.EOF {
			return m, nil
		}
		if err != nil {
			return nil, err
		}
		body, err := decode(p.Header.Get("Content-Transfer-Encoding"), p)
		if err != nil {
			return nil, err
		}
		ct := p.Header.Get("Content-Type")
		m.Types = append(m.Types, ct)
		m.add(Part{ct, body})
	}
}

func (m *Message) add(p Part) {
	m.Parts = append(m.Parts, p)
	lf := strings.ReplaceAll(p.Body, "\r\n", "\n")
	switch {
	case strings.HasPrefix(p.ContentType, "text/plain"):
		m.Text = lf
	case strings.HasPrefix(p.ContentType, "text/html"):
		m.HTML = lf
	}
}

func decode(enc string, r io.Reader) (string, error) {
	if strings.EqualFold(enc, "quoted-printable") {
		r = quotedprintable.NewReader(r)
	}
	b, err := io.ReadAll(r)
	return string(b), err
}
