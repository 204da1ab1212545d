package authmail

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

const opsKey = "admin-key-0123456789abcdef"

// withAdminKey adds a second key, "ops", with allow admin.
func withAdminKey(t testing.TB) func(*Handler) {
	t.Setenv("AUTHMAIL_UNIT_ADMIN_KEY", opsKey)
	return func(h *Handler) {
		h.Keys = append(h.Keys, Key{ID: "ops", Secret: "{env.AUTHMAIL_UNIT_ADMIN_KEY}", Allow: []string{"admin"}, Rate: "off"})
	}
}

func listIDs(t *testing.T, h *Handler, query string, headers ...string) ([]string, string, map[string]any) {
	t.Helper()
	rec, out := call(t, h, "GET", "/authmail/messages"+query, "", headers...)
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /messages%s: %d %s", query, rec.Code, rec.Body)
	}
	if strings.Contains(rec.Body.String(), "123456") || strings.Contains(rec.Body.String(), "jane") {
		t.Fatalf("the list holds a code or an address: %s", rec.Body)
	}
	var ids []string
	for _, m := range out["messages"].([]any) {
		ids = append(ids, m.(map[string]any)["id"].(string))
	}
	next, _ := out["next_cursor"].(string)
	return ids, next, out
}

// pageAll lists the calling key's messages limit per page, following
// next_cursor to the end, and fails after more than maxPages pages. It
// returns the ids and the cursors it followed.
func pageAll(t *testing.T, h *Handler, limit, maxPages int, headers ...string) (ids, cursors []string) {
	t.Helper()
	cursor := ""
	for pages := 0; ; pages++ {
		q := fmt.Sprintf("?limit=%d", limit)
		if cursor != "" {
			q += "&cursor=" + cursor
		}
		page, next, _ := listIDs(t, h, q, headers...)
		ids = append(ids, page...)
		if next == "" {
			return ids, cursors
		}
		if pages > maxPages {
			t.Fatal("the cursor does not advance")
		}
		cursors = append(cursors, next)
		cursor = next
	}
}

// TestMessagesListPaginatesNewestFirst: a key lists its own messages,
// newest first, paginated by an opaque cursor, filtered by status and
// flow, and never another key's; an admin key sees every key's with the
// key id.
func TestMessagesListPaginatesNewestFirst(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	var refuse atomic.Bool
	srv.SetHooks(smtptest.Hooks{Rcpt: func(to string) error {
		if refuse.Load() {
			return smtpRefusal(550)
		}
		return nil
	}})
	h := provisionedHandler(t, withSMTP(t, srv), withoutLimits, withAdminKey(t))
	var ids []string
	for i := range 5 {
		refuse.Store(i == 2)
		rec, out := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("jane%d@example.org", i)))
		if want := map[bool]int{false: 200, true: 502}[i == 2]; rec.Code != want {
			t.Fatalf("send %d: %d %s", i, rec.Code, rec.Body)
		}
		ids = append(ids, out["id"].(string))
	}
	refuse.Store(false)
	rec, out := call(t, h, "POST", "/authmail/send", `{"to":"jane@example.org","subject":"s","text_body":"b"}`)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	ids = append(ids, out["id"].(string))
	for _, id := range ids {
		waitState(t, h, id, func(s outbox.State) bool { return outbox.IsFinal(s.Status) })
	}
	// newest first, two per page
	got, _ := pageAll(t, h, 2, 5)
	want := []string{ids[5], ids[4], ids[3], ids[2], ids[1], ids[0]}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("pages %v\nwant %v", got, want)
	}
	page, _, out := listIDs(t, h, "?status=failed")
	if fmt.Sprint(page) != fmt.Sprint([]string{ids[2]}) {
		t.Fatalf("failed: %v", page)
	}
	m := out["messages"].([]any)[0].(map[string]any)
	if m["last_error_code"] != "recipient_refused" || m["flow"] != "otp" || m["key_id"] != nil {
		t.Fatalf("failed item %v", m)
	}
	if page, _, _ := listIDs(t, h, "?flow=send"); fmt.Sprint(page) != fmt.Sprint([]string{ids[5]}) {
		t.Fatalf("flow=send: %v", page)
	}
	if page, _, _ := listIDs(t, h, "?since=2999-01-01T00:00:00Z"); len(page) != 0 {
		t.Fatalf("since in the future: %v", page)
	}
	// the admin key sees them all, with the key id; its own list is
	// empty for a non-admin view, so the admin key's list is the proof
	_, _, out = listIDs(t, h, "?limit=200", "Authorization: Bearer "+opsKey)
	if n := len(out["messages"].([]any)); n != 6 || out["messages"].([]any)[0].(map[string]any)["key_id"] != "app" {
		t.Fatalf("admin list: %d %v", n, out["messages"])
	}
	for q, field := range map[string]string{"?status=lost": "status", "?limit=0": "limit", "?limit=201": "limit",
		"?cursor=zz": "cursor", "?since=yesterday": "since", "?order=asc": "order"} {
		rec, out := call(t, h, "GET", "/authmail/messages"+q, "")
		if rec.Code != 422 || out["error_code"] != "invalid_request" || out["field"] != field {
			t.Errorf("%s: %d %s", q, rec.Code, rec.Body)
		}
	}
}

// TestMessagesListCostIsBounded: with filters that match nothing, one
// call reads at most 2×limit batch states and hands back a cursor.
func TestMessagesListCostIsBounded(t *testing.T) {
	h := provisionedHandler(t, withoutLimits)
	for i := range 7 {
		if rec, _ := call(t, h, "POST", "/authmail/send/otp", otp(fmt.Sprintf("jane%d@example.org", i))); rec.Code != 200 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
	}
	msgs, next, err := h.engine.ListMessages(context.Background(), outbox.ListQuery{Limit: 1, Status: outbox.Failed, May: everything})
	if err != nil || len(msgs) != 0 || next == "" {
		t.Fatalf("%v %q %v", msgs, next, err)
	}
	// resumed from the cursor, it scans on and ends
	seen := 2
	for next != "" {
		msgs, next, err = h.engine.ListMessages(context.Background(), outbox.ListQuery{Limit: 1, Status: outbox.Failed, May: everything, After: next})
		if err != nil || len(msgs) != 0 {
			t.Fatal(msgs, err)
		}
		seen += 2
		if seen > 10 {
			t.Fatal("the scan does not end")
		}
	}
}

func everything(outbox.State) bool { return true }

// TestRetryRequeuesFailedMessage: a failed message is put back in the
// queue once and delivered; a second retry of a sent message is 409,
// another key's message 404, and after the replay window 410.
func TestRetryRequeuesFailedMessage(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	var refuse atomic.Bool
	refuse.Store(true)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error {
		if refuse.Load() {
			return smtpRefusal(550)
		}
		return nil
	}})
	h := provisionedHandler(t, withSMTP(t, srv), withoutLimits, withAdminKey(t),
		withDelivery(func(d *Delivery) { d.ReplayWindow = caddy.Duration(time.Hour) }))
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 502 || out["status"] != "failed" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	// retired: final in storage, nobody owns it; the body stays
	bid := outbox.BatchOf(id)
	deadline := time.Now().Add(5 * time.Second)
	for h.engine.Storage().Exists(context.Background(), outbox.OwnKey(h.engine.Instance(), bid)) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !h.engine.Storage().Exists(context.Background(), outbox.KeySeg+bid) {
		t.Fatal("the body was deleted despite the replay window")
	}
	rec, _ = call(t, h, "POST", "/authmail/messages/"+id+"/retry", "", "Authorization: Bearer nope-nope-nope-nope")
	if rec.Code != 401 {
		t.Fatalf("no key: %d", rec.Code)
	}
	refuse.Store(false)
	rec, out = call(t, h, "POST", "/authmail/messages/"+id+"/retry", "")
	if rec.Code != 202 || out["status"] != "queued" || out["id"] != id || rec.Header().Get("Location") != "/authmail/messages/"+id || out["warning"] != nil {
		t.Fatalf("retry: %d %s", rec.Code, rec.Body)
	}
	st := waitState(t, h, id, status(outbox.Sent))
	if st.Attempts != 2 {
		t.Fatalf("attempts %d", st.Attempts)
	}
	if msgs := srv.WaitMessages(1, 5*time.Second); len(msgs) != 1 || !strings.Contains(string(msgs[0].Data), "123456") {
		t.Fatalf("%d messages delivered", len(msgs))
	}
	rec, out = call(t, h, "POST", "/authmail/messages/"+id+"/retry", "")
	if rec.Code != 409 || out["error_code"] != "not_retryable" {
		t.Fatalf("retry of a sent message: %d %s", rec.Code, rec.Body)
	}
	rec, out = call(t, h, "POST", "/authmail/messages/"+strings.Repeat("0", 28)+"/retry", "")
	if rec.Code != 404 || out["error_code"] != "not_found" {
		t.Fatalf("unknown id: %d %s", rec.Code, rec.Body)
	}
	rec, _ = call(t, h, "GET", "/authmail/messages/"+id+"/retry", "")
	if rec.Code != 405 || rec.Header().Get("Allow") != "POST" {
		t.Fatalf("GET retry: %d", rec.Code)
	}

	// a second failed message: past the replay window its body is gone
	refuse.Store(true)
	rec, out = call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 502 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id2 := out["id"].(string)
	waitState(t, h, id2, status(outbox.Failed))
	deadline = time.Now().Add(5 * time.Second)
	for h.engine.Storage().Exists(context.Background(), outbox.OwnKey(h.engine.Instance(), outbox.BatchOf(id2))) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cfg := *h.engine.Config()
	cfg.ReplayWindow = time.Nanosecond
	h.engine.SetConfig(&cfg)
	rec, out = call(t, h, "POST", "/authmail/messages/"+id2+"/retry", "")
	if rec.Code != 410 || out["error_code"] != "body_gone" {
		t.Fatalf("after the window: %d %s", rec.Code, rec.Body)
	}
	// the janitor deletes the body once the window passed
	h.engine.Janitor(context.Background())
	if h.engine.Storage().Exists(context.Background(), outbox.KeySeg+outbox.BatchOf(id2)) {
		t.Fatal("the janitor kept a body past the replay window")
	}
}

// TestRetryFromPreviewForm: the preview page's retry button posts with
// Basic credentials; they count only from a same-origin form, so another
// site cannot make a browser retry messages.
func TestRetryFromPreviewForm(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpRefusal(550) }})
	h := provisionedHandler(t, withSMTP(t, srv), withoutLimits, withAdminKey(t),
		withDelivery(func(d *Delivery) { d.ReplayWindow = caddy.Duration(time.Hour) }))
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 502 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	waitState(t, h, id, status(outbox.Failed))
	srv.SetHooks(smtptest.Hooks{})
	form := func(site string) *http.Request {
		req := apiRequest("POST", "/authmail/messages/"+id+"/retry", nil, "Content-Type: application/x-www-form-urlencoded", "Sec-Fetch-Site: "+site)
		req.Header.Del("Authorization")
		req.SetBasicAuth("", opsKey)
		return req
	}
	if rec, _ := serveRequest(t, h, form("cross-site")); rec.Code != 401 {
		t.Fatalf("cross-site form: %d %s", rec.Code, rec.Body)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		rec, _ = serveRequest(t, h, form("same-origin"))
		if rec.Code != 409 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if rec.Code != 303 || rec.Header().Get("Location") != "/authmail/preview#outbox" {
		t.Fatalf("same-origin form: %d %v %s", rec.Code, rec.Header(), rec.Body)
	}
	waitState(t, h, id, status(outbox.Sent))
}

// TestRetryOtherTenant: another key's message is not found; an admin
// key may retry it.
func TestRetryOtherTenant(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(string) error { return smtpRefusal(550) }})
	h := provisionedHandler(t, withSMTP(t, srv), withoutLimits, withAdminKey(t), func(h *Handler) {
		t.Setenv("AUTHMAIL_UNIT_KEY3", "third-key-0123456789abcdef")
		h.Keys = append(h.Keys, Key{ID: "third", Secret: "{env.AUTHMAIL_UNIT_KEY3}", Rate: "off"})
	}, withDelivery(func(d *Delivery) { d.ReplayWindow = caddy.Duration(time.Hour) }))
	rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 502 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	waitState(t, h, id, status(outbox.Failed))
	rec, out = call(t, h, "POST", "/authmail/messages/"+id+"/retry", "", "Authorization: Bearer third-key-0123456789abcdef")
	if rec.Code != 404 || out["error_code"] != "not_found" {
		t.Fatalf("other key: %d %s", rec.Code, rec.Body)
	}
	if ids, _, _ := listIDs(t, h, "", "Authorization: Bearer third-key-0123456789abcdef"); len(ids) != 0 {
		t.Fatalf("another key lists %v", ids)
	}
	srv.SetHooks(smtptest.Hooks{})
	deadline := time.Now().Add(5 * time.Second)
	for {
		rec, out = call(t, h, "POST", "/authmail/messages/"+id+"/retry", "", "Authorization: Bearer "+opsKey)
		if rec.Code != 409 || out["error_code"] != "retry_later" || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if rec.Code != 202 {
		t.Fatalf("admin retry: %d %s", rec.Code, rec.Body)
	}
	waitState(t, h, id, status(outbox.Sent))
}

// TestReplayWindowConfig: replay_window may not outlive the status
// record it is read through.
func TestReplayWindowConfig(t *testing.T) {
	h := &Handler{From: "no-reply@example.com", Capture: "/tmp/x", Keys: []Key{{ID: "app", Secret: unitKey}},
		Delivery: &Delivery{ReplayWindow: caddy.Duration(8 * 24 * time.Hour)}}
	if err := h.checkConfig(); err == nil || !strings.Contains(err.Error(), "replay_window must not be longer than retention") {
		t.Fatalf("%v", err)
	}
}
