package mailer

import (
	"context"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
	"github.com/emersion/go-smtp"
	dto "github.com/prometheus/client_model/go"
)

// failoverPair starts a primary and a secondary server and a failover
// transport over them, with probes every few milliseconds.
func failoverPair(t *testing.T) (primary, secondary *smtptest.Server, f *Failover) {
	t.Helper()
	return failoverPairProbing(t, 40*time.Millisecond)
}

// failoverPairProbing is failoverPair with the first probe of a down
// server after probe.
func failoverPairProbing(t *testing.T, probe time.Duration) (primary, secondary *smtptest.Server, f *Failover) {
	t.Helper()
	oldBase, oldLimit := failoverProbeBase, failoverTransientLimit
	failoverProbeBase = probe
	t.Cleanup(func() { failoverProbeBase, failoverTransientLimit = oldBase, oldLimit })
	primary, secondary = authServer(t, smtptest.StartTLS), authServer(t, smtptest.StartTLS)
	f = NewFailover([]*Sender{newTestSender(t, testSettings(primary)), newTestSender(t, testSettings(secondary))})
	t.Cleanup(func() { _ = f.Destruct() })
	return primary, secondary, f
}

func states(f *Failover) string {
	s := ""
	for _, st := range f.Status() {
		state := "up"
		if st.Down {
			state = "down"
		}
		s += state + "/" + st.LastError + " "
	}
	return s
}

// TestFailoverPrimaryDownThenBack: with the primary down a message goes
// through the secondary at once (no retry_backoff wait), the primary is
// marked down and probed, and once it answers again it gets the next
// message.
func TestFailoverPrimaryDownThenBack(t *testing.T) {
	primary, secondary, f := failoverPair(t)
	addr, cert, key := primary.Addr, primary.CAPEM, primary.KeyPEM
	_ = primary.Close()

	start := time.Now()
	d, err := f.Send(context.Background(), testEnvelope("a@example.org"))
	if err != nil || d.Status != "sent" {
		t.Fatalf("%+v %v", d, err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("took %s", el)
	}
	if len(secondary.Messages()) != 1 {
		t.Fatalf("secondary got %d", len(secondary.Messages()))
	}
	if got := states(f); got != "down/smtp_connection up/ " {
		t.Fatalf("states %q", got)
	}
	// while it is down, the next message goes straight to the secondary
	if _, err := f.Send(context.Background(), testEnvelope("a@example.org")); err != nil || len(secondary.Messages()) != 2 {
		t.Fatalf("%v, secondary %d", err, len(secondary.Messages()))
	}

	back := smtptest.Start(t, smtptest.Options{TLS: smtptest.StartTLS, Username: "user", Password: "s3cret-pass", Addr: addr, CertPEM: cert, KeyPEM: key})
	deadline := time.Now().Add(5 * time.Second)
	for states(f) != "up/ up/ " {
		if time.Now().After(deadline) {
			t.Fatalf("primary not back: %q", states(f))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := f.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	if len(back.Messages()) != 1 || len(secondary.Messages()) != 2 {
		t.Fatalf("primary %d secondary %d", len(back.Messages()), len(secondary.Messages()))
	}
}

// TestFailoverTransientMovesOn: a primary answering 451 to every message
// passes each one to the secondary at once, and is marked down after
// failoverTransientLimit of them in a row.
func TestFailoverTransientMovesOn(t *testing.T) {
	primary, secondary, f := failoverPair(t)
	primary.SetHooks(smtptest.Hooks{Mail: func(string) error {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"}
	}})
	for i := 1; i <= 3; i++ {
		if _, err := f.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
			t.Fatal(err)
		}
		if len(secondary.Messages()) != i || len(primary.Messages()) != 0 {
			t.Fatalf("secondary %d primary %d", len(secondary.Messages()), len(primary.Messages()))
		}
		want := "up/ up/ "
		if i == 3 {
			want = "down/smtp_transient up/ "
		}
		if got := states(f); got != want {
			t.Fatalf("after %d: states %q, want %q", i, got, want)
		}
	}
}

// TestFailoverNeverResendsWhatMayHaveArrived: a primary that drops the
// connection after the final dot leaves the message unknown, and the
// secondary never sees it; a 5xx refusal of the message is final too.
func TestFailoverNeverResendsWhatMayHaveArrived(t *testing.T) {
	primary, secondary, f := failoverPair(t)
	primary.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { return smtptest.ErrDrop }})
	dots := 0
	env := testEnvelope("a@example.org")
	env.BeforeDot = func() error { dots++; return nil }
	_, err := f.Send(context.Background(), env)
	expectCode(t, err, CodeUncertain, PhaseEnd)
	if dots != 1 || len(secondary.Attempts()) != 0 {
		t.Fatalf("BeforeDot ran %d times, secondary saw %d", dots, len(secondary.Attempts()))
	}

	primary.SetHooks(smtptest.Hooks{Rcpt: func(string) error {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}})
	_, err = f.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeRecipientRefused, PhaseRcpt)
	if len(secondary.Attempts()) != 0 {
		t.Fatalf("secondary saw a refused message")
	}
	if got := states(f); got != "up/ up/ " {
		t.Fatalf("a refused message took the server down: %q", got)
	}
}

// TestFailoverUncertainKeepsServerUp: a drop after the final dot leaves
// the message unknown, which says nothing about the server: the primary
// stays up and takes the next message, and the secondary sees neither.
// Nor does a 4xx to the dot count towards the run of 4xx answers that
// marks a server down. The probes wait a minute, so that a wrong mark
// shows here instead of being probed away.
func TestFailoverUncertainKeepsServerUp(t *testing.T) {
	primary, secondary, f := failoverPairProbing(t, time.Minute)
	primary.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { return smtptest.ErrDrop }})
	_, err := f.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeUncertain, PhaseEnd)
	if got := states(f); got != "up/ up/ " {
		t.Fatalf("an unknown outcome took the server down: %q", got)
	}
	primary.SetHooks(smtptest.Hooks{})
	if _, err := f.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	if len(primary.Messages()) != 1 || len(secondary.Attempts()) != 0 {
		t.Fatalf("primary took %d, secondary saw %d", len(primary.Messages()), len(secondary.Attempts()))
	}

	primary.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"}
	}})
	for i := 0; i < failoverTransientLimit; i++ {
		_, err := f.Send(context.Background(), testEnvelope("a@example.org"))
		expectCode(t, err, CodeSMTPTransient, PhaseEnd)
	}
	if got := states(f); got != "up/ up/ " || len(secondary.Attempts()) != 0 {
		t.Fatalf("4xx answers to the dot: states %q, secondary saw %d", got, len(secondary.Attempts()))
	}
}

// TestFailoverAllDown: with every server down the message is tried on
// each in order and the attempt fails with the last error, to be
// retried by the outbox.
func TestFailoverAllDown(t *testing.T) {
	primary, secondary, f := failoverPair(t)
	_ = primary.Close()
	_ = secondary.Close()
	_, err := f.Send(context.Background(), testEnvelope("a@example.org"))
	expectCode(t, err, CodeSMTPConnection, PhaseConnect)
	if got := states(f); got != "down/smtp_connection down/smtp_connection " {
		t.Fatalf("states %q", got)
	}
}

// TestFailoverGauge: smtp_server_up follows each server's state.
func TestFailoverGauge(t *testing.T) {
	primary, _, f := failoverPair(t)
	label := f.label(0)
	gauge := func() float64 {
		var m dto.Metric
		_ = mServerUp.WithLabelValues(label).Write(&m)
		return m.GetGauge().GetValue()
	}
	if v := gauge(); v != 1 {
		t.Fatalf("gauge %v before", v)
	}
	_ = primary.Close()
	if _, err := f.Send(context.Background(), testEnvelope("a@example.org")); err != nil {
		t.Fatal(err)
	}
	if v := gauge(); v != 0 {
		t.Fatalf("gauge %v with the primary down", v)
	}
}
