package authmail

import (
	"bytes"
	"errors"
	"net/mail"
	"slices"
	"testing"
	"time"
)

// FuzzBuiltHeaders puts arbitrary values straight into a message's
// header-bound fields, past every request check, and builds it the way
// every path does (buildEnvelope, and buildUnsigned for the preview):
// either the value is refused there with a headerError, or the message
// has exactly the headers authmail writes — no value, however encoded,
// adds a header line such as Bcc:.
func FuzzBuiltHeaders(f *testing.F) {
	for _, s := range [][4]string{
		{"Your code", "Jane", "Ops", "<https://app.example.com/u?t=1>"},
		{"x\r\nBcc: loot@attacker.example", "=?UTF-8?B?DQpCY2M6IGxvb3RAYXR0YWNrZXIuZXhhbXBsZQ==?=", "a\u2028b", "<mailto:u@example.com?subject==?UTF-8?Q?x=0D=0ABcc:_x?=>"},
		{"=?utf-8?q?a=0D=0AB?=", "\"\r\nBcc: x\" <y>", "=?iso-8859-1?q?=0A?=", "<https://a.example/\r\nBcc: x>"},
		{"=?UTF-7?B?K0FBMEFDZy0=?=", "\x85name", "=?utf-8?b?=?utf-8?b?DQo=?=?=", "List-Unsubscribe=One-Click"},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	h := provisionedHandler(f)
	want := []string{"Content-Transfer-Encoding", "Content-Type", "Date", "From", "Message-Id", "Mime-Version", "Subject", "To"}
	f.Fuzz(func(t *testing.T, subject, name, ccName, unsub string) {
		m := &outMessage{flow: "send", to: []mailAddr{{Addr: "a@example.com", Name: name}}, cc: []mailAddr{{Addr: "c@example.com", Name: ccName}},
			subject: subject, text: "x", listUnsub: unsub}
		for _, build := range []func(*outMessage, time.Time) ([]byte, error){
			func(m *outMessage, now time.Time) ([]byte, error) {
				env, err := h.buildEnvelope(m, now)
				if err != nil {
					return nil, err
				}
				return env.Data, nil
			},
			func(m *outMessage, now time.Time) ([]byte, error) {
				env, err := h.buildUnsigned(m, now)
				if err != nil {
					return nil, err
				}
				return env.Data, nil
			},
		} {
			data, err := build(m, time.Now())
			var he *headerError
			if errors.As(err, &he) {
				if headerValueProblem(subject) == "" && headerValueProblem(name) == "" && headerValueProblem(ccName) == "" && headerValueProblem(unsub) == "" {
					t.Fatalf("refused values that pass the check: %v", err)
				}
				continue
			}
			if err != nil {
				// go-mail refuses some values itself; never with a header written
				continue
			}
			msg, err := mail.ReadMessage(bytes.NewReader(data))
			if err != nil {
				t.Fatalf("the built message does not parse: %v\n%q", err, data)
			}
			var got []string
			for k := range msg.Header {
				got = append(got, k)
			}
			slices.Sort(got)
			extra := slices.DeleteFunc(slices.Clone(got), func(k string) bool {
				return slices.Contains(want, k) || k == "Cc" || k == "List-Unsubscribe"
			})
			if len(extra) > 0 {
				t.Fatalf("a value added headers %v:\n%q", extra, data)
			}
			for _, k := range got {
				if len(msg.Header[k]) != 1 {
					t.Fatalf("header %s appears %d times:\n%q", k, len(msg.Header[k]), data)
				}
			}
		}
	})
}
