package authmail

import (
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// TestListStatusFilterNamesEveryState: a status filter that is no state
// is refused with the list of the engine's states, every one of them.
func TestListStatusFilterNamesEveryState(t *testing.T) {
	h := provisionedHandler(t)
	rec, out := call(t, h, http.MethodGet, "/authmail/messages?status=bogus", "")
	msg, _ := out["message"].(string)
	if rec.Code != http.StatusUnprocessableEntity || out["field"] != "status" {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	for _, s := range outbox.AllStates {
		if !strings.Contains(msg, s) {
			t.Errorf("the error does not name the state %s: %q", s, msg)
		}
	}
	if want := "status must be queued, sending, sent, failed, unknown or expired"; msg != want {
		t.Errorf("message %q, want %q", msg, want)
	}
}

// TestCapturedMessageIsSentInItsState: in capture mode the send answer
// names where the message went ("captured"), while the message's state,
// read by id or listed, stays the engine's "sent" with the SMTP response
// "captured", in capture mode as with a server: an app that polls for
// "sent" works the same in development and in production, and a status
// filter finds the message under the state it shows.
func TestCapturedMessageIsSentInItsState(t *testing.T) {
	h := provisionedHandler(t)
	rec, out := call(t, h, http.MethodPost, "/authmail/send/otp", otp("jane@example.org"))
	id, _ := out["id"].(string)
	if rec.Code != http.StatusOK || out["status"] != "captured" || out["sent"] != true || id == "" {
		t.Fatalf("send: %d %s", rec.Code, rec.Body)
	}
	rec, st := call(t, h, http.MethodGet, "/authmail/messages/"+id, "")
	if rec.Code != http.StatusOK || st["status"] != outbox.Sent || st["smtp_response"] != "captured" {
		t.Fatalf("GET /messages/{id}: %d %s", rec.Code, rec.Body)
	}
	for _, q := range []string{"", "?status=sent"} {
		rec, list := call(t, h, http.MethodGet, "/authmail/messages"+q, "")
		msgs, _ := list["messages"].([]any)
		if rec.Code != http.StatusOK || len(msgs) != 1 || msgs[0].(map[string]any)["status"] != outbox.Sent {
			t.Fatalf("GET /messages%s: %d %s", q, rec.Code, rec.Body)
		}
	}
	rec, _ = call(t, h, http.MethodGet, "/authmail/messages?status=captured", "")
	if rec.Code != http.StatusUnprocessableEntity {
		t.Fatalf("?status=captured: %d %s", rec.Code, rec.Body)
	}
}
