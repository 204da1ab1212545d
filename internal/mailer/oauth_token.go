package mailer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wneessen/go-mail/smtp"
	"golang.org/x/oauth2"

	"github.com/caddy-authmail/authmail/internal/redact"
)

// SASL mechanisms that authenticate with an OAuth2 access token.
const (
	AuthXOAUTH2     = "xoauth2"
	AuthOAUTHBEARER = "oauthbearer"
)

// Tunables; tests shorten them.
var (
	// tokenEarly: an access token is refreshed this long before it
	// expires, so that a connection never authenticates with one that
	// runs out during the exchange
	tokenEarly = 60 * time.Second
)

// OAuthSettings are the resolved token settings of an SMTP sender.
type OAuthSettings struct {
	Mech         string // authXOAUTH2 or authOAUTHBEARER
	TokenURL     string
	ClientID     string
	ClientSecret string
	RefreshToken string
	Scopes       []string
	// AccessToken is the placeholder expanded at every authentication,
	// when tokens come from a file another agent refreshes
	AccessToken string
	// Expand expands accessToken's placeholder; its error names the
	// setting and never holds the secret
	Expand func(string) (string, error)
}

// key lists the fields that make a different token source.
func (o *OAuthSettings) key() []string {
	if o == nil {
		return nil
	}
	return []string{o.Mech, o.TokenURL, o.ClientID, o.ClientSecret, o.RefreshToken, strings.Join(o.Scopes, " "), o.AccessToken}
}

// tokenSource hands out access tokens for one SMTP sender. It lives as
// long as the sender, so across config reloads that keep the settings.
type tokenSource struct {
	cfg     *OAuthSettings
	timeout time.Duration

	mu      sync.Mutex
	tok     *oauth2.Token // the current token; nil before the first refresh
	refresh string        // the current refresh token (rotated by the server)
	// last is the access token last read from access_token's file, for
	// redaction only
	last string
	// known is what secretsLocked returned when a secret last changed,
	// for secrets: a Sender redacts every result with them, and must not
	// wait for a refresh in flight (token holds mu through it)
	known atomic.Pointer[[]string]

	refreshes atomic.Int64 // successful refreshes, for tests and /status
}

func newTokenSource(cfg *OAuthSettings, timeout time.Duration) *tokenSource {
	ts := &tokenSource{cfg: cfg, timeout: timeout, refresh: cfg.RefreshToken}
	ts.publish()
	return ts
}

// canRenew reports whether a rejected token can be replaced by a new
// one, i.e. tokens come from the refresh grant.
func (ts *tokenSource) canRenew() bool { return ts.cfg.TokenURL != "" }

// token returns an access token that is valid for at least tokenEarly.
// rejected is a token the SMTP server just refused: unless another
// connection has already replaced it, it is refreshed even if it has
// not expired (revoked, or the clock of the issuer is ahead).
//
// Errors never hold a token or secret: the token endpoint's status,
// error code and description, or the transport error, only, redacted
// (tokenError).
func (ts *tokenSource) token(ctx context.Context, rejected string) (string, error) {
	if !ts.canRenew() {
		v, err := ts.cfg.Expand(ts.cfg.AccessToken)
		if err != nil {
			return "", err
		}
		v = strings.TrimSpace(v)
		ts.mu.Lock()
		if v != ts.last {
			ts.last = v
			ts.publish()
		}
		ts.mu.Unlock()
		return v, nil
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if t := ts.tok; t != nil && t.AccessToken != rejected &&
		(t.Expiry.IsZero() || time.Until(t.Expiry) > tokenEarly) {
		return t.AccessToken, nil
	}
	conf := &oauth2.Config{
		ClientID: ts.cfg.ClientID, ClientSecret: ts.cfg.ClientSecret, Scopes: ts.cfg.Scopes,
		Endpoint: oauth2.Endpoint{TokenURL: ts.cfg.TokenURL, AuthStyle: oauth2.AuthStyleInParams},
	}
	ctx, cancel := context.WithTimeout(ctx, ts.timeout)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, &http.Client{Timeout: ts.timeout, Transport: scopeAdder{ts.cfg.Scopes}})
	// an expired token with the current refresh token makes the source
	// refresh at once
	nt, err := conf.TokenSource(ctx, &oauth2.Token{RefreshToken: ts.refresh, Expiry: time.Unix(1, 0)}).Token()
	if err != nil {
		return "", ts.tokenError(err)
	}
	if nt.AccessToken == "" {
		return "", errors.New("fetching an OAuth2 access token: the token endpoint returned no access_token")
	}
	ts.tok = nt
	if nt.RefreshToken != "" {
		ts.refresh = nt.RefreshToken
	}
	ts.publish()
	ts.refreshes.Add(1)
	return nt.AccessToken, nil
}

// scopeAdder adds the scope parameter to refresh requests: x/oauth2
// sends none when refreshing, and Microsoft's v2.0 endpoint requires it
// (the scopes of the original grant apply elsewhere when it is absent).
type scopeAdder struct{ scopes []string }

func (a scopeAdder) RoundTrip(r *http.Request) (*http.Response, error) {
	if len(a.scopes) == 0 || r.Body == nil || r.Method != http.MethodPost {
		return http.DefaultTransport.RoundTrip(r)
	}
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		return nil, err
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return nil, err
	}
	if form.Get("scope") == "" {
		form.Set("scope", strings.Join(a.scopes, " "))
	}
	enc := form.Encode()
	r = r.Clone(r.Context())
	r.Body = io.NopCloser(strings.NewReader(enc))
	r.ContentLength = int64(len(enc))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(enc)), nil }
	return http.DefaultTransport.RoundTrip(r)
}

// tokenError describes a failed refresh without the response body or
// any secret. Some token endpoints echo the request form in their
// error_description (URL-encoded, and some base64 or JSON-escape it), or
// put a secret in the error code, so every field of the answer is
// provider text: the description and a transport error are redacted of
// the client secret and the refresh and access tokens in all their
// encodings (internal/redact), the code is shown only when it is a plain
// OAuth2 code, and the status only as its number and Go's text for it
// (the reason phrase is the server's). ts.mu is held.
func (ts *tokenSource) tokenError(err error) error {
	r := redact.New(ts.secretsLocked()...)
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		msg := "fetching an OAuth2 access token: the token endpoint answered"
		if re.Response != nil {
			msg += " " + strings.TrimSpace(strconv.Itoa(re.Response.StatusCode)+" "+http.StatusText(re.Response.StatusCode))
		}
		if re.ErrorCode != "" {
			msg += ": " + r.Code(re.ErrorCode, "unrecognized_error")
		}
		if re.ErrorDescription != "" {
			msg += " (" + r.Line(re.ErrorDescription, 200) + ")"
		}
		return errors.New(msg)
	}
	return errors.New("fetching an OAuth2 access token: " + r.Line(err.Error(), 300))
}

// secrets returns the secrets of the token source: the configured
// client secret and refresh token, the rotated refresh token, the
// current access token, the last one read from a file.
func (ts *tokenSource) secrets() []string {
	if p := ts.known.Load(); p != nil {
		return *p
	}
	return nil
}

// publish makes the current secrets those secrets returns; ts.mu is
// held.
func (ts *tokenSource) publish() {
	v := ts.secretsLocked()
	ts.known.Store(&v)
}

// secretsLocked is secrets with ts.mu held.
func (ts *tokenSource) secretsLocked() []string {
	out := []string{ts.cfg.ClientSecret, ts.cfg.RefreshToken, ts.refresh, ts.last}
	if ts.tok != nil {
		out = append(out, ts.tok.AccessToken, ts.tok.RefreshToken)
	}
	return out
}

// tokenAuth returns the SASL client for the mechanism and token.
func tokenAuth(mech, user, token string) smtp.Auth {
	if mech == AuthOAUTHBEARER {
		return &oauthBearerAuth{user: user, token: token}
	}
	return smtp.XOAuth2Auth(user, token)
}

// oauthBearerAuth is the client side of OAUTHBEARER (RFC 7628). go-mail
// has none.
type oauthBearerAuth struct{ user, token string }

func (a *oauthBearerAuth) Start(*smtp.ServerInfo) (string, []byte, error) {
	// gs2 header with the authorization identity; no host or port: they
	// are optional, and some servers refuse a mismatch
	return "OAUTHBEARER", []byte("n,a=" + saslName(a.user) + ",\x01auth=Bearer " + a.token + "\x01\x01"), nil
}

// Next answers the server's JSON error challenge with the dummy %x01
// the RFC requires; the server then ends the exchange with an error.
func (a *oauthBearerAuth) Next(_ []byte, more bool) ([]byte, error) {
	if more {
		return []byte{0x01}, nil
	}
	return nil, nil
}

// saslName escapes ',' and '=' in a gs2 authzid (RFC 5801 4).
func saslName(s string) string {
	return strings.NewReplacer("=", "=3D", ",", "=2C").Replace(s)
}

// authToken authenticates the connection with an access token. A
// refused token is returned in the error (rejectedToken) so that send
// can retry once with a fresh one.
func (s *Sender) authToken(ctx context.Context, client *smtp.Client, rejected string, deadline func()) *Error {
	cfg := &s.cfg
	mechName := strings.ToUpper(cfg.OAuth.Mech)
	has, list := client.Extension("AUTH")
	offered := false
	for _, m := range strings.Fields(strings.ToUpper(list)) {
		offered = offered || m == mechName
	}
	if !has || !offered {
		return &Error{Code: CodeSMTPAuthFailed, Phase: PhaseAuth,
			Err: fmt.Errorf("the SMTP server does not offer AUTH %s (it offers: %s)", mechName, sanitizeLine(list, 100))}
	}
	tok, err := s.tokens.token(ctx, rejected)
	if err != nil {
		return &Error{Code: CodeSMTPAuthFailed, Phase: PhaseAuth, Err: err}
	}
	// the refresh may have taken most of the command timeout
	deadline()
	if err := client.Auth(tokenAuth(cfg.OAuth.Mech, cfg.Username, tok)); err != nil {
		de := classify(PhaseAuth, err)
		if de.Code == CodeSMTPAuthFailed && de.Reply != nil && de.Reply.Code >= 500 {
			de.rejectedToken = tok
		}
		return de
	}
	return nil
}
