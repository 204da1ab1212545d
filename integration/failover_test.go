package integration

import (
	"fmt"
	"net"
	"net/http"
	"testing"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestFailoverThroughCaddy: two smtp blocks in priority order. With the
// primary refusing connections an OTP is sent through the secondary in
// the same request, /status shows the primary down; a secondary that
// drops the connection after the final dot leaves the message unknown
// and the (now healthy) primary never gets it.
func TestFailoverThroughCaddy(t *testing.T) {
	// a port that refuses connections: listen, then close
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	block := func(port int, ca string) string {
		return fmt.Sprintf(`smtp 127.0.0.1:%d {
			username mailer
			password {env.AUTHMAIL_IT_SMTP_PASSWORD}
			ca %s
			helo it.example
			timeout 3s
		}`, port, ca)
	}
	load(t, config{
		Keys: `key app {env.AUTHMAIL_IT_KEY} {
			allow otp status
			rate off
		}`,
		Delivery: block(deadPort, smtpSrv.CAFile) + "\n\t\t" + block(smtpSrv.Port, smtpSrv.CAFile),
	})
	m := expectSent(t, post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"492817"}`))
	if m.AuthUser != "mailer" {
		t.Fatalf("auth %q", m.AuthUser)
	}
	st := call(t, http.MethodGet, "/authmail/status", nil, "Authorization: Bearer "+keyApp)
	d, _ := st.json["delivery"].(map[string]any)
	servers, _ := d["servers"].([]any)
	if len(servers) != 2 {
		t.Fatalf("/status servers: %s", st.raw)
	}
	p, s := servers[0].(map[string]any), servers[1].(map[string]any)
	if p["port"] != float64(deadPort) || p["state"] != "down" || p["last_error_code"] != "smtp_connection" || s["state"] != "up" {
		t.Fatalf("/status servers %v", servers)
	}

	// exactly once: the secondary (the only healthy server) drops after
	// the dot; the message is unknown and goes nowhere else
	smtpSrv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { return smtptest.ErrDrop }})
	r := post(t, "/authmail/send/otp", `{"to":"jane@example.org","code":"492818"}`)
	expectFailure(t, r, "unknown", "smtp_disconnect_uncertain", "may or may not have accepted it")
	if n := len(smtpSrv.Attempts()); n != 1 {
		t.Fatalf("%d attempts, want 1", n)
	}
}
