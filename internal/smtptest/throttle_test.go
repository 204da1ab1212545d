package smtptest

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// send sends one message on c and returns the server's error, if any.
func send(c *smtp.Client) error {
	if err := c.Mail("a@example.com", nil); err != nil {
		_ = c.Reset()
		return err
	}
	if err := c.Rcpt("b@example.com", nil); err != nil {
		_ = c.Reset()
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	_, _ = w.Write([]byte("Subject: x\r\n\r\nbody\r\n"))
	return w.Close()
}

func TestThrottleAtMail(t *testing.T) {
	s := Start(t, Options{TLS: None, Throttle: &Throttle{Rate: 10, Burst: 2}})
	c, err := smtp.Dial(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var ok, refused int
	for i := 0; i < 20; i++ {
		err := send(c)
		var se *smtp.SMTPError
		switch {
		case err == nil:
			ok++
		case errors.As(err, &se):
			if se.Code != 454 || se.EnhancedCode != (smtp.EnhancedCode{4, 7, 0}) || se.Message != "Throttling failure: Maximum sending rate exceeded" {
				t.Fatalf("reply %d %v %q", se.Code, se.EnhancedCode, se.Message)
			}
			refused++
		default:
			t.Fatal(err)
		}
	}
	// 20 back to back on loopback take well under 100ms: the burst passes,
	// perhaps one more
	if ok < 2 || ok > 4 || ok+refused != 20 {
		t.Fatalf("%d accepted, %d refused", ok, refused)
	}
	acc, thr := s.ThrottleTotals()
	if acc != ok || thr != refused || len(s.Messages()) != ok {
		t.Fatalf("counters %d/%d, messages %d; client saw %d/%d", acc, thr, len(s.Messages()), ok, refused)
	}
	if s.MaxAcceptedPerSecond() > ok {
		t.Fatal("per-second maximum above the total")
	}
	// the bucket refills at the rate
	time.Sleep(250 * time.Millisecond)
	if err := send(c); err != nil {
		t.Fatalf("after a refill: %v", err)
	}
}

func TestThrottleAtDataWithOwnReply(t *testing.T) {
	reply := &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Account rate limited, try again later"}
	s := Start(t, Options{TLS: None, Throttle: &Throttle{Rate: 1, AtData: true, Reply: reply}})
	c, err := smtp.Dial(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := send(c); err != nil {
		t.Fatal(err)
	}
	err = send(c)
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 451 || !strings.Contains(se.Message, "rate limited") {
		t.Fatalf("second message: %v", err)
	}
	if a := s.Attempts(); len(a) != 2 || !a[0].Accepted || a[1].Accepted {
		t.Fatalf("attempts %+v", a)
	}
	secs := s.ThrottleSeconds()
	if len(secs) == 0 || secs[0].Start.IsZero() {
		t.Fatalf("seconds %+v", secs)
	}
}

func TestNoThrottle(t *testing.T) {
	s := Start(t, Options{TLS: None})
	if s.ThrottleSeconds() != nil || s.MaxAcceptedPerSecond() != 0 {
		t.Fatal("counters without a throttle")
	}
}
