// Package smtptest runs a real SMTP server in-process for tests: go-smtp
// with STARTTLS or implicit TLS on a freshly generated self-signed
// certificate, AUTH (PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1 or
// SCRAM-SHA-256, XOAUTH2 or OAUTHBEARER), a record of every transaction, and hooks to inject
// faults (replies, dropped connections, slow replies).
package smtptest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/md5"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"hash"
	"io"
	"log"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// TLS modes.
const (
	StartTLS = "starttls"
	Implicit = "implicit"
	None     = "none"
)

// ErrDrop, returned by a hook, closes the connection without a reply.
var ErrDrop = errors.New("smtptest: drop the connection")

// Options configure a Server.
type Options struct {
	// TLS is StartTLS (default), Implicit or None.
	TLS string
	// Username and Password, when set, make AUTH mandatory before MAIL.
	Username, Password string
	// Mechanisms are the AUTH mechanisms offered, in order: "PLAIN",
	// "LOGIN", "CRAM-MD5", "SCRAM-SHA-1" and "SCRAM-SHA-256" are
	// implemented. Default: PLAIN.
	Mechanisms []string
	// Dir receives the CA file; default: a new temporary directory.
	Dir string
	// Addr is the address to listen on; default: a free loopback port.
	// Restarting a server on the Addr of a closed one simulates an SMTP
	// server that was down and comes back.
	Addr string
	// CheckToken, when set, checks the OAuth2 bearer token of AUTH
	// XOAUTH2 and OAUTHBEARER (offered when listed in Mechanisms) for
	// Username; a refused token gets the mechanism's JSON error challenge
	// and then 535 5.7.8, as Gmail and Microsoft 365 answer.
	CheckToken func(username, token string) bool
	// CertPEM and KeyPEM reuse a certificate (e.g. across a restart);
	// default: a new self-signed one.
	CertPEM, KeyPEM []byte
	// Throttle, when set, refuses messages above a rate (see Throttle).
	Throttle *Throttle
}

// Hooks inject faults. Each returns nil to accept, an *smtp.SMTPError to
// reply with, or ErrDrop to close the connection without replying.
type Hooks struct {
	Mail func(from string) error
	Rcpt func(to string) error
	// DataStart runs when the server has answered DATA with 354, before
	// it reads the message; blocking in it stalls the reading, so that a
	// large message fills the socket buffers and the client's writes block.
	DataStart func()
	// Data runs after the whole message, before the reply to the final
	// dot. Sleeping in it simulates a slow server.
	Data func(m *Message) error
}

// Message is one transaction the server saw through DATA.
type Message struct {
	From     string
	To       []string
	Data     []byte
	TLS      bool
	AuthUser string
	// AuthMechanism is the SASL mechanism the session authenticated with.
	AuthMechanism string
	// Conn numbers the connection the message arrived on, from 1.
	Conn int
	// Accepted is false when a hook refused or dropped it.
	Accepted bool
	// Received is when the whole message had arrived.
	Received time.Time
}

// Server is a running SMTP server.
type Server struct {
	Host   string
	Port   int
	Addr   string
	CAFile string
	CAPEM  []byte
	KeyPEM []byte

	opts Options
	srv  *smtp.Server
	ln   net.Listener

	mu    sync.Mutex
	hooks Hooks
	msgs  []*Message
	// aborted holds what arrived of each message whose DATA ended
	// without the final dot (the client hung up)
	aborted [][]byte
	conns   int
	open    int
	auths   int
	live    map[*trackedConn]bool
	notify  chan struct{}

	throttle *throttler
}

// Start starts a server for the test and stops it at the end of the test.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	s, err := New(opts)
	if err != nil {
		t.Fatalf("smtptest: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// New starts a server on a free loopback port.
func New(opts Options) (*Server, error) {
	if opts.TLS == "" {
		opts.TLS = StartTLS
	}
	if opts.Dir == "" {
		d, err := os.MkdirTemp("", "smtptest-")
		if err != nil {
			return nil, err
		}
		opts.Dir = d
	}
	var cert tls.Certificate
	var certPEM, keyPEM []byte
	var err error
	if opts.CertPEM != nil {
		certPEM, keyPEM = opts.CertPEM, opts.KeyPEM
		cert, err = tls.X509KeyPair(certPEM, keyPEM)
	} else {
		cert, certPEM, keyPEM, err = selfSigned()
	}
	if err != nil {
		return nil, err
	}
	s := &Server{opts: opts, CAPEM: certPEM, KeyPEM: keyPEM, notify: make(chan struct{}, 1), live: map[*trackedConn]bool{}}
	if opts.Throttle != nil {
		s.throttle = newThrottler(opts.Throttle)
	}
	s.CAFile = filepath.Join(opts.Dir, "smtptest-ca.pem")
	if err := os.WriteFile(s.CAFile, certPEM, 0o600); err != nil {
		return nil, err
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}

	srv := smtp.NewServer(s)
	srv.Domain = "smtptest.local"
	srv.ReadTimeout = 30 * time.Second
	srv.WriteTimeout = 30 * time.Second
	srv.MaxMessageBytes = 32 << 20
	srv.MaxRecipients = 1000
	srv.ErrorLog = log.New(io.Discard, "", 0)
	addr := opts.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	tcp, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	var ln net.Listener = &countingListener{Listener: tcp, s: s}
	switch opts.TLS {
	case StartTLS:
		srv.TLSConfig = tlsConf
	case Implicit:
		ln = tls.NewListener(ln, tlsConf)
	case None:
		srv.AllowInsecureAuth = true
	default:
		_ = ln.Close()
		return nil, fmt.Errorf("unknown TLS mode %q", opts.TLS)
	}
	s.srv, s.ln = srv, ln
	s.Addr = ln.Addr().String()
	host, port, _ := net.SplitHostPort(s.Addr)
	s.Host = host
	s.Port, _ = strconv.Atoi(port)
	go func() { _ = srv.Serve(ln) }()
	return s, nil
}

// Close stops the server and closes open connections. The listener is
// closed here too: go-smtp's Close only closes the listeners its Serve
// has registered, so a Close right after Start, before the serving
// goroutine ran, would leave the port accepting mail.
func (s *Server) Close() error {
	err := s.srv.Close()
	if lerr := s.ln.Close(); lerr != nil && err == nil && !errors.Is(lerr, net.ErrClosed) {
		err = lerr
	}
	return err
}

// SetHooks replaces the fault hooks.
func (s *Server) SetHooks(h Hooks) {
	s.mu.Lock()
	s.hooks = h
	s.mu.Unlock()
}

// Messages returns the messages accepted so far.
func (s *Server) Messages() []*Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*Message
	for _, m := range s.msgs {
		if m.Accepted {
			out = append(out, m)
		}
	}
	return out
}

// Aborted returns, for every DATA that ended without the final dot (the
// client hung up), the bytes that arrived of the message.
func (s *Server) Aborted() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]byte(nil), s.aborted...)
}

// Attempts returns every message that went through DATA, accepted or not.
func (s *Server) Attempts() []*Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*Message(nil), s.msgs...)
}

// WaitMessages waits until at least n messages were accepted.
func (s *Server) WaitMessages(n int, timeout time.Duration) []*Message {
	deadline := time.Now().Add(timeout)
	for {
		if m := s.Messages(); len(m) >= n || time.Now().After(deadline) {
			return m
		}
		select {
		case <-s.notify:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Reset forgets the recorded messages and counters (not open connections).
func (s *Server) Reset() {
	s.mu.Lock()
	s.msgs, s.aborted, s.conns, s.auths = nil, nil, 0, 0
	s.mu.Unlock()
}

// ClearMessages forgets the recorded messages but keeps the counters.
func (s *Server) ClearMessages() {
	s.mu.Lock()
	s.msgs, s.aborted = nil, nil
	s.mu.Unlock()
}

// Connections returns how many connections were accepted since Reset.
func (s *Server) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

// OpenConnections returns how many connections are open now.
func (s *Server) OpenConnections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

// Auths returns how many successful AUTH exchanges happened since Reset.
func (s *Server) Auths() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.auths
}

// NewSession implements smtp.Backend. go-smtp starts a new session after
// STARTTLS, so connections are counted by the listener, not here.
func (s *Server) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return &session{s: s, c: c, conn: connNumber(c.Conn())}, nil
}

// DropConnections closes every open connection without a goodbye, like
// a server restarting or timing out idle sessions.
func (s *Server) DropConnections() {
	s.mu.Lock()
	var live []*trackedConn
	for c := range s.live {
		live = append(live, c)
	}
	s.mu.Unlock()
	for _, c := range live {
		_ = c.Close()
	}
}

// countingListener numbers and tracks the TCP connections it accepts.
type countingListener struct {
	net.Listener
	s *Server
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.s.mu.Lock()
	l.s.conns++
	l.s.open++
	tc := &trackedConn{Conn: c, s: l.s, n: l.s.conns}
	l.s.live[tc] = true
	l.s.mu.Unlock()
	return tc, nil
}

type trackedConn struct {
	net.Conn
	s    *Server
	n    int
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.s.mu.Lock()
		c.s.open--
		delete(c.s.live, c)
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}

func connNumber(c net.Conn) int {
	for {
		switch x := c.(type) {
		case *trackedConn:
			return x.n
		case *tls.Conn:
			c = x.NetConn()
		default:
			return 0
		}
	}
}

type session struct {
	s        *Server
	c        *smtp.Conn
	conn     int
	authUser string
	authMech string
	from     string
	to       []string
}

func (ss *session) hooks() Hooks {
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	return ss.s.hooks
}

func (ss *session) drop() error {
	_ = ss.c.Conn().Close()
	return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "dropped"}
}

func (ss *session) AuthMechanisms() []string {
	if ss.s.opts.Username == "" {
		return nil
	}
	if len(ss.s.opts.Mechanisms) > 0 {
		return ss.s.opts.Mechanisms
	}
	return []string{sasl.Plain}
}

func (ss *session) Auth(mech string) (sasl.Server, error) {
	check := func(username string, ok bool) error {
		if username != ss.s.opts.Username || !ok {
			return &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Authentication credentials invalid"}
		}
		ss.authUser, ss.authMech = username, mech
		ss.s.mu.Lock()
		ss.s.auths++
		ss.s.mu.Unlock()
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, username, password string) error {
			return check(username, password == ss.s.opts.Password)
		}), nil
	case sasl.Login:
		return &loginServer{check: func(u, p string) error { return check(u, p == ss.s.opts.Password) }}, nil
	case "CRAM-MD5":
		var nonce [8]byte
		_, _ = rand.Read(nonce[:])
		challenge := fmt.Sprintf("<%x.%d@smtptest>", nonce, time.Now().Unix())
		return &cramServer{challenge: challenge, check: func(u, digest string) error {
			mac := hmac.New(md5.New, []byte(ss.s.opts.Password))
			mac.Write([]byte(challenge))
			return check(u, hmac.Equal([]byte(digest), []byte(hex.EncodeToString(mac.Sum(nil)))))
		}}, nil
	case "SCRAM-SHA-256":
		return &scramServer{h: sha256.New, password: ss.s.opts.Password, check: check}, nil
	case "SCRAM-SHA-1":
		return &scramServer{h: sha1.New, password: ss.s.opts.Password, check: check}, nil
	case "XOAUTH2":
		return &xoauth2Server{check: func(u, tok string) error { return check(u, ss.tokenOK(u, tok)) }}, nil
	case sasl.OAuthBearer:
		return &fail535{sasl.NewOAuthBearerServer(func(o sasl.OAuthBearerOptions) *sasl.OAuthBearerError {
			if check(o.Username, ss.tokenOK(o.Username, o.Token)) != nil {
				return &sasl.OAuthBearerError{Status: "invalid_token", Schemes: "bearer"}
			}
			return nil
		})}, nil
	}
	return nil, errors.New("unsupported mechanism")
}

func (ss *session) tokenOK(user, token string) bool {
	return ss.s.opts.CheckToken != nil && user == ss.s.opts.Username && ss.s.opts.CheckToken(user, token)
}

// invalidCredentials is the final reply to a refused AUTH.
var invalidCredentials = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Authentication credentials invalid"}

// fail535 turns the final error of a SASL exchange into 535 5.7.8 (go-smtp
// answers 454 to errors that are not an *smtp.SMTPError).
type fail535 struct{ sasl.Server }

func (f *fail535) Next(response []byte) ([]byte, bool, error) {
	c, done, err := f.Server.Next(response)
	if err != nil {
		if _, ok := err.(*smtp.SMTPError); !ok {
			err = invalidCredentials
		}
	}
	return c, done, err
}

// xoauth2Server is the server side of AUTH XOAUTH2 (Google's and
// Microsoft's): "user=<u>\x01auth=Bearer <token>\x01\x01"; a refused token
// gets a base64 JSON error as a 334 challenge, the client answers with
// an empty line, and the server ends with 535.
type xoauth2Server struct {
	failed bool
	check  func(username, token string) error
}

func (x *xoauth2Server) Next(response []byte) ([]byte, bool, error) {
	if x.failed {
		return nil, true, invalidCredentials
	}
	if response == nil {
		return []byte{}, false, nil
	}
	var user, token string
	for _, f := range strings.Split(string(response), "\x01") {
		if v, ok := strings.CutPrefix(f, "user="); ok {
			user = v
		} else if v, ok := strings.CutPrefix(f, "auth="); ok {
			if len(v) > 7 && strings.EqualFold(v[:7], "Bearer ") {
				token = v[7:]
			}
		}
	}
	if token == "" || x.check(user, token) != nil {
		x.failed = true
		return []byte(`{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`), false, nil
	}
	return nil, true, nil
}

// loginServer is the server side of AUTH LOGIN (draft-murchison-sasl-login):
// "Username:" and "Password:" challenges, an optional initial response.
type loginServer struct {
	step     int
	username string
	check    func(username, password string) error
}

func (l *loginServer) Next(response []byte) ([]byte, bool, error) {
	switch l.step {
	case 0:
		l.step = 1
		if response == nil {
			return []byte("Username:"), false, nil
		}
		fallthrough
	case 1:
		l.username, l.step = string(response), 2
		return []byte("Password:"), false, nil
	default:
		return nil, true, l.check(l.username, string(response))
	}
}

// cramServer is the server side of AUTH CRAM-MD5 (RFC 2195).
type cramServer struct {
	challenge string
	sent      bool
	check     func(username, digest string) error
}

func (c *cramServer) Next(response []byte) ([]byte, bool, error) {
	if !c.sent {
		c.sent = true
		return []byte(c.challenge), false, nil
	}
	user, digest, ok := strings.Cut(string(response), " ")
	if !ok {
		return nil, true, saslSyntaxError("malformed CRAM-MD5 response")
	}
	return nil, true, c.check(user, digest)
}

// scramServer is the server side of AUTH SCRAM-SHA-1 and SCRAM-SHA-256
// (RFC 5802, RFC 7677) without channel binding: an empty challenge when
// the client sent no initial response, then client-first, server-first
// (nonce, salt, iterations), client-final with the proof, and the
// server's signature, which the client verifies before the final reply.
type scramServer struct {
	h        func() hash.Hash
	password string
	check    func(username string, ok bool) error

	step                       int
	username, nonce, firstBare string
	serverFirst                string
	salted                     []byte
	verified                   bool
}

func (sc *scramServer) fail(msg string) ([]byte, bool, error) {
	return nil, true, saslSyntaxError("SCRAM: " + msg)
}

// saslSyntaxError is the reply to an AUTH exchange the client got wrong.
func saslSyntaxError(msg string) error {
	return &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 2}, Message: msg}
}

func (sc *scramServer) hmac(key []byte, msg string) []byte {
	m := hmac.New(sc.h, key)
	m.Write([]byte(msg))
	return m.Sum(nil)
}

func (sc *scramServer) Next(response []byte) ([]byte, bool, error) {
	switch sc.step {
	case 0:
		sc.step = 1
		if response == nil {
			return []byte{}, false, nil // ask for the client-first message
		}
		fallthrough
	case 1:
		bare, ok := strings.CutPrefix(string(response), "n,,")
		if !ok {
			return sc.fail("only gs2 header n,, is supported")
		}
		attrs := strings.Split(bare, ",")
		if len(attrs) < 2 || !strings.HasPrefix(attrs[0], "n=") || !strings.HasPrefix(attrs[1], "r=") || len(attrs[1]) < 3 {
			return sc.fail("malformed client-first message")
		}
		sc.username = strings.NewReplacer("=2C", ",", "=3D", "=").Replace(attrs[0][2:])
		var snonce, salt [16]byte
		_, _ = rand.Read(snonce[:])
		_, _ = rand.Read(salt[:])
		sc.firstBare, sc.nonce = bare, attrs[1][2:]+base64.StdEncoding.EncodeToString(snonce[:])
		const iterations = 4096
		sc.serverFirst = fmt.Sprintf("r=%s,s=%s,i=%d", sc.nonce, base64.StdEncoding.EncodeToString(salt[:]), iterations)
		var err error
		if sc.salted, err = pbkdf2.Key(sc.h, sc.password, salt[:], iterations, sc.h().Size()); err != nil {
			return sc.fail(err.Error())
		}
		sc.step = 2
		return []byte(sc.serverFirst), false, nil
	case 2:
		final := string(response)
		i := strings.LastIndex(final, ",p=")
		if i < 0 || final[:i] != "c=biws,r="+sc.nonce {
			return sc.fail("malformed client-final message")
		}
		proof, err := base64.StdEncoding.DecodeString(final[i+3:])
		if err != nil {
			return sc.fail("malformed proof")
		}
		authMessage := sc.firstBare + "," + sc.serverFirst + "," + final[:i]
		clientKey := sc.hmac(sc.salted, "Client Key")
		stored := sc.h()
		stored.Write(clientKey)
		signature := sc.hmac(stored.Sum(nil), authMessage)
		if len(proof) != len(signature) {
			return nil, true, sc.check(sc.username, false)
		}
		for j := range proof {
			proof[j] ^= signature[j] // proof = ClientKey XOR ClientSignature
		}
		if !hmac.Equal(proof, clientKey) {
			return nil, true, sc.check(sc.username, false)
		}
		sc.verified, sc.step = true, 3
		serverSig := sc.hmac(sc.hmac(sc.salted, "Server Key"), authMessage)
		return []byte("v=" + base64.StdEncoding.EncodeToString(serverSig)), false, nil
	default:
		return nil, true, sc.check(sc.username, sc.verified)
	}
}

func (ss *session) Mail(from string, _ *smtp.MailOptions) error {
	if ss.s.opts.Username != "" && ss.authUser == "" {
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	}
	if err := ss.s.checkThrottle(false); err != nil {
		return err
	}
	if h := ss.hooks().Mail; h != nil {
		if err := h(from); err != nil {
			if errors.Is(err, ErrDrop) {
				return ss.drop()
			}
			return err
		}
	}
	ss.from = from
	ss.to = nil
	return nil
}

func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if h := ss.hooks().Rcpt; h != nil {
		if err := h(to); err != nil {
			if errors.Is(err, ErrDrop) {
				return ss.drop()
			}
			return err
		}
	}
	ss.to = append(ss.to, to)
	return nil
}

func (ss *session) Data(r io.Reader) error {
	if h := ss.hooks().DataStart; h != nil {
		h()
	}
	b, err := io.ReadAll(r)
	if err != nil {
		ss.s.mu.Lock()
		ss.s.aborted = append(ss.s.aborted, b)
		ss.s.mu.Unlock()
		return err
	}
	_, isTLS := ss.c.TLSConnectionState()
	m := &Message{From: ss.from, To: append([]string(nil), ss.to...), Data: b, TLS: isTLS,
		AuthUser: ss.authUser, AuthMechanism: ss.authMech, Conn: ss.conn, Accepted: true, Received: time.Now()}
	herr := ss.s.checkThrottle(true)
	if h := ss.hooks().Data; h != nil && herr == nil {
		herr = h(m)
	}
	if herr != nil {
		m.Accepted = false
	}
	ss.s.mu.Lock()
	ss.s.msgs = append(ss.s.msgs, m)
	ss.s.mu.Unlock()
	select {
	case ss.s.notify <- struct{}{}:
	default:
	}
	if herr != nil {
		if errors.Is(herr, ErrDrop) {
			return ss.drop()
		}
		return herr
	}
	return nil
}

func (ss *session) Reset() {
	ss.from, ss.to = "", nil
}

func (ss *session) Logout() error { return nil }

// selfSigned makes an ECDSA P-256 certificate for 127.0.0.1, ::1 and
// localhost, valid for a day.
func selfSigned() (tls.Certificate, []byte, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, nil, err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "smtptest"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, nil, nil, err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	return cert, certPEM, keyPEM, err
}

// Silent starts a listener that accepts connections and never says a
// word: an SMTP server hanging before its greeting. It returns the port.
func Silent(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}
