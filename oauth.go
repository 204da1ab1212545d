package authmail

import (
	"errors"
	"fmt"
	"net/url"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// OAuth2 configures the refresh-token grant (RFC 6749 6) that gives
// authmail the access tokens for AUTH XOAUTH2 or OAUTHBEARER.
type OAuth2 struct {
	// TokenURL is the authorization server's token endpoint, e.g.
	// https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token or
	// https://oauth2.googleapis.com/token. https, or http to a loopback
	// address. Required.
	TokenURL string `json:"token_url,omitempty"`

	// ClientID is the OAuth2 client (application) id. Required.
	ClientID string `json:"client_id,omitempty"`

	// ClientSecret is the client secret. It accepts {env.*} and {file.*}
	// placeholders, expanded when the config loads. Default: none (a
	// public client).
	ClientSecret string `json:"client_secret,omitempty"`

	// RefreshToken is the long-lived refresh token obtained once by
	// consent. It accepts {env.*} and {file.*} placeholders. When the
	// server rotates it, authmail uses the new one from then on but keeps
	// it in memory only: after a restart it starts again from this value.
	// Required.
	RefreshToken string `json:"refresh_token,omitempty"`

	// Scopes are sent with each refresh, e.g.
	// https://outlook.office365.com/SMTP.Send offline_access. Default:
	// none (the scopes of the grant).
	Scopes []string `json:"scopes,omitempty"`
}

func (o *OAuth2) check() error {
	if o.TokenURL == "" {
		return errors.New("smtp oauth2: token_url is required")
	}
	u, err := url.Parse(o.TokenURL)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") || u.User != nil {
		return errors.New("smtp oauth2: token_url must be an absolute https URL")
	}
	if u.Scheme == "http" && !isLoopbackHost(u.Hostname()) {
		return errors.New("smtp oauth2: token_url must use https (http is only allowed to a loopback address)")
	}
	if o.ClientID == "" {
		return errors.New("smtp oauth2: client_id is required")
	}
	if o.RefreshToken == "" {
		return errors.New("smtp oauth2: refresh_token is required")
	}
	return nil
}

// checkOAuth validates the OAuth2 settings of an smtp block.
func (s *SMTP) checkOAuth() error {
	switch s.Auth {
	case "":
		if s.OAuth2 != nil || s.AccessToken != "" {
			return errors.New("smtp: oauth2 and access_token need auth xoauth2 or oauthbearer")
		}
		return nil
	case mailer.AuthXOAUTH2, mailer.AuthOAUTHBEARER:
	default:
		return fmt.Errorf("smtp: auth must be xoauth2 or oauthbearer (or unset for a password), not '%s'", s.Auth)
	}
	if s.Username == "" {
		return fmt.Errorf("smtp: auth %s needs the username (the mailbox the token belongs to)", s.Auth)
	}
	if s.Password != "" {
		return fmt.Errorf("smtp: auth %s authenticates with a token; remove the password", s.Auth)
	}
	switch {
	case s.OAuth2 != nil && s.AccessToken != "":
		return errors.New("smtp: give either oauth2 or access_token, not both")
	case s.OAuth2 != nil:
		return s.OAuth2.check()
	case s.AccessToken == "":
		return fmt.Errorf("smtp: auth %s needs an oauth2 block or an access_token", s.Auth)
	case !hasPlaceholder(s.AccessToken):
		return errors.New("smtp: access_token must be a {file.*} (or {env.*}) placeholder, read each time a connection authenticates")
	}
	return nil
}

// resolveOAuth expands the secrets of the OAuth2 settings.
func (s *SMTP) resolveOAuth(repl *caddy.Replacer) (*mailer.OAuthSettings, error) {
	if s.Auth == "" {
		return nil, nil
	}
	o := &mailer.OAuthSettings{Mech: s.Auth, AccessToken: s.AccessToken, Expand: func(v string) (string, error) {
		return expandSecret(caddy.NewReplacer(), "smtp access_token", v)
	}}
	if c := s.OAuth2; c != nil {
		o.TokenURL, o.ClientID, o.Scopes = c.TokenURL, c.ClientID, c.Scopes
		var err error
		if o.ClientSecret, err = expandSecret(repl, "smtp oauth2 client_secret", c.ClientSecret); err != nil {
			return nil, err
		}
		if o.RefreshToken, err = expandSecret(repl, "smtp oauth2 refresh_token", c.RefreshToken); err != nil {
			return nil, err
		}
		if o.RefreshToken == "" {
			return nil, errors.New("smtp oauth2: refresh_token is empty")
		}
	} else if _, err := expandSecret(repl, "smtp access_token", s.AccessToken); err != nil {
		// checked now so that a typo fails the load; read again at each
		// authentication
		return nil, err
	}
	return o, nil
}

// eachOptionOrBlock is eachOption for a block that also holds nested
// blocks: a subdirective named in blocks takes no value and is parsed by
// its function.
func eachOptionOrBlock(d *caddyfile.Dispenser, block string, blocks map[string]func() error, set func(sub, v string) error) error {
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("%s %s already specified", block, sub)
		}
		seen[sub] = true
		if parse, ok := blocks[sub]; ok {
			if err := parse(); err != nil {
				return err
			}
			continue
		}
		argErr := func() error {
			return d.Errf("%s %s: wrong argument count; expected one value (quote a value that holds spaces)", block, sub)
		}
		if !d.NextArg() {
			return argErr()
		}
		v := d.Val()
		if d.NextArg() {
			return argErr()
		}
		if err := set(sub, v); err != nil {
			return err
		}
	}
	return nil
}

// unmarshalOAuth2 parses `oauth2 { token_url …; client_id …; … }`. Errors
// never quote a value: client_secret and refresh_token may be literal.
func unmarshalOAuth2(d *caddyfile.Dispenser) (*OAuth2, error) {
	if d.NextArg() {
		return nil, d.Errf("smtp oauth2 takes no arguments, only a block")
	}
	o := &OAuth2{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return nil, d.Errf("smtp oauth2 %s already specified", sub)
		}
		seen[sub] = true
		args := d.RemainingArgs()
		if sub == "scopes" {
			if len(args) == 0 {
				return nil, d.Errf("smtp oauth2 scopes: expected at least one scope")
			}
			o.Scopes = args
			continue
		}
		if len(args) != 1 {
			return nil, d.Errf("smtp oauth2 %s: wrong argument count; expected one value (quote a value that holds spaces)", sub)
		}
		switch sub {
		case "token_url":
			o.TokenURL = args[0]
		case "client_id":
			o.ClientID = args[0]
		case "client_secret":
			o.ClientSecret = args[0]
		case "refresh_token":
			o.RefreshToken = args[0]
		default:
			return nil, d.Errf("unrecognized smtp oauth2 subdirective '%s'", sub)
		}
	}
	if err := o.check(); err != nil {
		return nil, d.WrapErr(err)
	}
	return o, nil
}
