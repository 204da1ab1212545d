package authmail

import (
	"context"
	"crypto/sha256"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
)

// keyRL and limiterState are internal/ratelimit's storage layout (the
// package pins it), as these tests write and read it.
const keyRL = "authmail/rl/"

type limiterState struct {
	Instance string             `json:"instance"`
	Updated  time.Time          `json:"updated"`
	Events   map[string][]int64 `json:"events"`
}

// TestLimitsAreSharedAcrossInstances: two instances sharing a storage
// publish their events, so a recipient limit holds across the cluster.
func TestLimitsAreSharedAcrossInstances(t *testing.T) {
	forEachStorage(t, testLimitsAreSharedAcrossInstances)
}

func testLimitsAreSharedAcrossInstances(t *testing.T) {
	old := limitSyncInterval
	limitSyncInterval = 30 * time.Millisecond
	t.Cleanup(func() { limitSyncInterval = old })
	shared := t.TempDir()
	limit := func(h *Handler) { h.RecipientRate = map[string]string{"otp": "3/1m"} }
	a := newInstance(t, shared).handler(limit)
	b := newInstance(t, shared).handler(limit)
	a.shared.Start()
	b.shared.Start()
	if a.shared.limits.Hash("x") != b.shared.limits.Hash("x") {
		t.Fatal("instances sharing a storage must share the hashing salt")
	}
	for i, h := range []*Handler{a, b, a} {
		if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("shared@example.org")); rec.Code != 200 {
			t.Fatalf("message %d: %d %s", i, rec.Code, rec.Body)
		}
		time.Sleep(150 * time.Millisecond) // a sync round
	}
	for _, h := range []*Handler{a, b} {
		if rec, out := call(t, h, "POST", "/authmail/send/otp", otp("shared@example.org")); rec.Code != 429 || out["error_code"] != "recipient_rate_limited" {
			t.Fatalf("4th message through an instance: %d %s", rec.Code, rec.Body)
		}
	}
	// the published state holds hashes, never the address
	raw, err := a.engine.Storage().Load(context.Background(), keyRL+a.engine.Instance())
	if err != nil || strings.Contains(string(raw), "shared@example.org") || strings.Contains(string(raw), "127.0.0.1") {
		t.Fatalf("published limiter state: %v %s", err, raw)
	}
}

func TestLinkExtraction(t *testing.T) {
	got := htmlLinks(`<a href="https://a.example/x">x</a><IMG SRC='https://b.example/i.png'>
		<img srcset="https://c.example/1.png 1x, https://d.example/2.png 2x"><form action="/rel"></form>
		<video poster="https://e.example/p.jpg"></video><a name="n">no link</a><td background="https://f.example/bg">`)
	want := []string{"https://a.example/x", "https://b.example/i.png", "https://c.example/1.png", "https://d.example/2.png", "/rel", "https://e.example/p.jpg", "https://f.example/bg"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("htmlLinks = %q\nwant %q", got, want)
	}
	got = textLinks("Go to https://a.example/x?y=1. Or (https://b.example/p), www.c.example/page; ftp://d.example/f and mail me@e.example")
	want = []string{"https://a.example/x?y=1", "https://b.example/p", "https://www.c.example/page", "ftp://d.example/f"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("textLinks = %q\nwant %q", got, want)
	}
	// links outside URL attributes: conditional comments (Outlook renders
	// them), text (clients and the derived text part make links of it),
	// CSS, meta refresh, other attributes; DOCTYPE and xmlns are schemas
	got = htmlLinks(`<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">
		<html xmlns="http://www.w3.org/1999/xhtml" xmlns:v="urn:schemas-microsoft-com:vml">
		<!--[if mso]><a href="https://a.example/mso">Click</a><![endif]-->
		<p>Reset at https://b.example/login</p><style>td{background:url(https://c.example/bg.png)}</style>
		<meta http-equiv="refresh" content="0;url=https://d.example/r"><div style="background-image:url('https://e.example/i')">
		<object data="https://f.example/o"></object><p title="x">plain text, no link</p>`)
	want = []string{"https://a.example/mso", "https://b.example/login", "https://c.example/bg.png", "https://d.example/r", "https://e.example/i", "https://f.example/o"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("htmlLinks (outside URL attributes) = %q\nwant %q", got, want)
	}
	// a URL ends at Unicode spaces too, and needs no word boundary before
	// its scheme
	got = textLinks("https://app.example.com/\u00a0https://a.example/x https://app.example.com/\u3000https://b.example/ Reset:_https://c.example/")
	want = []string{"https://app.example.com/", "https://a.example/x", "https://app.example.com/", "https://b.example/", "https://c.example/"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("textLinks (glued) = %q\nwant %q", got, want)
	}
	allowed := []string{"https://app.example.com"}
	for link, want := range map[string]string{
		"https://app.example.com/x": "", "https://APP.example.com:443/": "", "#top": "", "": "", "mailto:a@b.c": "", "cid:logo": "", "tel:+123": "",
		"https://evil.example/": "https://evil.example", "http://app.example.com/": "http://app.example.com",
		"//evil.example/x": "https://evil.example", "javascript:alert(1)": "a javascript: URL", "data:text/html,x": "a data: URL",
		"/relative": "a relative URL (/relative), which has no meaning in an email", "https://app.example.com.evil.example/": "https://app.example.com.evil.example",
	} {
		if got := linkVerdict(link, allowed); got != want {
			t.Errorf("linkVerdict(%q) = %q, want %q", link, got, want)
		}
	}
}

func TestInvalidUTF8Field(t *testing.T) {
	for body, want := range map[string]string{
		"{\"to\":\"a\",\"subject\":\"caf\xe9\"}":                      "subject",
		"{\"to\":[\"ok\",\"\xff\"],\"x\":1}":                          "to",
		"{\"a\":{\"b\":\"\xff\"}}":                                    "a",
		"{\"k\xff\":1}":                                               "k\ufffd",
		"{\"to\":\"a\", \"n\": 5, \"html_body\":\"<p>\xc3\x28</p>\"}": "html_body",
		"\xff": "",
	} {
		if got := invalidUTF8Field([]byte(body)); got != want {
			t.Errorf("invalidUTF8Field(%q) = %q, want %q", body, got, want)
		}
	}
}

func TestMaskUser(t *testing.T) {
	for in, want := range map[string]string{"you@gmail.com": "you***ail.com", "mailer": "m***", "": "", "apikey": "a***",
		"postmaster@mail.example.com": "pos***ple.com", "ab@cdefghij": "ab@***fghij",
		"3f1c2a9e-5b7d-4c8e-9f01-23456789abcd": "3f1***", "mailer-prod": "mai***"} {
		if got := maskUser(in); got != want {
			t.Errorf("maskUser(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestHashedKeySecret(t *testing.T) {
	// sha256 of "0123456789abcdef0123"
	h := provisionedHandler(t, func(h *Handler) {
		h.Keys = []Key{{ID: "hashed", Secret: "sha256:A0B1D0AE4DCF5B1C0A93ABFE70C9D2A04C35DDA33ACF7F4A6F77E0C01F5B1E6A"}}
	})
	sum := fmt.Sprintf("%x", sha256Sum("0123456789abcdef0123"))
	h2 := provisionedHandler(t, func(h *Handler) { h.Keys = []Key{{ID: "hashed", Secret: "sha256:" + strings.ToUpper(sum)}} })
	if rec, _ := call(t, h2, "POST", "/authmail/send/otp", otp("a@example.org")); rec.Code != 200 {
		t.Fatalf("hashed secret: %d %s", rec.Code, rec.Body)
	}
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("a@example.org")); rec.Code != 401 {
		t.Fatalf("a wrong hash authenticated: %d", rec.Code)
	}
}

func sha256Sum(s string) [32]byte { return sha256.Sum256([]byte(s)) }

// TestLimitSyncIgnoresWritesInProgress: file storage writes a key to a
// temporary file named with digits, in the key's directory, and renames
// it; a listing can catch that file. Found by
// TestLimitsAreSharedAcrossInstances failing now and then: a peer's
// state read a second time under its temporary name counted its events
// twice, and a recipient got 429 one message early. Such names, and
// states stored under a name that is not theirs, are not peers.
func TestLimitSyncIgnoresWritesInProgress(t *testing.T) {
	forEachStorage(t, testLimitSyncIgnoresWritesInProgress)
}

func testLimitSyncIgnoresWritesInProgress(t *testing.T) {
	h := provisionedHandler(t, func(h *Handler) { h.RecipientRate = map[string]string{"otp": "2/1m"} })
	e := h.engine
	h.shared.Start() // loads the cluster's hashing salt
	ctx := context.Background()
	key := "r:otp:" + h.shared.limits.Hash("jane@example.org")
	now := time.Now()
	peer := limiterState{Instance: "5f0c4a52-2b8e-4d7c-9a51-0c1f3b7e2d44", Updated: now, Events: map[string][]int64{key: {now.UnixMilli()}}}
	for _, name := range []string{peer.Instance, "2318229907", "renamed-copy"} {
		if err := outbox.PutJSON(ctx, e.Storage(), keyRL+name, peer); err != nil {
			t.Fatal(err)
		}
	}
	if err := outbox.PutJSON(ctx, e.Storage(), outbox.KeyInst+"2318229907", outbox.Heartbeat{Instance: peer.Instance, Updated: now}); err != nil {
		t.Fatal(err)
	}
	h.shared.syncLimits(ctx)
	// one event of the peer plus one here is the limit (2/1m): the first
	// message goes out, the second is refused, never the first
	if rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org")); rec.Code != 200 {
		t.Fatalf("first message: %d %v", rec.Code, out)
	}
	if rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org")); rec.Code != 429 || out["error_code"] != "recipient_rate_limited" {
		t.Fatalf("second message: %d %v", rec.Code, out)
	}
	ids, err := store{s: e.Storage()}.instances(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if outbox.StorageTempName(id) {
			t.Fatalf("instances lists the temporary name %q: %v", id, ids)
		}
	}
}

// TestPublishedAuthFailuresAreBounded: failed authentication can come
// from any number of addresses; an instance publishes only the clients
// with the most failures, and every other limit in full.
func TestPublishedAuthFailuresAreBounded(t *testing.T) {
	h := provisionedHandler(t)
	e := h.engine
	h.shared.Start()
	now := time.Now()
	spec := ratelimit.Spec{N: 10, Window: time.Minute}
	for i := range maxPublishedAuthFailures + 500 {
		h.shared.limits.Record(fmt.Sprintf("a:client-%d", i), spec, now)
	}
	for i := range 3 { // the worst offender
		h.shared.limits.Record("a:client-7", spec, now.Add(time.Duration(i+1)*time.Millisecond))
	}
	h.shared.limits.Record("k:app", spec, now)
	h.shared.syncLimits(context.Background())
	var ps limiterState
	if err := outbox.GetJSON(context.Background(), e.Storage(), keyRL+e.Instance(), &ps); err != nil {
		t.Fatal(err)
	}
	auth := 0
	for k := range ps.Events {
		if strings.HasPrefix(k, "a:") {
			auth++
		}
	}
	if auth != maxPublishedAuthFailures || len(ps.Events["a:client-7"]) != 4 || len(ps.Events["k:app"]) != 1 {
		t.Errorf("published %d auth-failure subjects (want %d), worst offender %v, key events %v", auth, maxPublishedAuthFailures, ps.Events["a:client-7"], ps.Events["k:app"])
	}
}

func TestAuthFailureSubject(t *testing.T) {
	for in, want := range map[string]string{
		"203.0.113.5": "203.0.113.5", "::ffff:203.0.113.5": "203.0.113.5", "2001:db8:1:2:3:4:5:6": "2001:db8:1:2::/64",
		"fe80::1%eth0": "fe80::/64", "not-an-ip": "not-an-ip",
	} {
		if got := authFailureSubject(in); got != want {
			t.Errorf("authFailureSubject(%q) = %q, want %q", in, got, want)
		}
	}
}
