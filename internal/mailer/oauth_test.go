package mailer

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// tokenServer is a local OAuth2 token endpoint for the refresh-token
// grant: it issues numbered access tokens with expires_in, rotates the
// refresh token on every refresh (the old one stops working), and keeps
// the set of access tokens the SMTP server accepts.
type tokenServer struct {
	*httptest.Server
	mu        sync.Mutex
	refresh   string          // the one valid refresh token
	valid     map[string]bool // access tokens the SMTP server accepts
	n         int
	expiresIn int
	issueBad  bool // issue tokens the SMTP server refuses
	fail      bool // answer invalid_grant
}

const (
	testClientID     = "client-1"
	testClientSecret = "client-s3cret-value"
	testRefresh0     = "refresh-token-0-value"
)

func newTokenServer(t *testing.T) *tokenServer {
	ts := &tokenServer{refresh: testRefresh0, valid: map[string]bool{}, expiresIn: 3600}
	ts.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		ts.mu.Lock()
		defer ts.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if ts.fail || r.Form.Get("grant_type") != "refresh_token" || r.Form.Get("client_id") != testClientID ||
			r.Form.Get("client_secret") != testClientSecret || r.Form.Get("refresh_token") != ts.refresh ||
			r.Form.Get("scope") != "https://outlook.office365.com/SMTP.Send" {
			w.WriteHeader(http.StatusBadRequest)
			// echoes what it got, as some servers do: authmail must not repeat it
			fmt.Fprintf(w, `{"error":"invalid_grant","error_description":"refresh token %s is not valid"}`, r.Form.Get("refresh_token"))
			return
		}
		ts.n++
		at := fmt.Sprintf("access-token-%d", ts.n)
		if !ts.issueBad {
			ts.valid[at] = true
		}
		ts.refresh = fmt.Sprintf("refresh-token-%d-value", ts.n)
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": at, "token_type": "Bearer", "expires_in": ts.expiresIn, "refresh_token": ts.refresh})
	}))
	t.Cleanup(ts.Close)
	return ts
}

func (ts *tokenServer) check(user, token string) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return user == "mailer@example.com" && ts.valid[token]
}

func (ts *tokenServer) issued() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.n
}

func (ts *tokenServer) revokeAll() {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	ts.valid = map[string]bool{}
}

func oauthSender(t *testing.T, mech string, ts *tokenServer) (*smtptest.Server, *Sender) {
	t.Helper()
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "mailer@example.com",
		Mechanisms: []string{"PLAIN", strings.ToUpper(mech)}, CheckToken: ts.check})
	cfg := testSettings(srv)
	cfg.Username, cfg.Password = "mailer@example.com", ""
	cfg.OAuth = &OAuthSettings{Mech: mech, TokenURL: ts.URL + "/token", ClientID: testClientID,
		ClientSecret: testClientSecret, RefreshToken: testRefresh0, Scopes: []string{"https://outlook.office365.com/SMTP.Send"}}
	return srv, newTestSender(t, cfg)
}

// TestOAuthTokensAuthenticateAndRefresh: both mechanisms authenticate
// with a token from the refresh grant; a reused token is not fetched
// again; a token about to expire is refreshed with the rotated refresh
// token before a new connection authenticates.
func TestOAuthTokensAuthenticateAndRefresh(t *testing.T) {
	for _, mech := range []string{AuthXOAUTH2, AuthOAUTHBEARER} {
		t.Run(mech, func(t *testing.T) {
			ts := newTokenServer(t)
			srv, s := oauthSender(t, mech, ts)
			if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
				t.Fatal(err)
			}
			m := srv.Messages()[0]
			if m.AuthUser != "mailer@example.com" || m.AuthMechanism != strings.ToUpper(mech) || !m.TLS {
				t.Fatalf("auth %q %q TLS %v", m.AuthUser, m.AuthMechanism, m.TLS)
			}
			// a new connection with the token still fresh: no refresh
			s.dropIdle()
			if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
				t.Fatal(err)
			}
			if n := ts.issued(); n != 1 || srv.Auths() != 2 {
				t.Fatalf("%d refreshes, %d auths; want 1 and 2", n, srv.Auths())
			}
			// the token is within tokenEarly of its expiry: a new connection
			// refreshes first, with the refresh token of the last answer
			// (the first one no longer works)
			s.tokens.mu.Lock()
			s.tokens.tok.Expiry = time.Now().Add(tokenEarly - time.Second)
			s.tokens.mu.Unlock()
			s.dropIdle()
			if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
				t.Fatal(err)
			}
			if n := ts.issued(); n != 2 {
				t.Fatalf("%d refreshes, want 2", n)
			}
		})
	}
}

// TestOAuthRejectedTokenIsRefreshedOnce: a token the server refuses
// (revoked) is replaced once and the message goes out; tokens that are
// refused every time fail after exactly one refresh more, with a
// message that holds no token.
func TestOAuthRejectedTokenIsRefreshedOnce(t *testing.T) {
	for _, mech := range []string{AuthXOAUTH2, AuthOAUTHBEARER} {
		t.Run(mech, func(t *testing.T) {
			ts := newTokenServer(t)
			srv, s := oauthSender(t, mech, ts)
			if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
				t.Fatal(err)
			}
			ts.revokeAll()
			s.dropIdle()
			if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
				t.Fatalf("after revocation: %v", err)
			}
			if n := ts.issued(); n != 2 || len(srv.Messages()) != 2 {
				t.Fatalf("%d refreshes, %d messages; want 2 and 2", n, len(srv.Messages()))
			}

			ts.mu.Lock()
			ts.issueBad = true
			ts.mu.Unlock()
			ts.revokeAll()
			s.dropIdle()
			_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
			de := expectCode(t, err, CodeSMTPAuthFailed, PhaseAuth)
			if de.Reply == nil || de.Reply.Code != 535 {
				t.Fatalf("reply %v", de.Reply)
			}
			if n := ts.issued(); n != 3 {
				t.Fatalf("%d refreshes, want 3 (one retry, no loop)", n)
			}
			if strings.Contains(err.Error(), "access-token") {
				t.Fatalf("error shows a token: %v", err)
			}
			if got := err.Error(); got != "the SMTP server rejected the credentials: 535 5.7.8 Authentication credentials invalid" {
				t.Fatalf("message %q", got)
			}
		})
	}
}

// TestOAuthTokenEndpointErrorHoldsNoSecret: a refused refresh fails the
// delivery as smtp_auth_failed (retried) with the endpoint's error code,
// and without the refresh token the endpoint echoed or the client secret.
func TestOAuthTokenEndpointErrorHoldsNoSecret(t *testing.T) {
	ts := newTokenServer(t)
	ts.fail = true
	srv, s := oauthSender(t, AuthXOAUTH2, ts)
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeSMTPAuthFailed, PhaseAuth)
	want := "SMTP authentication failed: fetching an OAuth2 access token: the token endpoint answered 400 Bad Request: invalid_grant (refresh token [redacted] is not valid)"
	if err.Error() != want {
		t.Fatalf("got %q\nwant %q", err.Error(), want)
	}
	if srv.Auths() != 0 || len(srv.Attempts()) != 0 {
		t.Fatal("the server saw an attempt")
	}
}

// TestOAuthAccessTokenFileIsReadAtEveryAuthentication: with access_token
// the token is the file's current content at each new connection.
func TestOAuthAccessTokenFileIsReadAtEveryAuthentication(t *testing.T) {
	valid := map[string]bool{"file-token-1": true}
	var mu sync.Mutex
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "mailer@example.com", Mechanisms: []string{"XOAUTH2"},
		CheckToken: func(u, tok string) bool { mu.Lock(); defer mu.Unlock(); return valid[tok] }})
	path := filepath.Join(t.TempDir(), "token")
	_ = os.WriteFile(path, []byte("file-token-1\n"), 0o600)
	cfg := testSettings(srv)
	cfg.Username, cfg.Password = "mailer@example.com", ""
	// the handler's Expand reads a {file.*} placeholder; this one reads
	// the file itself
	cfg.OAuth = &OAuthSettings{Mech: AuthXOAUTH2, AccessToken: path, Expand: func(p string) (string, error) {
		b, err := os.ReadFile(p)
		return string(b), err
	}}
	s := newTestSender(t, cfg)
	if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	valid = map[string]bool{"file-token-2": true}
	mu.Unlock()
	_ = os.WriteFile(path, []byte("file-token-2\n"), 0o600)
	s.dropIdle()
	if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	if srv.Auths() != 2 {
		t.Fatalf("%d auths", srv.Auths())
	}
}
