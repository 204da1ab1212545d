package mailer

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/wneessen/go-mail/smtp"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/pace"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
	"github.com/caddy-authmail/authmail/internal/redact"
)

// TLS modes for the SMTP connection.
const (
	TLSStartTLS = "starttls"
	TLSImplicit = "implicit"
	TLSNone     = "none"
)

// Tunables that are not part of the public config. Tests shorten them.
var (
	smtpIdleTimeout = 60 * time.Second // close connections idle this long
	smtpQuitTimeout = 2 * time.Second  // bound for a polite QUIT
)

// SMTPSettings is the resolved (secrets expanded) SMTP configuration.
type SMTPSettings struct {
	Host        string
	Port        int
	TLSMode     string
	CAPEM       []byte
	TLSConfig   *tls.Config
	Username    string
	Password    string
	HELO        string
	Timeout     time.Duration
	Connections int
	// OAuth, when set, authenticates with OAuth2 access tokens instead of
	// the password
	OAuth *OAuthSettings
	// NoPipelining sends MAIL, each RCPT and DATA one at a time even when
	// the server offers PIPELINING (tests use it to cover that path)
	NoPipelining bool
	// Rate is the send-Rate cap (zero: none) and burst its burst (zero:
	// the pacer's default)
	Rate  ratelimit.Spec
	Burst int
}

// PoolKey identifies the sender for these settings. Every field that
// changes a connection is part of it; the password only as a hash.
func (s *SMTPSettings) PoolKey() string {
	h := sha256.New()
	for _, v := range append([]string{
		s.Host, strconv.Itoa(s.Port), s.TLSMode, s.Username, s.Password,
		string(s.CAPEM), s.HELO, s.Timeout.String(), strconv.Itoa(s.Connections), strconv.FormatBool(s.NoPipelining),
		strconv.Itoa(s.Rate.N), s.Rate.Window.String(), strconv.Itoa(s.Burst),
	}, s.OAuth.key()...) {
		// length-prefix each field so that no two configs collide
		fmt.Fprintf(h, "%d:%s|", len(v), v)
	}
	return "authmail.smtp." + hex.EncodeToString(h.Sum(nil))
}

// Route names the server and account messages go through, for the
// sender profile: host, port and user, without the password or the
// connection settings, so that fixing credentials or tuning keeps it.
func (s *SMTPSettings) Route() string {
	return fmt.Sprintf("smtp %s %d %d:%s", strings.ToLower(s.Host), s.Port, len(s.Username), s.Username)
}

// Sender delivers messages over up to settings.connections parallel
// SMTP connections that stay open and are reused.
type Sender struct {
	cfg         SMTPSettings
	slots       chan struct{} // one token per connection that may be in use
	idleTimeout time.Duration

	mu     sync.Mutex
	idle   []*smtpConn // most recently used last
	closed bool

	done chan struct{} // closed by Destruct; stops the janitor

	tokens *tokenSource // OAuth2 access tokens; nil with a password

	// pacer keeps the sending within the server's rate: the configured
	// cap, lowered by throttling replies (see internal/pace). It lives as
	// long as the sender, so a reload that keeps the server keeps its
	// current rate.
	pacer *pace.Pacer
	// share, with a configured rate, divides it with the other instances
	// of a cluster through the outbox's storage (ShareRate); stopShare
	// ends it and deletes this instance's record
	share     *pace.Share
	stopShare context.CancelFunc
	// shareSt and shareID are the storage and instance id the share runs
	// on: a reload that moves the outbox to another storage moves the
	// share with it
	shareSt certmagic.Storage
	shareID string

	open  atomic.Int64 // currently open connections
	dials atomic.Int64 // successful dials since creation

	// redactSet holds the secrets of redactOf, which results and
	// failures are cleaned of (redacted); remade when a token changes
	redactMu  sync.Mutex
	redactSet *redact.Set
	redactOf  []string
}

func NewSender(cfg SMTPSettings) *Sender {
	s := &Sender{
		cfg:         cfg,
		slots:       make(chan struct{}, cfg.Connections),
		idleTimeout: smtpIdleTimeout,
		done:        make(chan struct{}),
	}
	if cfg.OAuth != nil {
		s.tokens = newTokenSource(cfg.OAuth, cfg.Timeout)
	}
	// the settings were validated: New cannot fail on them
	s.pacer, _ = pace.New(pace.Config{Limit: cfg.Rate.N, Window: cfg.Rate.Window, Burst: cfg.Burst})
	go s.janitor()
	return s
}

// Settings returns the settings the sender was made with.
func (s *Sender) Settings() SMTPSettings { return s.cfg }

// Pacer returns the sender's pacer, for its rate in /status and the
// metrics.
func (s *Sender) Pacer() *pace.Pacer { return s.pacer }

// Destruct is called by the usage pool when the last config using this
// sender is cleaned up. Idle connections are closed now; sends still in
// flight on an old handler finish and close their connection afterwards.
func (s *Sender) Destruct() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	idle := s.idle
	s.idle = nil
	s.mu.Unlock()
	if s.stopShare != nil {
		s.stopShare()
	}
	close(s.done)
	for _, c := range idle {
		s.closeConn(c)
	}
	return nil
}

// ShareRate makes a configured rate the cluster's: every instance that
// sends through this server with the same storage takes its share of
// the rate (internal/pace.Share: demand-weighted, rebalanced every
// second, a throttle seen by one slows all). Without a rate it does
// nothing; a share that runs on the same storage as the same instance
// stays, and one on another storage or instance id is replaced. A storage that fails keeps the last share
// for a few seconds, then the least one: the cluster stays under the
// provider's cap rather than over it.
func (s *Sender) ShareRate(st certmagic.Storage, instance string, demand func() int, logger *zap.Logger) {
	if s.cfg.Rate.N == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.share != nil && s.shareSt == st && s.shareID == instance {
		return
	}
	if s.share != nil {
		// the sender outlived a reload that gave the outbox another
		// storage (or identity): the old share's storage may be closed
		// with its config, so share through the new one. Stopping the old
		// share deletes its record, and the other instances there stop
		// counting this one at once.
		s.stopShare()
		s.share, s.stopShare = nil, nil
	}
	sum := sha256.Sum256([]byte(s.cfg.Route()))
	sh, err := pace.NewShare(st, hex.EncodeToString(sum[:8]), instance, s.pacer, demand, pace.ShareOptions{})
	if err != nil {
		logger.Error("sharing the SMTP rate with the cluster failed; this instance sends at the whole rate", zap.Error(err))
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.share, s.stopShare, s.shareSt, s.shareID = sh, cancel, st, instance
	go sh.Run(ctx)
}

// janitor closes connections that have been idle too long.
func (s *Sender) janitor() {
	every := s.idleTimeout / 2
	if every < 50*time.Millisecond {
		every = 50 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
			for _, c := range s.expired() {
				s.closeConn(c)
			}
		}
	}
}

func (s *Sender) expired() []*smtpConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	var old []*smtpConn
	keep := s.idle[:0]
	for _, c := range s.idle {
		if time.Since(c.lastUsed) >= s.idleTimeout {
			old = append(old, c)
		} else {
			keep = append(keep, c)
		}
	}
	for i := len(keep); i < len(s.idle); i++ {
		s.idle[i] = nil
	}
	s.idle = keep
	return old
}

// takeIdle returns the most recently used idle connection, or nil.
func (s *Sender) takeIdle() *smtpConn {
	var stale []*smtpConn
	defer func() {
		for _, c := range stale {
			s.closeConn(c)
		}
	}()
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.idle) > 0 {
		c := s.idle[len(s.idle)-1]
		s.idle[len(s.idle)-1] = nil
		s.idle = s.idle[:len(s.idle)-1]
		if time.Since(c.lastUsed) >= s.idleTimeout {
			stale = append(stale, c)
			continue
		}
		return c
	}
	return nil
}

// dropIdle closes every idle connection; used when one of them turned out
// dead, which usually means the server dropped all of them.
func (s *Sender) dropIdle() {
	s.mu.Lock()
	idle := s.idle
	s.idle = nil
	s.mu.Unlock()
	for _, c := range idle {
		s.closeConn(c)
	}
}

func (s *Sender) putIdle(c *smtpConn) {
	c.lastUsed = time.Now()
	s.mu.Lock()
	if !s.closed {
		s.idle = append(s.idle, c)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.closeConn(c)
}

func (s *Sender) closeConn(c *smtpConn) {
	if c.closed {
		return
	}
	c.closed = true
	if !c.inData {
		_ = c.raw.SetDeadline(time.Now().Add(smtpQuitTimeout))
		_ = c.client.Quit()
	}
	_ = c.raw.Close()
	s.open.Add(-1)
}

// OpenConnections reports the number of open SMTP connections.
func (s *Sender) OpenConnections() int64 { return s.open.Load() }

// Send delivers env. It waits for a free connection slot (bounded by
// ctx), reuses an idle connection when there is one, and transparently
// redials once when a reused connection turns out to be dead before the
// server accepted anything.
func (s *Sender) Send(ctx context.Context, env *Envelope) (Result, error) {
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		return Result{}, &Error{Code: CodeSMTPTimeout, Phase: PhaseConnect,
			Err: fmt.Errorf("no free SMTP connection before the request ended: %w", ctx.Err())}
	}
	defer func() { <-s.slots }()

	// Waiting for the rate happens before anything is sent, holding only
	// a connection slot: a crash or a timeout here leaves the message
	// untouched, to be attempted again.
	// A wait longer than the SMTP timeout (a quota pause, a slow rate
	// with many messages ahead) goes back to the queue until the pacer's
	// time instead of holding the slot.
	if next := s.pacer.Next(time.Now()); time.Until(next) > s.cfg.Timeout {
		return Result{}, &Error{Code: CodeSMTPThrottled, Phase: PhaseConnect, RetryAt: next}
	}
	if err := s.pacer.WaitPriority(ctx, env.Urgent); err != nil {
		return Result{}, &Error{Code: CodeSMTPThrottled, Phase: PhaseConnect, RetryAt: s.pacer.Next(time.Now())}
	}
	sentAt := time.Now()
	d, err := s.sendNow(ctx, env)
	s.paced(sentAt, err)
	return s.redacted(d, err)
}

// redacted removes the sender's secrets (password, client secret,
// refresh and access tokens), in every encoding, from the texts of a
// result or failure that the server or the token endpoint wrote: a
// server may echo the base64 of an AUTH exchange, a token endpoint the
// request form. Send is the one way out of a Sender, and what leaves it
// becomes last_error and smtp_response (readable by any app key through
// GET /messages), log fields, the test send's answer and, for the code,
// webhooks; so this is where provider text is cleaned, once, before the
// cut to its length.
func (s *Sender) redacted(d Result, err error) (Result, error) {
	de, _ := err.(*Error)
	if d.raw == "" && de == nil {
		return d, err
	}
	extra := ""
	if de != nil {
		extra = de.rejectedToken
	}
	r := s.redaction(extra)
	if d.raw != "" {
		d.Response, d.raw = r.Line(d.raw, 200), ""
	}
	if de != nil {
		de.redact(r)
	}
	return d, err
}

// redaction returns the set of the sender's current secrets, and extra;
// the set is kept until a token changes.
func (s *Sender) redaction(extra string) *redact.Set {
	secrets := []string{s.cfg.Password, extra}
	if s.tokens != nil {
		secrets = append(secrets, s.tokens.secrets()...)
	}
	s.redactMu.Lock()
	defer s.redactMu.Unlock()
	if s.redactSet == nil || !slices.Equal(secrets, s.redactOf) {
		s.redactSet, s.redactOf = redact.New(secrets...), secrets
	}
	return s.redactSet
}

// paced tells the pacer how a send went: a success raises the current
// rate, a reply that means "slow down" lowers it (or pauses the server
// for a used-up quota) and turns the failure into smtp_throttled, which
// the outbox retries as soon as the lowered rate allows instead of after
// retry_backoff. A throttle is never uncertain: the reply came, so the
// server did not take the message.
func (s *Sender) paced(sentAt time.Time, err error) {
	now := time.Now()
	if err == nil {
		s.pacer.Succeeded(now)
		return
	}
	de, ok := err.(*Error)
	if !ok || de.Reply == nil || de.Code == CodeUncertain {
		return
	}
	switch pace.Classify(de.Reply.Code, de.Reply.Enhanced, de.Reply.Text) {
	case pace.Rate, pace.Connections:
		s.pacer.Throttled(now, sentAt)
	case pace.Quota:
		s.pacer.Exhausted(now)
	default:
		return
	}
	de.Code = CodeSMTPThrottled
	de.RetryAt = s.pacer.Next(now)
}

// sendNow is send once the rate allows it.
func (s *Sender) sendNow(ctx context.Context, env *Envelope) (Result, error) {
	conn := s.takeIdle()
	for attempt := 0; ; attempt++ {
		reused := conn != nil
		if conn == nil {
			var err *Error
			conn, err = s.dial(ctx, "")
			if err != nil && err.rejectedToken != "" && s.tokens.canRenew() {
				// the server refused an access token it should have taken
				// (revoked, or expired early): one more try with a fresh one
				conn, err = s.dial(ctx, err.rejectedToken)
			}
			if err != nil {
				return Result{}, err
			}
		}
		d, err, healthy := conn.transact(s.cfg.Timeout, env)
		if healthy {
			s.putIdle(conn)
		} else {
			s.closeConn(conn)
		}
		if err == nil {
			d.Status = "sent"
			return d, nil
		}
		if reused && attempt == 0 && err.fresh {
			s.dropIdle()
			conn = nil
			continue
		}
		return Result{}, err
	}
}

// dial opens, secures and authenticates a new connection. It never
// leaves a socket open on failure.
//
// rejected is an access token the server refused on the previous dial;
// the token source then fetches a new one.
func (s *Sender) dial(ctx context.Context, rejected string) (*smtpConn, *Error) {
	cfg := &s.cfg
	d := net.Dialer{Timeout: cfg.Timeout}
	raw, err := d.DialContext(ctx, "tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port)))
	if err != nil {
		return nil, classify(PhaseConnect, err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = raw.Close()
		}
	}()
	deadline := func() { _ = raw.SetDeadline(time.Now().Add(cfg.Timeout)) }
	deadline()

	var conn net.Conn = raw
	if cfg.TLSMode == TLSImplicit {
		tc := tls.Client(raw, cfg.TLSConfig)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, classify(PhaseConnect, err)
		}
		conn = tc
	}
	client, err := smtp.NewClient(conn, cfg.Host)
	if err != nil {
		return nil, classify(PhaseGreeting, err)
	}
	client.SkipSMTPUTF8(true)
	deadline()
	if err := client.Hello(cfg.HELO); err != nil {
		return nil, classify(PhaseHello, unwrapHello(err))
	}
	if cfg.TLSMode == TLSStartTLS {
		if has, _ := client.Extension("STARTTLS"); !has {
			return nil, &Error{Code: CodeStartTLSUnsupported, Phase: PhaseStartTLS}
		}
		deadline()
		if err := client.StartTLS(cfg.TLSConfig); err != nil {
			return nil, classify(PhaseStartTLS, err)
		}
	}
	if s.tokens != nil {
		if de := s.authToken(ctx, client, rejected, deadline); de != nil {
			return nil, de
		}
	} else if cfg.Username != "" {
		deadline()
		auth, err := s.pickAuth(client)
		if err != nil {
			return nil, &Error{Code: CodeSMTPAuthFailed, Phase: PhaseAuth, Err: err}
		}
		if err := client.Auth(auth); err != nil {
			return nil, classify(PhaseAuth, err)
		}
	}
	if cfg.TLSMode != TLSNone {
		// refuse to go on unless the connection really is encrypted
		if _, isTLS := client.TLSConnectionState(); !isTLS {
			return nil, &Error{Code: CodeStartTLSUnsupported, Phase: PhaseStartTLS}
		}
	}
	ok = true
	s.open.Add(1)
	s.dials.Add(1)
	c := &smtpConn{raw: raw, client: client}
	if has, _ := client.Extension("PIPELINING"); has && !s.cfg.NoPipelining {
		c.pipelining = true
	}
	if has, _ := client.Extension("8BITMIME"); has {
		c.mailParams = " BODY=8BITMIME" // what go-mail's Mail adds
	}
	return c, nil
}

// unwrapHello returns the EHLO error when both EHLO and HELO failed, so
// that the EHLO reply is what gets classified.
func unwrapHello(err error) error {
	if u, ok := err.(interface{ Unwrap() []error }); ok {
		if errs := u.Unwrap(); len(errs) > 0 {
			return errs[0]
		}
	}
	return err
}

// errNoAuthMechanism is returned when the server offers no mechanism we
// can use safely.
var errNoAuthMechanism = errors.New("the SMTP server offers no supported authentication mechanism (supported: PLAIN, LOGIN, SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5)")

// pickAuth chooses the authentication mechanism from what the server
// advertises. Over TLS (which is always the case unless tls none to a
// loopback relay) PLAIN is universal and preferred.
func (s *Sender) pickAuth(c *smtp.Client) (smtp.Auth, error) {
	has, list := c.Extension("AUTH")
	if !has {
		return nil, errors.New("the SMTP server does not offer AUTH, but a username is configured")
	}
	offered := map[string]bool{}
	for _, m := range strings.Fields(strings.ToUpper(list)) {
		offered[m] = true
	}
	cfg := &s.cfg
	// plaintext auth is only ever allowed where Validate permitted tls none
	allowUnenc := cfg.TLSMode == TLSNone
	switch {
	case offered["PLAIN"]:
		return smtp.PlainAuth("", cfg.Username, cfg.Password, cfg.Host, allowUnenc), nil
	case offered["LOGIN"]:
		return smtp.LoginAuth(cfg.Username, cfg.Password, cfg.Host, allowUnenc), nil
	case offered["SCRAM-SHA-256"]:
		return smtp.ScramSHA256Auth(cfg.Username, cfg.Password), nil
	case offered["SCRAM-SHA-1"]:
		return smtp.ScramSHA1Auth(cfg.Username, cfg.Password), nil
	case offered["CRAM-MD5"]:
		return smtp.CRAMMD5Auth(cfg.Username, cfg.Password), nil
	}
	return nil, errNoAuthMechanism
}

// smtpConn is one open, authenticated SMTP session. It is used by one
// goroutine at a time (whoever holds it outside the idle list).
type smtpConn struct {
	raw      net.Conn // the TCP connection, for deadlines and closing
	client   *smtp.Client
	lastUsed time.Time
	closed   bool
	// pipelining: the server announced PIPELINING (RFC 2920), so MAIL,
	// the RCPTs and DATA go out in one write
	pipelining bool
	mailParams string // appended to MAIL FROM, e.g. " BODY=8BITMIME"
	// inData: the server is reading a message whose final dot was not
	// sent. Such a connection is only ever closed, never written to: any
	// command (QUIT included) would first end the open message with a dot
	// (textproto closes an open DotWriter) and deliver it, truncated.
	inData bool
}

// transact runs one mail transaction. healthy reports whether the
// connection can be reused afterwards.
func (c *smtpConn) transact(timeout time.Duration, env *Envelope) (d Result, derr *Error, healthy bool) {
	deadline := func() { _ = c.raw.SetDeadline(time.Now().Add(timeout)) }

	fail := func(phase string, err error) (Result, *Error, bool) {
		de, healthy := c.failed(phase, err, deadline)
		return Result{}, de, healthy
	}

	// refusals collects RCPT refusals; the first permanent one decides
	// the outcome
	var firstRefusal *Error
	refused, permanent := 0, false
	refuse := func(r *Reply, err error) {
		refused++
		if r.Code >= 500 && !permanent {
			permanent = true
			firstRefusal = &Error{Code: CodeRecipientRefused, Phase: PhaseRcpt, Reply: r, Err: err}
		} else if firstRefusal == nil {
			firstRefusal = &Error{Code: CodeSMTPTransient, Phase: PhaseRcpt, Reply: r, Err: err}
		}
	}
	refusal := func() *Error {
		firstRefusal.Refused = refused
		firstRefusal.Recipients = len(env.To)
		return firstRefusal
	}

	var body io.WriteCloser
	if c.pipelining {
		// MAIL, every RCPT and DATA in one write, then their replies in
		// order: one round trip where there were 2 + recipients
		dataOpen, de, healthy := c.pipeline(env, deadline, refuse)
		if de != nil {
			return Result{}, de, healthy
		}
		if refused > 0 {
			if dataOpen {
				// DATA was accepted although a recipient was refused: the
				// only way out that delivers to nobody is to hang up
				// before the final dot
				return Result{}, refusal(), false
			}
			return Result{}, refusal(), c.reset(deadline)
		}
		if !dataOpen {
			// cannot happen: pipeline opens DATA, fails or reports refusals
			return Result{}, &Error{Code: CodeSMTPConnection, Phase: PhaseData,
				Err: errors.New("the server did not open DATA")}, false
		}
		body = c.client.Text.DotWriter()
	} else {
		deadline()
		if err := c.client.Mail("<" + env.From + ">"); err != nil {
			return fail(PhaseMail, err)
		}
		for _, rcpt := range env.To {
			deadline()
			err := c.client.Rcpt("<" + rcpt + ">")
			if err == nil {
				continue
			}
			if endsSession(err) {
				return fail(PhaseRcpt, err)
			}
			refuse(replyFrom(err), err)
		}
		if refused > 0 {
			// never deliver to a subset of the recipients
			return Result{}, refusal(), c.reset(deadline)
		}
		deadline()
		w, err := c.client.Data()
		if err != nil {
			return fail(PhaseData, err)
		}
		c.inData = true
		dc, ok := w.(*smtp.DataCloser)
		if !ok {
			// cannot happen with go-mail v0.8; refuse rather than guess
			return Result{}, &Error{Code: CodeSMTPConnection, Phase: PhaseData,
				Err: errors.New("unexpected SMTP data writer")}, false
		}
		body = dc.WriteCloser
	}
	deadline()
	if _, err := body.Write(env.Data); err != nil {
		return fail(PhaseBody, err)
	}
	// The dot commits the message: the outbox records that it may be on
	// its way first, so that a crash from here on leaves it unknown and
	// before here leaves it to be retried. Without that record the dot
	// never goes out: the connection is closed inside DATA.
	if env.BeforeDot != nil {
		if err := env.BeforeDot(); err != nil {
			return Result{}, &Error{Code: CodeOutboxUnavailable, Phase: PhaseBody, Err: err}, false
		}
	}
	// Close writes and flushes the final dot. If that fails, the server
	// has not received the end of the message and cannot accept it.
	if err := body.Close(); err != nil {
		return fail(PhaseBody, err)
	}
	c.inData = false
	_, msg, err := c.client.Text.ReadResponse(250)
	if err != nil {
		return fail(PhaseEnd, err)
	}
	// Sender.redacted makes Response of raw, cleaned of the sender's secrets
	return Result{raw: msg}, nil, true
}

// endsSession reports whether a command's error leaves the session
// unusable: no reply (the connection failed) or a 421.
func endsSession(err error) bool {
	r := replyFrom(err)
	return r == nil || r.Code == 421
}

// failed classifies err in phase. A failure that is not a plain reply,
// or a 421 (the server is closing the session), leaves the connection
// unusable; before the final dot it is worth one retry on a fresh
// connection when this one was reused. After a plain reply the
// transaction is reset, and healthy says whether that worked.
func (c *smtpConn) failed(phase string, err error, deadline func()) (de *Error, healthy bool) {
	de = classify(phase, err)
	if de.Reply == nil {
		de.fresh = phase != PhaseEnd
		return de, false
	}
	if de.Reply.Code == 421 {
		de.fresh = phase == PhaseMail || phase == PhaseRcpt || phase == PhaseData
		return de, false
	}
	return de, c.reset(deadline)
}

// pipeline sends MAIL, the RCPTs and DATA in one write (RFC 2920) and
// reads their replies in order. dataOpen reports that the server accepted
// DATA and now reads the message, and RCPT refusals go to refuse. Any other
// failure is returned classified; when it was a plain reply, the rest of
// the replies have been read and the transaction reset, so healthy says
// whether the connection can be reused.
func (c *smtpConn) pipeline(env *Envelope, deadline func(), refuse func(*Reply, error)) (dataOpen bool, de *Error, healthy bool) {
	if strings.ContainsAny(env.From, "\r\n") {
		return false, &Error{Code: CodeSMTPRejected, Phase: PhaseMail, Err: errors.New("sender address contains a line break")}, true
	}
	for _, rcpt := range env.To {
		if strings.ContainsAny(rcpt, "\r\n") {
			return false, &Error{Code: CodeRecipientRefused, Phase: PhaseRcpt, Err: errors.New("recipient address contains a line break")}, true
		}
	}
	fail := func(phase string, err error) (bool, *Error, bool) {
		de, healthy := c.failed(phase, err, deadline)
		return false, de, healthy
	}
	t := c.client.Text
	deadline()
	_, _ = t.W.WriteString("MAIL FROM:<" + env.From + ">" + c.mailParams + "\r\n")
	for _, rcpt := range env.To {
		_, _ = t.W.WriteString("RCPT TO:<" + rcpt + ">\r\n")
	}
	_, _ = t.W.WriteString("DATA\r\n")
	if err := t.W.Flush(); err != nil {
		return fail(PhaseMail, err)
	}
	// a connection failure or a 421 ends the exchange at once; after a
	// plain refusal the remaining replies are read first, so that the
	// connection can be reset and reused
	deadline()
	_, _, mailErr := t.ReadResponse(250)
	if mailErr != nil && endsSession(mailErr) {
		return fail(PhaseMail, mailErr)
	}
	accepted := 0
	for range env.To {
		_, _, err := t.ReadResponse(25)
		if err == nil {
			accepted++
			continue
		}
		if endsSession(err) {
			return fail(PhaseRcpt, err)
		}
		if mailErr == nil {
			refuse(replyFrom(err), err)
		}
	}
	_, _, dataErr := t.ReadResponse(354)
	if dataErr != nil && endsSession(dataErr) {
		return fail(PhaseData, dataErr)
	}
	switch {
	case mailErr != nil && dataErr == nil:
		// DATA accepted after a refused MAIL: hang up before the dot
		c.inData = true
		return true, classify(PhaseMail, mailErr), false
	case mailErr != nil:
		return fail(PhaseMail, mailErr)
	case dataErr == nil:
		c.inData = true
		return true, nil, true
	case accepted < len(env.To):
		// DATA fails when no recipient was accepted; the caller reports
		// the refusals and resets
		return false, nil, true
	default:
		return fail(PhaseData, dataErr)
	}
}

// reset aborts the current transaction; the connection is reusable only
// when the server acknowledges.
func (c *smtpConn) reset(deadline func()) bool {
	deadline()
	return c.client.Reset() == nil
}
