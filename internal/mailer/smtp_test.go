package mailer

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
	"github.com/emersion/go-smtp"
)

const testBody = "Subject: test\r\n\r\nhello\r\n.a line starting with a dot\r\n"

func testSettings(srv *smtptest.Server) SMTPSettings {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(srv.CAPEM)
	return SMTPSettings{
		Host: "127.0.0.1", Port: srv.Port, TLSMode: TLSStartTLS,
		TLSConfig: &tls.Config{ServerName: "127.0.0.1", RootCAs: pool, MinVersion: tls.VersionTLS12},
		Username:  "user", Password: "s3cret-pass", HELO: "test.local",
		Timeout: 2 * time.Second, Connections: 2, NoPipelining: testNoPipelining,
	}
}

// testNoPipelining makes testSettings' senders send MAIL, each RCPT and
// DATA one at a time. The test server offers PIPELINING, so the tests
// cover the pipelined transaction by default, and
// TestSMTPTransactionsWithoutPipelining runs them again without.
var testNoPipelining bool

// TestSMTPTransactionsWithoutPipelining runs the transaction tests with
// a sender that does not pipeline, as with a server that does not offer
// PIPELINING.
func TestSMTPTransactionsWithoutPipelining(t *testing.T) {
	testNoPipelining = true
	defer func() { testNoPipelining = false }()
	for name, test := range map[string]func(*testing.T){
		"ExactBytes":             TestSMTPStartTLSAuthDeliversExactBytes,
		"ImplicitTLS":            TestSMTPImplicitTLS,
		"ReplyClassification":    TestSMTPReplyClassification,
		"PartialRefusal":         TestSMTPPartialRecipientRefusalSendsNothing,
		"DropAfterFinalDot":      TestSMTPDropAfterFinalDotIsUncertain,
		"SlowReplyAfterFinalDot": TestSMTPSlowReplyAfterDotIsUncertain,
		"DropBeforeData":         TestSMTPDropBeforeDataOnFreshConnectionIsNotRetried,
		"ReuseAndRedial":         TestSMTPReusesConnectionsAndRedialsDeadOnes,
		"ParallelWithinLimit":    TestSMTPParallelSendsStayWithinConnectionLimit,
		"SetupRejectionsRetried": TestSenderSetupRejectionsAreRetried,
	} {
		t.Run(name, test)
	}
}

func newTestSender(t *testing.T, cfg SMTPSettings) *Sender {
	t.Helper()
	s := NewSender(cfg)
	t.Cleanup(func() { _ = s.Destruct() })
	return s
}

func testEnvelope(to ...string) *Envelope {
	return &Envelope{ID: "id", MessageID: "<m@example.com>", From: "from@example.com", To: to, Data: []byte(testBody)}
}

func authServer(t *testing.T, mode string) *smtptest.Server {
	return smtptest.Start(t, smtptest.Options{TLS: mode, Username: "user", Password: "s3cret-pass"})
}

// expectCode asserts a classified failure.
func expectCode(t *testing.T, err error, code, phase string) *Error {
	t.Helper()
	var de *Error
	if !errors.As(err, &de) {
		t.Fatalf("expected a deliveryError %s, got %v", code, err)
	}
	if de.Code != code || (phase != "" && de.Phase != phase) {
		t.Fatalf("got code %s phase %s (%v), want %s phase %s", de.Code, de.Phase, de, code, phase)
	}
	return de
}

func TestSMTPStartTLSAuthDeliversExactBytes(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	s := newTestSender(t, testSettings(srv))
	d, err := s.Send(context.Background(), testEnvelope("a@example.org", "b@example.net"))
	if err != nil {
		t.Fatal(err)
	}
	if d.Status != "sent" || !strings.Contains(d.Response, "OK") {
		t.Errorf("delivery = %+v", d)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 {
		t.Fatalf("server got %d messages", len(msgs))
	}
	m := msgs[0]
	if m.From != "from@example.com" || strings.Join(m.To, ",") != "a@example.org,b@example.net" {
		t.Errorf("envelope = %s -> %v", m.From, m.To)
	}
	if !m.TLS || m.AuthUser != "user" {
		t.Errorf("TLS=%v auth=%q, want TLS and user", m.TLS, m.AuthUser)
	}
	if !bytes.Equal(m.Data, []byte(testBody)) {
		t.Errorf("data = %q, want %q", m.Data, testBody)
	}
}

func TestSMTPImplicitTLS(t *testing.T) {
	srv := authServer(t, smtptest.Implicit)
	cfg := testSettings(srv)
	cfg.TLSMode = TLSImplicit
	s := newTestSender(t, cfg)
	if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	if m := srv.Messages(); len(m) != 1 || !m[0].TLS {
		t.Fatalf("want one message over TLS, got %+v", m)
	}
}

func TestSMTPNoTLSToLoopbackRelay(t *testing.T) {
	srv := authServer(t, smtptest.None)
	cfg := testSettings(srv)
	cfg.TLSMode = TLSNone
	s := newTestSender(t, cfg)
	if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	if m := srv.Messages(); len(m) != 1 || m[0].TLS || m[0].AuthUser != "user" {
		t.Fatalf("want one plaintext authenticated message, got %+v", m)
	}
}

// TestSMTPBodyCutOffIsNeverCompleted: when writing the message times out
// (the server stopped reading), the sender must hang up without a final
// dot: a server that got the end of a cut-off message would accept it,
// and the outbox would retry it, so the reader would get a cut-off copy
// and then a whole one. Any command written to such a connection would
// first end the open message (textproto completes an open DotWriter
// before a command, QUIT included); the sender writes nothing more to it.
// Without TLS the socket still takes writes after the timeout, so this is
// where a dot could get through.
func TestSMTPBodyCutOffIsNeverCompleted(t *testing.T) {
	srv := authServer(t, smtptest.None)
	release := make(chan struct{})
	srv.SetHooks(smtptest.Hooks{DataStart: func() { <-release }})
	cfg := testSettings(srv)
	cfg.TLSMode = TLSNone
	cfg.Timeout = 500 * time.Millisecond
	s := newTestSender(t, cfg)
	env := testEnvelope("a@example.org")
	// far more than the loopback socket buffers hold
	line := strings.Repeat("x", 998) + "\r\n"
	env.Data = []byte("Subject: big\r\n\r\n" + strings.Repeat(line, 24<<10))
	_, err := s.Send(context.Background(), env)
	expectCode(t, err, CodeSMTPTimeout, PhaseBody)
	close(release) // the server reads what arrived, up to the hang-up
	for deadline := time.Now().Add(10 * time.Second); srv.OpenConnections() > 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if srv.OpenConnections() != 0 {
		t.Fatal("the server still holds the connection")
	}
	if a := srv.Attempts(); len(a) != 0 {
		t.Fatalf("the server completed a message of %d of %d bytes", len(a[0].Data), len(env.Data))
	}
	if a := srv.Aborted(); len(a) != 1 || len(a[0]) == 0 || len(a[0]) >= len(env.Data) {
		t.Errorf("want one message cut off after part of its bytes, got %d", len(a))
	}
}

func TestSMTPStartTLSIsMandatory(t *testing.T) {
	srv := authServer(t, smtptest.None) // offers no STARTTLS
	s := newTestSender(t, testSettings(srv))
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeStartTLSUnsupported, PhaseStartTLS)
	if len(srv.Attempts()) != 0 || srv.Auths() != 0 {
		t.Fatal("nothing may be sent, and no credentials, without TLS")
	}
	if s.OpenConnections() != 0 {
		t.Fatalf("open connections = %d after a failed dial", s.OpenConnections())
	}
}

func TestSMTPUntrustedCertificate(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	cfg := testSettings(srv)
	cfg.TLSConfig = &tls.Config{ServerName: "127.0.0.1", RootCAs: x509.NewCertPool(), MinVersion: tls.VersionTLS12}
	s := newTestSender(t, cfg)
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	de := expectCode(t, err, CodeSMTPConnection, PhaseStartTLS)
	if !strings.Contains(de.Error(), "TLS") || !strings.Contains(de.Error(), "certificate") {
		t.Errorf("message should explain the certificate problem: %s", de.Error())
	}
	if srv.Auths() != 0 {
		t.Fatal("credentials went to an unverified server")
	}
}

func TestSMTPAuthFailed(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	cfg := testSettings(srv)
	cfg.Password = "wrong-password"
	s := newTestSender(t, cfg)
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	de := expectCode(t, err, CodeSMTPAuthFailed, PhaseAuth)
	if de.Reply == nil || de.Reply.Code != 535 || de.Reply.Enhanced != "5.7.8" {
		t.Errorf("reply = %+v", de.Reply)
	}
	if strings.Contains(de.Error(), "wrong-password") {
		t.Fatal("the password leaked into the error message")
	}
}

// TestSMTPAuthMechanisms: the sender authenticates with whichever of its
// mechanisms the server offers (PLAIN first), and a wrong password is
// smtp_auth_failed with every one of them, without leaking the password.
func TestSMTPAuthMechanisms(t *testing.T) {
	// what the sender picks when the server offers these (PLAIN first:
	// the connection is always TLS; then the challenge-response ones,
	// strongest first)
	expect := map[string]string{"PLAIN": "PLAIN", "LOGIN": "LOGIN", "CRAM-MD5": "CRAM-MD5", "SCRAM-SHA-256": "SCRAM-SHA-256",
		"SCRAM-SHA-1": "SCRAM-SHA-1", "SCRAM-SHA-1+SCRAM-SHA-256": "SCRAM-SHA-256", "CRAM-MD5+SCRAM-SHA-1": "SCRAM-SHA-1",
		"CRAM-MD5+LOGIN+PLAIN": "PLAIN"}
	for _, mechs := range [][]string{{"PLAIN"}, {"LOGIN"}, {"CRAM-MD5"}, {"SCRAM-SHA-256"}, {"SCRAM-SHA-1"},
		{"SCRAM-SHA-1", "SCRAM-SHA-256"}, {"CRAM-MD5", "SCRAM-SHA-1"}, {"CRAM-MD5", "LOGIN", "PLAIN"}} {
		t.Run(strings.Join(mechs, "+"), func(t *testing.T) {
			srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "user", Password: "s3cret-pass", Mechanisms: mechs})
			d, err := newTestSender(t, testSettings(srv)).Send(context.Background(), testEnvelope("a@example.org"))
			if err != nil {
				t.Fatalf("send: %v", err)
			}
			m := srv.WaitMessages(1, 2*time.Second)
			if len(m) != 1 || m[0].AuthUser != "user" || !bytes.Equal(m[0].Data, []byte(testBody)) || d.Status != "sent" {
				t.Fatalf("delivered %+v, %+v", m, d)
			}
			if want := expect[strings.Join(mechs, "+")]; m[0].AuthMechanism != want {
				t.Fatalf("authenticated with %s, want %s", m[0].AuthMechanism, want)
			}

			cfg := testSettings(srv)
			cfg.Password = "wrong-password"
			_, err = newTestSender(t, cfg).Send(context.Background(), testEnvelope("a@example.org"))
			de := expectCode(t, err, CodeSMTPAuthFailed, PhaseAuth)
			if strings.Contains(de.Error(), "wrong-password") {
				t.Fatal("the password leaked into the error message")
			}
			if srv.Auths() != 1 {
				t.Fatalf("%d successful authentications, want 1", srv.Auths())
			}
		})
	}
}

// TestSMTPNoCommonAuthMechanism: a server whose only mechanism the
// sender does not implement is a clear configuration error, not a
// plaintext fallback.
func TestSMTPNoCommonAuthMechanism(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "user", Password: "s3cret-pass", Mechanisms: []string{"XOAUTH2"}})
	_, err := newTestSender(t, testSettings(srv)).Send(context.Background(), testEnvelope("a@example.org"))
	de := expectCode(t, err, CodeSMTPAuthFailed, PhaseAuth)
	if !strings.Contains(de.Error(), "no supported authentication mechanism") {
		t.Fatalf("error %q", de.Error())
	}
	if len(srv.Attempts()) != 0 {
		t.Fatal("a message went through without authentication")
	}
}

func TestSMTPConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	s := newTestSender(t, SMTPSettings{Host: "127.0.0.1", Port: port, TLSMode: TLSStartTLS,
		TLSConfig: &tls.Config{ServerName: "127.0.0.1"}, HELO: "x", Timeout: time.Second, Connections: 1})
	_, err = s.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeSMTPConnection, PhaseConnect)
}

func TestSMTPTimeoutWaitingForGreeting(t *testing.T) {
	s := newTestSender(t, SMTPSettings{Host: "127.0.0.1", Port: smtptest.Silent(t), TLSMode: TLSStartTLS,
		TLSConfig: &tls.Config{ServerName: "127.0.0.1"}, HELO: "x", Timeout: 200 * time.Millisecond, Connections: 1})
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeSMTPTimeout, PhaseGreeting)
}

func TestSMTPReplyClassification(t *testing.T) {
	reply := func(code int, esc [3]int, msg string) error {
		return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(esc), Message: msg}
	}
	cases := []struct {
		name  string
		hooks smtptest.Hooks
		code  string
		phase string
	}{
		{"mail 451", smtptest.Hooks{Mail: func(string) error { return reply(451, [3]int{4, 3, 0}, "try later") }}, CodeSMTPTransient, PhaseMail},
		{"mail 550", smtptest.Hooks{Mail: func(string) error { return reply(550, [3]int{5, 7, 1}, "sender denied") }}, CodeSMTPRejected, PhaseMail},
		{"rcpt 450", smtptest.Hooks{Rcpt: func(string) error { return reply(450, [3]int{4, 2, 1}, "mailbox busy") }}, CodeSMTPTransient, PhaseRcpt},
		{"data 451", smtptest.Hooks{Data: func(*smtptest.Message) error { return reply(451, [3]int{4, 3, 0}, "queue full") }}, CodeSMTPTransient, PhaseEnd},
		{"data 554", smtptest.Hooks{Data: func(*smtptest.Message) error { return reply(554, [3]int{5, 7, 1}, "spam") }}, CodeSMTPRejected, PhaseEnd},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := authServer(t, smtptest.StartTLS)
			srv.SetHooks(tc.hooks)
			s := newTestSender(t, testSettings(srv))
			_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
			de := expectCode(t, err, tc.code, tc.phase)
			if de.Reply == nil || !strings.Contains(de.Error(), de.Reply.Text) {
				t.Errorf("error should quote the server reply: %v", de)
			}
			if len(srv.Messages()) != 0 {
				t.Fatal("a refused message was recorded as accepted")
			}
			// the connection survives a plain refusal and is reused
			srv.SetHooks(smtptest.Hooks{})
			if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
				t.Fatal(err)
			}
			if srv.Connections() != 1 {
				t.Errorf("connections = %d, want the same connection reused", srv.Connections())
			}
		})
	}
}

func TestSMTPPartialRecipientRefusalSendsNothing(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Rcpt: func(to string) error {
		if to == "bad@example.org" {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		}
		return nil
	}})
	s := newTestSender(t, testSettings(srv))
	_, err := s.Send(context.Background(), testEnvelope("good@example.org", "bad@example.org", "also@example.org"))
	de := expectCode(t, err, CodeRecipientRefused, PhaseRcpt)
	if de.Refused != 1 || de.Recipients != 3 {
		t.Errorf("refused %d of %d, want 1 of 3", de.Refused, de.Recipients)
	}
	if !strings.Contains(de.Error(), "1 of 3") || !strings.Contains(de.Error(), "5.1.1") {
		t.Errorf("message = %s", de.Error())
	}
	if len(srv.Attempts()) != 0 {
		t.Fatalf("no message may arrive when any recipient was refused: %+v", srv.Attempts()[0])
	}
	if !de.Permanent() {
		t.Error("a 550 recipient refusal is permanent")
	}
	// Pipelined, the server has already accepted DATA for the other two
	// recipients: the sender hangs up before the final dot without
	// writing anything more (a QUIT would only become message text), and
	// the next message goes out on a new connection. One at a time, DATA
	// is never sent and the transaction is reset on the same connection.
	if _, err := s.Send(context.Background(), testEnvelope("good@example.org")); err != nil {
		t.Fatal(err)
	}
	wantConns, wantAborted := 2, 1
	if testNoPipelining {
		wantConns, wantAborted = 1, 0
	}
	if a := srv.Aborted(); len(a) != wantAborted || (len(a) == 1 && len(a[0]) != 0) {
		t.Errorf("DATA ended without a dot %d times (want %d), with %q", len(a), wantAborted, a)
	}
	if got := srv.Connections(); got != wantConns {
		t.Errorf("connections = %d, want %d", got, wantConns)
	}
	if msgs := srv.Messages(); len(msgs) != 1 || len(msgs[0].To) != 1 || msgs[0].To[0] != "good@example.org" || string(msgs[0].Data) != testBody {
		t.Errorf("after the refusal, the server got %+v", msgs)
	}
}

// TestSMTPPipeliningWhenOffered: the test server offers PIPELINING and
// 8BITMIME, and the sender uses both.
func TestSMTPPipeliningWhenOffered(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	s := newTestSender(t, testSettings(srv))
	if _, err := s.Send(context.Background(), testEnvelope("a@example.org", "b@example.org")); err != nil {
		t.Fatal(err)
	}
	c := s.takeIdle()
	if c == nil {
		t.Fatal("no idle connection after a send")
	}
	defer s.putIdle(c)
	if c.pipelining == testNoPipelining || c.mailParams != " BODY=8BITMIME" || c.inData {
		t.Errorf("pipelining %v, MAIL parameters %q, inData %v", c.pipelining, c.mailParams, c.inData)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != "a@example.org,b@example.org" || msgs[0].From != "from@example.com" {
		t.Errorf("the server got %+v", msgs)
	}
}

func TestSMTPDropAfterFinalDotIsUncertain(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { return smtptest.ErrDrop }})
	s := newTestSender(t, testSettings(srv))
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	de := expectCode(t, err, CodeUncertain, PhaseEnd)
	if !de.Uncertain() {
		t.Fatal("uncertain() = false")
	}
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("the server saw %d copies; an uncertain message must never be resent", n)
	}
}

func TestSMTPSlowReplyAfterDotIsUncertain(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { time.Sleep(600 * time.Millisecond); return nil }})
	cfg := testSettings(srv)
	cfg.Timeout = 200 * time.Millisecond
	s := newTestSender(t, cfg)
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeUncertain, PhaseEnd)
	if n := len(srv.Attempts()); n != 1 {
		t.Fatalf("the server saw %d copies, want 1", n)
	}
}

func TestSMTPDropBeforeDataOnFreshConnectionIsNotRetried(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error { return smtptest.ErrDrop }})
	s := newTestSender(t, testSettings(srv))
	_, err := s.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeSMTPConnection, PhaseMail)
	if srv.Connections() != 1 {
		t.Fatalf("connections = %d: a fresh connection's failure is reported, not retried", srv.Connections())
	}
}

func TestSMTPReusesConnectionsAndRedialsDeadOnes(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	s := newTestSender(t, testSettings(srv))
	for i := range 5 {
		if _, err := s.Send(context.Background(), testEnvelope(fmt.Sprintf("u%d@example.org", i))); err != nil {
			t.Fatal(err)
		}
	}
	if srv.Connections() != 1 || srv.Auths() != 1 {
		t.Fatalf("5 sequential sends used %d connections and %d AUTHs, want 1 and 1", srv.Connections(), srv.Auths())
	}
	// the server drops the idle session; the next send redials transparently
	srv.DropConnections()
	time.Sleep(50 * time.Millisecond)
	if _, err := s.Send(context.Background(), testEnvelope("after@example.org")); err != nil {
		t.Fatalf("send after the server dropped the idle connection: %v", err)
	}
	if srv.Connections() != 2 || len(srv.Messages()) != 6 {
		t.Fatalf("connections=%d messages=%d, want 2 and 6", srv.Connections(), len(srv.Messages()))
	}
	// a server that answers 421 to MAIL on a reused connection: one redial
	srv.SetHooks(smtptest.Hooks{Mail: func(string) error {
		srv.SetHooks(smtptest.Hooks{})
		return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "idle timeout"}
	}})
	if _, err := s.Send(context.Background(), testEnvelope("421@example.org")); err != nil {
		t.Fatalf("send after 421: %v", err)
	}
	if srv.Connections() != 3 || len(srv.Messages()) != 7 {
		t.Fatalf("connections=%d messages=%d, want 3 and 7", srv.Connections(), len(srv.Messages()))
	}
}

func TestSMTPParallelSendsStayWithinConnectionLimit(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { time.Sleep(5 * time.Millisecond); return nil }})
	cfg := testSettings(srv)
	cfg.Connections = 3
	s := newTestSender(t, cfg)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Go(func() {
			if _, err := s.Send(context.Background(), testEnvelope(fmt.Sprintf("p%d@example.org", i))); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := len(srv.Messages()); n != 40 {
		t.Fatalf("delivered %d of 40", n)
	}
	if c := srv.Connections(); c > 3 {
		t.Fatalf("used %d connections, limit is 3", c)
	}
}

func TestSMTPIdleConnectionsClose(t *testing.T) {
	old := smtpIdleTimeout
	smtpIdleTimeout = 150 * time.Millisecond
	t.Cleanup(func() { smtpIdleTimeout = old })
	srv := authServer(t, smtptest.StartTLS)
	s := newTestSender(t, testSettings(srv))
	if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	if s.OpenConnections() != 1 {
		t.Fatalf("open = %d after a send, want 1 kept open", s.OpenConnections())
	}
	deadline := time.Now().Add(10 * time.Second)
	for (s.OpenConnections() != 0 || srv.OpenConnections() != 0) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if s.OpenConnections() != 0 || srv.OpenConnections() != 0 {
		t.Fatalf("idle connection still open: sender %d, server %d", s.OpenConnections(), srv.OpenConnections())
	}
}

func TestSMTPDestructClosesIdleAndLetsLateSendsFinish(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	s := NewSender(testSettings(srv))
	if _, err := s.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	_ = s.Destruct()
	if s.OpenConnections() != 0 {
		t.Fatalf("open = %d after Destruct", s.OpenConnections())
	}
	// an old handler still serving a request after the reload
	if _, err := s.Send(context.Background(), testEnvelope("late@example.org")); err != nil {
		t.Fatalf("late send after Destruct: %v", err)
	}
	if s.OpenConnections() != 0 {
		t.Fatalf("the late send's connection stayed open")
	}
	if len(srv.Messages()) != 2 {
		t.Fatalf("messages = %d, want 2", len(srv.Messages()))
	}
}

func TestSMTPWaitForSlotHonoursContext(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	release := make(chan struct{})
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { <-release; return nil }})
	cfg := testSettings(srv)
	cfg.Connections = 1
	s := newTestSender(t, cfg)
	done := make(chan error, 1)
	go func() { _, err := s.Send(context.Background(), testEnvelope("a@example.org")); done <- err }()
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := s.Send(ctx, testEnvelope("b@example.org"))
	expectCode(t, err, CodeSMTPTimeout, PhaseConnect)
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestPoolKeyCoversIdentity(t *testing.T) {
	base := SMTPSettings{Host: "h", Port: 587, TLSMode: TLSStartTLS, Username: "u", Password: "p", HELO: "x", Timeout: time.Second, Connections: 4}
	k := base.PoolKey()
	if strings.Contains(k, "p") && strings.Contains(k, base.Password+"|") {
		t.Fatal("password in pool key")
	}
	for name, mod := range map[string]func(*SMTPSettings){
		"host": func(s *SMTPSettings) { s.Host = "h2" }, "port": func(s *SMTPSettings) { s.Port = 465 },
		"tls": func(s *SMTPSettings) { s.TLSMode = TLSImplicit }, "user": func(s *SMTPSettings) { s.Username = "v" },
		"password": func(s *SMTPSettings) { s.Password = "q" }, "ca": func(s *SMTPSettings) { s.CAPEM = []byte("x") },
		"helo": func(s *SMTPSettings) { s.HELO = "y" }, "timeout": func(s *SMTPSettings) { s.Timeout = 2 * time.Second },
		"connections": func(s *SMTPSettings) { s.Connections = 5 },
	} {
		c := base
		mod(&c)
		if c.PoolKey() == k {
			t.Errorf("changing %s keeps the same pool key", name)
		}
	}
	if base.PoolKey() != k {
		t.Error("pool key is not deterministic")
	}
}

func smtpRefusal(code int) error {
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode{code / 100, 1, 1}, Message: "refused"}
}

// TestSenderSetupRejectionsAreRetried: a 530 "authentication required"
// (an account configured without credentials) and a 5xx answer to
// STARTTLS are the sender's setup, which an operator fixes with a reload,
// so the message is retried with the code instead of failing; a 5xx
// elsewhere stays permanent.
func TestSenderSetupRejectionsAreRetried(t *testing.T) {
	for _, c := range []struct {
		phase string
		code  int
		want  string
	}{
		{PhaseMail, 530, CodeSMTPAuthFailed},
		{PhaseRcpt, 530, CodeSMTPAuthFailed},
		{PhaseStartTLS, 554, CodeStartTLSUnsupported},
		{PhaseStartTLS, 454, CodeSMTPTransient},
		{PhaseMail, 550, CodeSMTPRejected},
		{PhaseRcpt, 550, CodeRecipientRefused},
	} {
		if got := classifyReply(c.phase, &Reply{Code: c.code}); got != c.want {
			t.Errorf("%s %d: %s, want %s", c.phase, c.code, got, c.want)
		}
	}
	if e := (&Error{Code: CodeSMTPAuthFailed, Reply: &Reply{Code: 530}}).Error(); !strings.Contains(e, "requires authentication") {
		t.Errorf("530 message: %q", e)
	}

}
