package integration

import (
	"bytes"
	"testing"
)

// TestListUnsubscribeOnSendOnly: /send passes validated List-Unsubscribe
// and List-Unsubscribe-Post fields through, byte for byte; bad values
// get 422 naming the field with nothing sent; the auth flows refuse them.
func TestListUnsubscribeOnSendOnly(t *testing.T) {
	load(t, config{})
	m := expectSent(t, post(t, "/authmail/send", `{"to":"a@example.org","subject":"News","text_body":"hi",
		"list_unsubscribe":"<https://app.example.com/unsub?u=1&t=x%20y>,  <mailto:unsub@example.com?subject=stop>",
		"list_unsubscribe_post":"List-Unsubscribe=One-Click"}`))
	for _, want := range []string{
		// go-mail folds at the space after the comma
		"\r\nList-Unsubscribe: <https://app.example.com/unsub?u=1&t=x%20y>,\r\n <mailto:unsub@example.com?subject=stop>\r\n",
		"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
	} {
		if !bytes.Contains(m.Data, []byte(want)) {
			t.Fatalf("missing %q in\n%s", want, m.Data)
		}
	}
	m = expectSent(t, post(t, "/authmail/send", `{"to":"a@example.org","subject":"News","text_body":"hi"}`))
	if bytes.Contains(m.Data, []byte("List-Unsubscribe")) {
		t.Fatalf("List-Unsubscribe without being asked:\n%s", m.Data)
	}
	for _, tc := range []struct{ body, field string }{
		{`"list_unsubscribe":"https://app.example.com/u"`, "list_unsubscribe"},
		{`"list_unsubscribe":"<http://app.example.com/u>"`, "list_unsubscribe"},
		{`"list_unsubscribe":"<javascript:alert(1)>"`, "list_unsubscribe"},
		{`"list_unsubscribe":"<https://app.example.com/u>\r\nBcc: x@evil.example"`, "list_unsubscribe"},
		{`"list_unsubscribe":"<https://app.example.com/a b>"`, "list_unsubscribe"},
		{`"list_unsubscribe":"<https://a.example/1>, <https://a.example/2>, <mailto:u@a.example>"`, "list_unsubscribe"},
		{`"list_unsubscribe":"<mailto:u@a.example>","list_unsubscribe_post":"List-Unsubscribe=One-Click"`, "list_unsubscribe_post"},
		{`"list_unsubscribe":"<https://a.example/1>","list_unsubscribe_post":"yes"`, "list_unsubscribe_post"},
		{`"list_unsubscribe_post":"List-Unsubscribe=One-Click"`, "list_unsubscribe_post"},
	} {
		expectError(t, post(t, "/authmail/send", `{"to":"a@example.org","subject":"s","text_body":"b",`+tc.body+`}`), 422, "invalid_request", tc.field)
	}
	// auth mail is not subscription mail
	expectError(t, post(t, "/authmail/send/otp", `{"to":"a@example.org","code":"123456","list_unsubscribe":"<https://a.example/1>"}`), 422, "invalid_request", "list_unsubscribe")
}
