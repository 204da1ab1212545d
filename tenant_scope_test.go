package authmail

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/redistest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// siteBKey is the secret of site B's key, which site B also calls "app".
const siteBKey = "site-b-app-key-0123456789"

// twoSites provisions site A (keys app and the admin ops) and site B
// (its own key, also named app) on one instance, sharing one storage, as
// two site blocks of one Caddy with the default storage are. Every RCPT
// is refused while refuse is set, so that messages end failed.
func twoSites(t *testing.T, open func() certmagic.Storage, modsA ...func(*Handler)) (a, b *Handler, srv *smtptest.Server, refuse *atomic.Bool) {
	t.Helper()
	srv = authServer(t, smtptest.StartTLS)
	refuse = &atomic.Bool{}
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error {
		if refuse.Load() {
			return smtpRefusal(550)
		}
		return nil
	}})
	in := newInstance(t, "")
	replay := withDelivery(func(d *Delivery) { d.ReplayWindow = caddy.Duration(time.Hour) })
	a = in.handler(append([]func(*Handler){withSMTP(t, srv), withoutLimits, withAdminKey(t), replay,
		func(h *Handler) { h.storageOverride = open() }}, modsA...)...)
	t.Setenv("AUTHMAIL_UNIT_SITE_B_KEY", siteBKey)
	b = in.handler(withSMTP(t, srv), withoutLimits, replay, func(h *Handler) {
		h.storageOverride = open()
		h.Keys = []Key{{ID: "app", Secret: "{env.AUTHMAIL_UNIT_SITE_B_KEY}", Rate: "off"}}
	})
	return a, b, srv, refuse
}

// sendFailed sends an OTP that the server refuses and waits for it to be
// failed.
func sendFailed(t *testing.T, h *Handler, to string, headers ...string) string {
	t.Helper()
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp(to), headers...)
	if rec.Code != http.StatusBadGateway {
		t.Fatalf("send to %s: %d %s", to, rec.Code, rec.Body)
	}
	id := out["id"].(string)
	waitState(t, h, id, status(outbox.Failed))
	return id
}

// TestAdminKeyStaysInItsSite: an admin key lists, reads and retries the
// messages of its own site's keys only, on file storage and on Redis:
// another site's message sharing the storage is "not found" for it,
// exactly like an id that never existed. admin_scope storage grants the
// whole storage, as documented.
func TestAdminKeyStaysInItsSite(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		a, b, _, refuse := twoSites(t, open)
		refuse.Store(true)
		idA := sendFailed(t, a, "ann@example.org")
		idB := sendFailed(t, b, "bob@example.org", "Authorization: Bearer "+siteBKey)
		refuse.Store(false)

		admin := "Authorization: Bearer " + opsKey
		ids, _, _ := listIDs(t, a, "?limit=200", admin)
		if !slices.Contains(ids, idA) || slices.Contains(ids, idB) {
			t.Fatalf("site A's admin lists %v; want %s and not site B's %s", ids, idA, idB)
		}
		notFound := `{"error_code":"not_found","message":"no message with this id for this key"}` + "\n"
		rec, _ := call(t, a, "GET", "/authmail/messages/"+idB, "", admin)
		if rec.Code != 404 || rec.Body.String() != notFound {
			t.Fatalf("site A's admin reads site B's message: %d %s", rec.Code, rec.Body)
		}
		rec, _ = call(t, a, "POST", "/authmail/messages/"+idB+"/retry", "", admin)
		if rec.Code != 404 || rec.Body.String() != notFound {
			t.Fatalf("site A's admin retries site B's message: %d %s", rec.Code, rec.Body)
		}
		if st, _, _ := a.engine.Lookup(t.Context(), idB); st.Status != outbox.Failed {
			t.Fatalf("site B's message is %s after site A's retry, want failed", st.Status)
		}
		// site A's own app key: same id as site B's, another secret
		if ids, _, _ := listIDs(t, a, "?limit=200"); fmt.Sprint(ids) != fmt.Sprint([]string{idA}) {
			t.Fatalf("site A's app lists %v, want [%s]", ids, idA)
		}
		// the admin key reads and retries its own site's message
		if rec, _ := call(t, a, "GET", "/authmail/messages/"+idA, "", admin); rec.Code != 200 {
			t.Fatalf("site A's admin reads site A's message: %d %s", rec.Code, rec.Body)
		}
		retry(t, a, idA, admin)
		waitState(t, a, idA, status(outbox.Sent))

		// admin_scope storage: the whole storage, site B's message too
		wide := newInstance(t, "").handler(withoutLimits, withAdminKey(t), func(h *Handler) {
			h.storageOverride = open()
			h.AdminScope = adminScopeStorage
		})
		ids, _, _ = listIDs(t, wide, "?limit=200", admin)
		if !slices.Contains(ids, idB) || !slices.Contains(ids, idA) {
			t.Fatalf("admin_scope storage lists %v; want %s and %s", ids, idA, idB)
		}
		if rec, _ := call(t, wide, "GET", "/authmail/messages/"+idB, "", admin); rec.Code != 200 {
			t.Fatalf("admin_scope storage reads site B's message: %d %s", rec.Code, rec.Body)
		}
	})
}

// retry retries a message until its batch has no work in progress.
func retry(t *testing.T, h *Handler, id string, headers ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		rec, out := call(t, h, "POST", "/authmail/messages/"+id+"/retry", "", headers...)
		if rec.Code == http.StatusAccepted {
			return
		}
		if rec.Code != 409 || out["error_code"] != "retry_later" || time.Now().After(deadline) {
			t.Fatalf("retry %s: %d %s", id, rec.Code, rec.Body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMessagesCursorIsSealed: a /messages cursor shows no message id,
// another tenant's least of all (the list's read budget can stop on one),
// opens only for the key it was made for, and cannot be edited; paging
// through it lists the key's own messages only.
func TestMessagesCursorIsSealed(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		a, b, _, _ := twoSites(t, open)
		rec, out := call(t, a, "POST", "/authmail/send/otp", otp("ann@example.org"))
		if rec.Code != 200 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		mine := out["id"].(string)
		var theirs []string
		for i := range 4 {
			rec, out := call(t, b, "POST", "/authmail/send/otp", otp(fmt.Sprintf("bob%d@example.org", i)), "Authorization: Bearer "+siteBKey)
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			theirs = append(theirs, out["id"].(string))
		}
		for _, id := range append([]string{mine}, theirs...) {
			waitState(t, a, id, func(s outbox.State) bool { return outbox.IsFinal(s.Status) })
		}
		// limit=1: the budget of two batch reads is spent on site B's
		// newest batches, and the page ends there
		got, cursors := pageAll(t, a, 1, 10)
		if fmt.Sprint(got) != fmt.Sprint([]string{mine}) {
			t.Fatalf("site A's app pages through %v, want [%s]", got, mine)
		}
		if len(cursors) == 0 {
			t.Fatal("no page ended on the read budget: the test does not reach another tenant's ids")
		}
		for _, c := range cursors {
			raw, _ := base64.RawURLEncoding.DecodeString(c)
			for _, id := range append([]string{mine}, theirs...) {
				for _, s := range []string{id, outbox.BatchOf(id), id[:12]} {
					if strings.Contains(c, s) || strings.Contains(string(raw), s) {
						t.Fatalf("cursor %s shows id %s", c, s)
					}
				}
			}
			// another key's cursor, and an edited one, are refused
			rec, out := call(t, b, "GET", "/authmail/messages?cursor="+c, "", "Authorization: Bearer "+siteBKey)
			if rec.Code != 422 || out["field"] != "cursor" {
				t.Fatalf("site B's key with site A's cursor: %d %s", rec.Code, rec.Body)
			}
			edited := []byte(c)
			edited[len(edited)/2] ^= 1
			if edited[len(edited)/2] == '-'^1 || edited[len(edited)/2] == '_'^1 {
				edited[len(edited)/2] = 'A'
			}
			if rec, out := call(t, a, "GET", "/authmail/messages?cursor="+string(edited), ""); rec.Code != 422 || out["field"] != "cursor" {
				t.Fatalf("an edited cursor: %d %s", rec.Code, rec.Body)
			}
		}
		// the old, readable form of a cursor (an id in base64) is refused
		old := base64.RawURLEncoding.EncodeToString([]byte(theirs[2]))
		if rec, out := call(t, a, "GET", "/authmail/messages?cursor="+old, ""); rec.Code != 422 || out["field"] != "cursor" {
			t.Fatalf("a plain id as cursor: %d %s", rec.Code, rec.Body)
		}
	})
}

// TestDevMailboxIsScoped: the preview page's dev mailbox (capture mode)
// holds live codes and links, so it shows a key only the mail it may
// see: a preview-only key sees none of another key's mail, a key its
// own, and an admin key its site's.
func TestDevMailboxIsScoped(t *testing.T) {
	const ownKey = "own-preview-key-0123456789"
	t.Setenv("AUTHMAIL_UNIT_OWN_KEY", ownKey)
	h := provisionedHandler(t, withoutLimits, withPreviewKey(t), withAdminKey(t), func(h *Handler) {
		h.Keys = append(h.Keys, Key{ID: "own", Secret: "{env.AUTHMAIL_UNIT_OWN_KEY}", Allow: []string{"preview", "otp"}, Rate: "off"})
		h.Keys[len(h.Keys)-2].Allow = []string{"admin", "preview"} // ops
	})
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", `{"to":"jane@example.org","code":"918273"}`); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", `{"to":"joe@example.org","code":"564738"}`, "Authorization: Bearer "+ownKey); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	page := func(secret string) string {
		rec, _ := call(t, h, "GET", "/authmail/preview?flow=otp", "", "Authorization: Bearer "+secret)
		if rec.Code != 200 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		return rec.Body.String()
	}
	for _, c := range []struct {
		who, secret string
		want, not   []string
	}{
		{"a preview-only key", previewKey, nil, []string{"918273", "564738"}},
		{"a key with its own mail", ownKey, []string{"564738"}, []string{"918273"}},
		{"the admin key", opsKey, []string{"918273", "564738"}, nil},
	} {
		p := page(c.secret)
		for _, s := range c.want {
			if !strings.Contains(p, s) {
				t.Errorf("%s does not see code %s in the mailbox", c.who, s)
			}
		}
		for _, s := range c.not {
			if strings.Contains(p, s) {
				t.Errorf("%s sees another key's code %s", c.who, s)
			}
		}
		if want := len(c.want); strings.Count(p, "data-captured=") != want {
			t.Errorf("%s: %d captured messages on the page, want %d", c.who, strings.Count(p, "data-captured="), want)
		}
	}
}

// TestPreviewIsNeverSigned: with DKIM configured, neither the preview
// page nor its .eml download carries a DKIM signature (a preview key
// would otherwise get the production key's signature over text and a
// recipient of its choice); the download says so in a header. Mail that
// is sent is signed.
func TestPreviewIsNeverSigned(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(priv)
	path, _ := pemFile(t, "PRIVATE KEY", der)
	h := provisionedHandler(t, withPreviewKey(t), func(h *Handler) {
		h.DKIM = &DKIM{Domain: "example.com", Selector: "s1", Key: path}
	})
	rec, _ := call(t, h, "GET", "/authmail/preview/otp.eml?email=ceo@victim.example&code=111222&location=x", "", "Authorization: Bearer "+previewKey)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	eml := rec.Body.String()
	if strings.Contains(strings.ToLower(eml), "dkim-signature") {
		t.Fatalf("the preview .eml is DKIM-signed:\n%s", eml)
	}
	if !strings.HasPrefix(eml, previewHeader) {
		t.Fatalf("the preview .eml does not start with %q:\n%s", previewHeader, eml[:min(len(eml), 300)])
	}
	rec, _ = call(t, h, "GET", "/authmail/preview?flow=otp", "", "Authorization: Bearer "+previewKey)
	if strings.Contains(strings.ToLower(rec.Body.String()), "dkim-signature") {
		t.Fatal("the preview page shows a DKIM signature")
	}
	// the mail that is sent is signed
	if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org")); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	mb := h.captured(t.Context(), &h.keys[0], 5)
	if len(mb) != 1 || !strings.Contains(mb[0].Headers, "DKIM-Signature:") {
		t.Fatalf("the sent message is not signed: %+v", mb)
	}
}

// TestPreviewUserNameIsAHeaderValue: the preview's user_name goes into
// the To header, so it gets the send endpoints' check, encoded words
// included: a value that a mail client decodes to a Bcc: line is 422.
func TestPreviewUserNameIsAHeaderValue(t *testing.T) {
	h := provisionedHandler(t, withPreviewKey(t))
	name := "=?UTF-8?B?" + base64.StdEncoding.EncodeToString([]byte("\r\nBcc: loot@attacker.example\r\nX-Evil: 1")) + "?="
	for _, path := range []string{"/authmail/preview/otp.eml", "/authmail/preview"} {
		rec, out := call(t, h, "GET", path+"?user_name="+name, "", "Authorization: Bearer "+previewKey)
		if rec.Code != 422 || out["field"] != "user_name" {
			t.Fatalf("%s: %d %s", path, rec.Code, rec.Body)
		}
	}
	rec, out := call(t, h, "POST", "/authmail/send/otp", fmt.Sprintf(`{"to":"jane@example.org","code":"123456","user_name":%q}`, name))
	if rec.Code != 422 || out["field"] != "user_name" {
		t.Fatalf("/send/otp: %d %s", rec.Code, rec.Body)
	}
}

// TestHeaderValuesAreCheckedWhereMessagesAreBuilt: whatever path builds
// a message, a header value with a line break or an encoded word that
// decodes to one does not get into it.
func TestHeaderValuesAreCheckedWhereMessagesAreBuilt(t *testing.T) {
	h := provisionedHandler(t)
	enc := "=?UTF-8?Q?x=0D=0ABcc:_loot@attacker.example?="
	for _, m := range []*outMessage{
		{to: []mailAddr{{Addr: "a@example.org"}}, subject: "x\r\nBcc: loot@attacker.example", text: "b"},
		{to: []mailAddr{{Addr: "a@example.org"}}, subject: enc, text: "b"},
		{to: []mailAddr{{Addr: "a@example.org", Name: enc}}, subject: "s", text: "b"},
		{to: []mailAddr{{Addr: "a@example.org"}}, cc: []mailAddr{{Addr: "c@example.org", Name: "\u2028x"}}, subject: "s", text: "b"},
		{to: []mailAddr{{Addr: "a@example.org"}}, subject: "s", text: "b", listUnsub: "<mailto:u@example.org?subject=" + enc + ">"},
	} {
		if env, err := h.buildEnvelope(m, time.Now()); err == nil {
			t.Errorf("built a message with a bad header value:\n%s", env.Data)
		}
		if env, err := h.buildUnsigned(m, time.Now()); err == nil {
			t.Errorf("built an unsigned message with a bad header value:\n%s", env.Data)
		}
	}
}

// TestListUnsubscribeRefusesEncodedWordsAndForeignLinks: List-Unsubscribe
// URIs cannot carry an encoded word (a lenient client decodes it to CR LF
// and a Bcc: line), and under link_policy enforce their https URI must be
// on an allowed origin, like the body's links (clients show it as an
// Unsubscribe button).
func TestListUnsubscribeRefusesEncodedWordsAndForeignLinks(t *testing.T) {
	h := provisionedHandler(t, withoutLimits, func(h *Handler) { h.LinkPolicy = "enforce" })
	send := func(list string) (int, map[string]any) {
		body := fmt.Sprintf(`{"to":"jane@example.org","subject":"News","text_body":"Hi","list_unsubscribe":%q}`, list)
		rec, out := call(t, h, "POST", "/authmail/send", body)
		return rec.Code, out
	}
	for _, list := range []string{
		"<https://app.example.com/u?t==?UTF-8?B?" + base64.StdEncoding.EncodeToString([]byte("\r\nBcc: loot@attacker.example")) + "?=>",
		"<mailto:u@example.com?subject==?UTF-8?Q?x=0D=0ABcc:_loot@attacker.example?=>",
		"<https://app.example.com/u?t=1>, <mailto:u@example.com?subject==?utf-8?b?eA==?=>",
	} {
		if code, out := send(list); code != 422 || out["error_code"] != "invalid_request" || out["field"] != "list_unsubscribe" {
			t.Errorf("%s: %d %v", list, code, out)
		}
	}
	code, out := send("<https://evil.example/unsubscribe?u=1>")
	if code != 422 || out["error_code"] != "link_not_allowed" || out["field"] != "list_unsubscribe" ||
		!strings.Contains(fmt.Sprint(out["message"]), "https://evil.example") {
		t.Errorf("a foreign unsubscribe link under link_policy enforce: %d %v", code, out)
	}
	for _, ok := range []string{"<https://app.example.com/unsubscribe?u=1>", "<mailto:unsubscribe@lists.example.net?subject=stop>",
		"<https://app.example.com/u?t=a%3D%3Fb>"} {
		if code, out := send(ok); code != 200 {
			t.Errorf("%s: %d %v", ok, code, out)
		}
	}
}

// TestAdminScopeConfig: admin_scope is site or storage, in the Caddyfile
// and in JSON; anything else fails the load, naming the value.
func TestAdminScopeConfig(t *testing.T) {
	for in, want := range map[string]string{"admin_scope storage": adminScopeStorage, "admin_scope site": adminScopeSite, "": ""} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("authmail {" + minimalBlock + "\n\t" + in + "\n}")); err != nil {
			t.Fatalf("%q: %v", in, err)
		}
		if h.AdminScope != want {
			t.Fatalf("%q: admin_scope %q, want %q", in, h.AdminScope, want)
		}
	}
	var h Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("authmail {" + minimalBlock + "\n\tadmin_scope everything\n}"))
	if err == nil || !strings.Contains(err.Error(), "admin_scope must be site or storage, not 'everything'") {
		t.Fatalf("admin_scope everything: %v", err)
	}
	h = Handler{AdminScope: "all", Capture: t.TempDir(), From: "no-reply@example.com", Keys: []Key{{ID: "app", Secret: unitKey}}}
	if err := h.checkConfig(); err == nil || !strings.Contains(err.Error(), "admin_scope must be site or storage, not 'all'") {
		t.Fatalf("JSON admin_scope all: %v", err)
	}
}
