package authmail

import "testing"

func TestOAuthConfigChecks(t *testing.T) {
	base := func() SMTP {
		return SMTP{Host: "smtp.office365.com", Username: "mailer@example.com", Auth: "xoauth2",
			OAuth2: &OAuth2{TokenURL: "https://login.microsoftonline.com/t/oauth2/v2.0/token", ClientID: "c", RefreshToken: "{env.RT}"}}
	}
	for _, tc := range []struct {
		mod  func(*SMTP)
		want string
	}{
		{func(s *SMTP) { s.Auth = "ntlm" }, "smtp: auth must be xoauth2 or oauthbearer (or unset for a password), not 'ntlm'"},
		{func(s *SMTP) { s.Username = "" }, "smtp: auth xoauth2 needs the username (the mailbox the token belongs to)"},
		{func(s *SMTP) { s.Password = "x" }, "smtp: auth xoauth2 authenticates with a token; remove the password"},
		{func(s *SMTP) { s.AccessToken = "{file./t}" }, "smtp: give either oauth2 or access_token, not both"},
		{func(s *SMTP) { s.OAuth2 = nil }, "smtp: auth xoauth2 needs an oauth2 block or an access_token"},
		{func(s *SMTP) { s.OAuth2 = nil; s.AccessToken = "literal-token" }, "smtp: access_token must be a {file.*} (or {env.*}) placeholder, read each time a connection authenticates"},
		{func(s *SMTP) { s.OAuth2.TokenURL = "http://login.example.com/token" }, "smtp oauth2: token_url must use https (http is only allowed to a loopback address)"},
		{func(s *SMTP) { s.OAuth2.TokenURL = "/token" }, "smtp oauth2: token_url must be an absolute https URL"},
		{func(s *SMTP) { s.OAuth2.ClientID = "" }, "smtp oauth2: client_id is required"},
		{func(s *SMTP) { s.OAuth2.RefreshToken = "" }, "smtp oauth2: refresh_token is required"},
		{func(s *SMTP) { s.Auth = ""; s.Password = "p" }, "smtp: oauth2 and access_token need auth xoauth2 or oauthbearer"},
	} {
		s := base()
		tc.mod(&s)
		if err := s.check(); err == nil || err.Error() != tc.want {
			t.Errorf("got %v\nwant %s", err, tc.want)
		}
	}
	s := base()
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
}
