package authmail

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"net/url"
	"strings"
	"testing"
	"time"

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
	key := fuzzKey("fuzz-key-0123456789abcdef")
	f.Fuzz(func(t *testing.T, s string) {
		q, err := url.ParseQuery(s)
		if err != nil {
			return
		}
		if lq, aerr := parseListQuery(key, q); aerr != nil {
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

func fuzzKey(secret string) *apiKey {
	sum := sha256.Sum256([]byte(secret))
	return &apiKey{id: "app", hash: sum, tenant: tenantOf(sum)}
}

// FuzzCursor: a sealed /messages cursor opens to its position for the
// key it was made for only, shows none of the position's bytes, and any
// change to it (a flipped bit, a cut, bytes appended) makes it refused.
func FuzzCursor(f *testing.F) {
	f.Add(uint16(3), byte(1), []byte{})
	f.Add(uint16(0), byte(0x80), []byte("x"))
	a, b := fuzzKey("key-a-0123456789abcdef"), fuzzKey("key-b-0123456789abcdef")
	pos := outbox.MessageID(outbox.NewID(time.Unix(1767225600, 0)), 2)
	if outbox.BatchOf(pos) == "" {
		f.Fatalf("%s is not a message id", pos)
	}
	f.Fuzz(func(t *testing.T, at uint16, flip byte, tail []byte) {
		c := sealCursor(a, pos)
		if got, err := openCursor(a, c); err != nil || got != pos {
			t.Fatalf("own cursor: %q %v", got, err)
		}
		if _, err := openCursor(b, c); err == nil {
			t.Fatal("another key's cursor opened")
		}
		raw, _ := base64.RawURLEncoding.DecodeString(c)
		if bytes.Contains(raw, []byte(pos[:8])) || strings.Contains(c, pos[:8]) {
			t.Fatalf("the cursor shows the position: %s", c)
		}
		if flip != 0 {
			raw[int(at)%len(raw)] ^= flip
		}
		raw = append(raw, tail...)
		if flip == 0 && len(tail) == 0 {
			return
		}
		if got, err := openCursor(a, base64.RawURLEncoding.EncodeToString(raw)); err == nil {
			t.Fatalf("a changed cursor opened to %q", got)
		}
	})
}
