package integration

import (
	"fmt"
	"strings"
	"testing"
)

// TestAmbiguousJSONIsRefused: a key given twice, or written in another
// case than the field's name, is refused before anything is checked or
// sent; encoding/json would take the last value, or the case variant,
// after the first one passed review.
func TestAmbiguousJSONIsRefused(t *testing.T) {
	load(t, config{})
	for _, tc := range []struct{ path, body, field string }{
		{"/authmail/send", `{"to":"checked@example.org","to":"other@evil.example","subject":"s","text_body":"b"}`, "to"},
		{"/authmail/send", `{"to":"checked@example.org","TO":"other@evil.example","subject":"s","text_body":"b"}`, "TO"},
		{"/authmail/send", `{"To":"other@evil.example","subject":"s","text_body":"b"}`, "To"},
		{"/authmail/send", `{"to":"a@example.org","subject":"s","\u017fubject":"t","text_body":"b"}`, "\u017fubject"}, // ſ folds to s
		{"/authmail/send", `{"to":"a@example.org","subject":"s","text_body":"b","t\u0065xt_body":"c"}`, "text_body"},
		{"/authmail/send/otp", `{"to":"a@example.org","code":"1","code":"2"}`, "code"},
		{"/authmail/send/email-change", `{"to":"a@example.org","token":"t","old_email":"o@example.org","Old_Email":"v@example.org"}`, "Old_Email"},
		{"/authmail/send/magic-link", `{"to":"a@example.org","token":"t","webhook_url":"https://h.example/x","Webhook_URL":"https://evil.example/"}`, "Webhook_URL"},
		{"/authmail/send/otp", `{"to":{"a":1,"a":2},"code":"1"}`, "a"}, // nested objects too
	} {
		r := post(t, tc.path, tc.body)
		expectError(t, r, 400, "invalid_json", tc.field)
		if !strings.Contains(r.str("message"), fmt.Sprintf("%q", tc.field)) {
			t.Errorf("%s: message %q does not name %q", tc.body, r.str("message"), tc.field)
		}
	}
	// unknown fields are still 422 with the field
	expectError(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1","colour":"red"}`), 422, "invalid_request", "colour")
	expectSent(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"1"}`))
}

