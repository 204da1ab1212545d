package authmail

import (
	"net/url"
	"testing"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// FuzzConsoleQueries feeds arbitrary query strings to the parsers of
// GET /messages and GET /preview: each is accepted or refused with a 422
// naming a field, never a panic; an accepted cursor names a message id.
func FuzzConsoleQueries(f *testing.F) {
	for _, s := range []string{
		"status=failed&flow=otp&limit=20",
		"since=2026-01-02T15:04:05z&cursor=MDZoM3FoODRlZDh6eGJwZ2p3Z3g4YjhkNDAw",
		"limit=-1&limit=5", "cursor=%ff%fe", "status=", "order=asc",
		"flow=otp&user_name=%3Cscript%3E&code=1",
		"event=new_login&ip=::1&user_agent=x&location=%E2%80%A8",
		"email=Jane%20%3Cjane@example.com%3E&token=a%0Ab",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		q, err := url.ParseQuery(s)
		if err != nil {
			return
		}
		if lq, aerr := parseListQuery(q); aerr != nil {
			if aerr.Status != 422 || aerr.Field == "" {
				t.Fatalf("list %q: %+v", s, aerr)
			}
		} else if lq.After != "" && outbox.BatchOf(lq.After) == "" || lq.Limit < 1 || lq.Limit > maxListLimit {
			t.Fatalf("list %q: accepted %+v", s, lq)
		}
		if _, flows, aerr := parsePreviewQuery(q); aerr != nil {
			if aerr.Status != 422 || aerr.Field == "" {
				t.Fatalf("preview %q: %+v", s, aerr)
			}
		} else if len(flows) == 0 {
			t.Fatalf("preview %q: no flows", s)
		}
	})
}
