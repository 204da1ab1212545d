package integration

import (
	"html"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"
)

var idPattern = regexp.MustCompile(`^[0-9a-hjkmnp-tv-z]{28}$`)

func checkIDs(t *testing.T, r response) {
	t.Helper()
	if !idPattern.MatchString(r.str("id")) {
		t.Errorf("id %q", r.str("id"))
	}
	if !regexp.MustCompile(`^<[0-9a-hjkmnp-tv-z]{32}@example\.com>$`).MatchString(r.str("message_id")) {
		t.Errorf("message_id %q", r.str("message_id"))
	}
}

func TestSendArbitraryMessage(t *testing.T) {
	load(t, config{})
	r := post(t, "/authmail/send", mustJSON(map[string]any{
		"to":        []string{"Jane Doe <jane@example.org>", "bob@example.net"},
		"cc":        "carol@example.com",
		"bcc":       []string{"audit@example.com", "jane@example.org"},
		"reply_to":  "Sales <sales@example.com>",
		"subject":   "Your invoice — März",
		"html_body": `<h1>Invoice</h1><p>Total: <b>42 €</b></p><p><a href="https://app.example.com/inv/7">View it</a></p><script>track()</script>`,
	}))
	m := expectSent(t, r)
	checkIDs(t, r)
	if m.From != "no-reply@example.com" {
		t.Errorf("MAIL FROM %q", m.From)
	}
	if got := strings.Join(m.To, ","); got != "jane@example.org,bob@example.net,carol@example.com,audit@example.com" {
		t.Errorf("RCPT TO %q (bcc in the envelope, duplicates once)", got)
	}
	if !m.TLS || m.AuthUser != "mailer" {
		t.Errorf("TLS=%v auth=%q", m.TLS, m.AuthUser)
	}
	p := parseMail(t, m.Data)
	checkStandardHeaders(t, p)
	checkAlternative(t, p)
	for name, want := range map[string]string{
		"To":       `"Jane Doe" <jane@example.org>, <bob@example.net>`,
		"Cc":       `<carol@example.com>`,
		"Reply-To": `"Sales" <sales@example.com>`,
	} {
		if got := p.Header.Get(name); got != want {
			t.Errorf("%s %q, want %q", name, got, want)
		}
	}
	if p.Subject != "Your invoice — März" {
		t.Errorf("subject %q", p.Subject)
	}
	if strings.Contains(string(m.Data), "audit@example.com") {
		t.Error("bcc address visible in the message")
	}
	if p.HTML != `<h1>Invoice</h1><p>Total: <b>42 €</b></p><p><a href="https://app.example.com/inv/7">View it</a></p><script>track()</script>` {
		t.Errorf("html part changed: %q", p.HTML)
	}
	if p.Text != "Invoice\n\nTotal: 42 €\n\nView it (https://app.example.com/inv/7)\n" {
		t.Errorf("derived text part %q", p.Text)
	}

	// text only: a single text/plain part, the configured Reply-To
	r = post(t, "/authmail/send", `{"to":"x@example.org","subject":"Plain","text_body":"Line 1\nLine 2\n"}`)
	m = expectSent(t, r)
	p = parseMail(t, m.Data)
	if strings.Join(p.Types, "|") != "text/plain" || p.Text != "Line 1\nLine 2\n" {
		t.Errorf("text-only message: %v %q", p.Types, p.Text)
	}
	if p.Header.Get("Reply-To") != "<support@example.com>" {
		t.Errorf("Reply-To %q", p.Header.Get("Reply-To"))
	}
	// both parts given: both sent as is
	r = post(t, "/authmail/send", `{"to":"x@example.org","subject":"Both","text_body":"T","html_body":"<i>H</i>"}`)
	p = parseMail(t, expectSent(t, r).Data)
	checkAlternative(t, p)
	if p.Text != "T" || p.HTML != "<i>H</i>" {
		t.Errorf("parts %q %q", p.Text, p.HTML)
	}
}

// TestUserNameThatCannotBeADisplayName: net/mail cannot encode a
// non-ASCII name with a backslash in an address header, so such a
// user_name greets the user in the message but stays out of To.
func TestUserNameThatCannotBeADisplayName(t *testing.T) {
	load(t, config{})
	r := post(t, "/authmail/send/otp", `{"to":"jane@example.org","user_name":"CORP\\Jürgen","code":"1"}`)
	p := parseMail(t, expectSent(t, r).Data)
	if got := p.Header.Get("To"); got != "<jane@example.org>" {
		t.Errorf("To %q", got)
	}
	if !strings.Contains(p.Text, "Hi CORP\\Jürgen,") || !strings.Contains(p.HTML, "Hi CORP\\Jürgen,") {
		t.Errorf("the greeting lacks the name:\n%s", p.Text)
	}
}

func TestOTP(t *testing.T) {
	load(t, config{})
	r := post(t, "/authmail/send/otp", `{"to":"jane@example.org","user_name":"Jane <b>Doe</b>","code":"`+secret("493 201")+`"}`)
	m := expectSent(t, r)
	checkIDs(t, r)
	if strings.Join(m.To, ",") != "jane@example.org" {
		t.Errorf("RCPT %v", m.To)
	}
	p := parseMail(t, m.Data)
	checkStandardHeaders(t, p)
	checkAlternative(t, p)
	if got := p.Header.Get("To"); got != `"Jane <b>Doe</b>" <jane@example.org>` {
		t.Errorf("To %q (user_name as display name)", got)
	}
	if p.Header.Get("Reply-To") != "<support@example.com>" {
		t.Errorf("Reply-To %q", p.Header.Get("Reply-To"))
	}
	if p.Subject != "Your Example App verification code" {
		t.Errorf("subject %q", p.Subject)
	}
	if strings.Contains(p.Header.Get("Subject"), "493") {
		t.Error("the code is in the subject")
	}
	wantText := "Example App\n\nHi Jane <b>Doe</b>,\n\nUse this code to continue:\n\n    493 201\n\nThe code expires in 10 minutes."
	if !strings.HasPrefix(p.Text, wantText) {
		t.Errorf("text part:\n%s", p.Text)
	}
	if !strings.Contains(p.Text, "If you did not request this code") || !strings.Contains(p.Text, "sent by Example App to jane@example.org") {
		t.Errorf("text part lacks the did-not-request line or footer:\n%s", p.Text)
	}
	for _, want := range []string{"Hi Jane &lt;b&gt;Doe&lt;/b&gt;,", ">493 201</p>", "expires in 10 minutes", "<title>Example App</title>"} {
		if !strings.Contains(p.HTML, want) {
			t.Errorf("HTML lacks %q", want)
		}
	}
	if strings.Contains(p.HTML, "<b>Doe</b>") {
		t.Error("user_name not escaped in HTML")
	}

	// custom expiry, explicit display name wins over user_name
	r = post(t, "/authmail/send/otp", `{"to":"J <jane@example.org>","user_name":"Jane","code":"1","expires_in_minutes":120}`)
	p = parseMail(t, expectSent(t, r).Data)
	if !strings.Contains(p.Text, "expires in 2 hours") || p.Header.Get("To") != `"J" <jane@example.org>` {
		t.Errorf("expiry/To: %q %q", p.Header.Get("To"), p.Text)
	}
}

func TestLinkFlows(t *testing.T) {
	load(t, config{})
	cases := []struct {
		path, body, subject, link, expires string
	}{
		{"/send/magic-link", `{"to":"a@example.org","token":"t/k+n &x"}`, "Your sign-in link for Example App",
			"https://app.example.com/magic-link?token=t%2Fk%2Bn+%26x", "15 minutes"},
		{"/send/password-reset", `{"to":"a@example.org","token":"reset-tok"}`, "Reset your Example App password",
			"https://app.example.com/account/reset?t=reset-tok", "1 hour"},
		{"/send/verify-email", `{"to":"a@example.org","token":"verify-tok-1","base_url":"https://APP.example.com:443/welcome"}`, "Verify your email address for Example App",
			"https://APP.example.com:443/welcome/verify-email?token=verify-tok-1", "24 hours"},
		{"/send/verify-email", `{"to":"a@example.org","link":"https://app.example.com/v?code=9&u=a","expires_in_minutes":30}`, "Verify your email address for Example App",
			"https://app.example.com/v?code=9&u=a", "30 minutes"},
		{"/send/email-change", `{"to":"a@example.org","token":"chg-tok-2"}`, "Confirm your new email address for Example App",
			"https://app.example.com/email-change?token=chg-tok-2", "24 hours"},
	}
	for _, tc := range cases {
		t.Run(tc.path, func(t *testing.T) {
			secret(tc.link)
			r := post(t, "/authmail"+tc.path, tc.body)
			m := expectSent(t, r)
			p := parseMail(t, m.Data)
			checkStandardHeaders(t, p)
			checkAlternative(t, p)
			if p.Subject != tc.subject {
				t.Errorf("subject %q", p.Subject)
			}
			if strings.Contains(p.Header.Get("Subject"), "http") || strings.Contains(p.Header.Get("Subject"), "tok") {
				t.Error("the link or token is in the subject")
			}
			if !strings.Contains(p.Text, "\n"+tc.link+"\n") {
				t.Errorf("text part lacks the link %s on its own line:\n%s", tc.link, p.Text)
			}
			// compare what a mail client sees: attribute values decoded
			if !strings.Contains(html.UnescapeString(p.HTML), `href="`+tc.link+`"`) {
				t.Errorf("HTML lacks href=%q", tc.link)
			}
			if !strings.Contains(p.Text, "expires in "+tc.expires) {
				t.Errorf("text part lacks 'expires in %s'", tc.expires)
			}
			if !strings.Contains(p.Text, "If you did not") {
				t.Error("no did-not-request line")
			}
		})
	}
	// the token stays a single query value, whatever it holds
	r := post(t, "/authmail/send/magic-link", `{"to":"a@example.org","token":"x&admin=1#frag"}`)
	p := parseMail(t, expectSent(t, r).Data)
	var link string
	for _, l := range strings.Split(p.Text, "\n") {
		if strings.HasPrefix(l, "https://") {
			link = l
		}
	}
	u, err := url.Parse(link)
	if err != nil || u.Query().Get("token") != "x&admin=1#frag" || u.Query().Has("admin") || u.Fragment != "" {
		t.Fatalf("token escaped badly: %q", link)
	}
}

func TestEmailChangeNotifiesOldAddress(t *testing.T) {
	load(t, config{})
	r := post(t, "/authmail/send/email-change", `{"to":"new.address@example.org","old_email":"old@example.net","user_name":"Jane","token":"`+secret("chg-tok-9")+`"}`)
	if r.status != 200 || r.json["sent"] != true {
		t.Fatalf("%d %s", r.status, r.raw)
	}
	notice, _ := r.json["notice"].(map[string]any)
	if notice["sent"] != true || notice["status"] != "sent" || notice["id"] == r.str("id") {
		t.Fatalf("notice %v", notice)
	}
	msgs := smtpSrv.WaitMessages(2, 5*time.Second)
	if len(msgs) != 2 {
		t.Fatalf("%d messages, want the confirmation and the notice", len(msgs))
	}
	// both are queued together and delivered in parallel: order them
	if msgs[0].To[0] != "new.address@example.org" {
		msgs[0], msgs[1] = msgs[1], msgs[0]
	}
	confirm, old := parseMail(t, msgs[0].Data), parseMail(t, msgs[1].Data)
	if msgs[0].To[0] != "new.address@example.org" || msgs[1].To[0] != "old@example.net" {
		t.Fatalf("recipients %v %v", msgs[0].To, msgs[1].To)
	}
	if confirm.Header.Get("Message-Id") != r.str("message_id") || old.Header.Get("Message-Id") != notice["message_id"] {
		t.Error("message ids do not match the response")
	}
	if !strings.Contains(confirm.Text, "https://app.example.com/email-change?token=chg-tok-9") {
		t.Error("confirmation lacks the link")
	}
	if old.Subject != "Your Example App email address is being changed" || old.Header.Get("To") != `"Jane" <old@example.net>` {
		t.Errorf("notice headers %q %q", old.Subject, old.Header.Get("To"))
	}
	if strings.Contains(string(msgs[1].Data), "chg-tok-9") || strings.Contains(old.Text+old.HTML, "https://") {
		t.Fatal("the notice to the old address carries the confirmation link")
	}
	if !strings.Contains(old.Text, "from old@example.net to n***@example.org") || !strings.Contains(old.Text, "If you did not request this change") {
		t.Errorf("notice text:\n%s", old.Text)
	}
}

func TestSecurityAlerts(t *testing.T) {
	load(t, config{})
	r := post(t, "/authmail/send/security-alert", `{"to":"a@example.org","user_name":"Ann","event":"new_login","ip":"2001:db8::1","user_agent":"Firefox <on> Linux","location":"Berlin, DE","occurred_at":"2026-11-21T10:30:00+01:00"}`)
	m := expectSent(t, r)
	p := parseMail(t, m.Data)
	checkStandardHeaders(t, p)
	checkAlternative(t, p)
	if p.Subject != "Example App security alert: New sign-in to your account" {
		t.Errorf("subject %q", p.Subject)
	}
	for _, want := range []string{"There was a new sign-in to your Example App account.", "When:       21 November 2026, 09:30 UTC",
		"IP address: 2001:db8::1", "Location:   Berlin, DE", "Device:     Firefox <on> Linux", "If this was not you"} {
		if !strings.Contains(p.Text, want) {
			t.Errorf("text lacks %q:\n%s", want, p.Text)
		}
	}
	if !strings.Contains(p.HTML, "Firefox &lt;on&gt; Linux") {
		t.Error("user agent not escaped in HTML")
	}

	// RFC 3339 allows a lower-case t and z
	r = post(t, "/authmail/send/security-alert", `{"to":"a@example.org","event":"new_login","occurred_at":"2026-11-21t10:30:00z"}`)
	if p := parseMail(t, expectSent(t, r).Data); !strings.Contains(p.Text, "When:       21 November 2026, 10:30 UTC") {
		t.Errorf("lower-case RFC 3339 time:\n%s", p.Text)
	}

	// on by default
	r = post(t, "/authmail/send/security-alert", `{"to":"a@example.org","event":"password_changed"}`)
	p = parseMail(t, expectSent(t, r).Data)
	if p.Subject != "Example App security alert: Your password was changed" || strings.Contains(p.Text, "IP address") {
		t.Errorf("password_changed: %q\n%s", p.Subject, p.Text)
	}
	// turned off in the config
	r = post(t, "/authmail/send/security-alert", `{"to":"a@example.org","event":"account_locked"}`)
	if r.status != 200 || r.raw != "{\"sent\":false,\"status\":\"skipped\",\"reason\":\"event_disabled\"}\n" {
		t.Fatalf("disabled event: %d %s", r.status, r.raw)
	}
	if len(smtpSrv.Attempts()) != 0 {
		t.Fatal("a disabled event was sent")
	}
}
