package authmail

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestSendTestMessageFailover: with a failover list, `caddy authmail
// test` tries the servers in order as the running handler does: the
// first is down, the second takes the message. (It used to read only
// the single smtp block, and a failover config crashed it.)
func TestSendTestMessageFailover(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	t.Setenv("AUTHMAIL_UNIT_SMTP_PASSWORD", "s3cret-pass")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	server := func(port int) SMTP {
		return SMTP{Host: "127.0.0.1", Port: port, Username: "user", Password: "{env.AUTHMAIL_UNIT_SMTP_PASSWORD}",
			CA: srv.CAFile, Timeout: caddy.Duration(2 * time.Second)}
	}
	h := &Handler{From: "no-reply@example.com", Keys: []Key{{ID: "app", Secret: "0123456789abcdef0123"}},
		SMTPServers: []SMTP{server(down), server(srv.Port)}}
	res, err := h.sendTestMessage(context.Background(), "jane@example.org")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("smtp failover 127.0.0.1:%d (starttls), 127.0.0.1:%d (starttls)", down, srv.Port)
	if !res.Sent || res.transport != want || res.dkim != "not signed: dkim is not configured" {
		t.Fatalf("%+v\nwant transport %s", res, want)
	}
	if msgs := srv.Messages(); len(msgs) != 1 || !strings.Contains(string(msgs[0].Data), "Message-ID: "+res.MessageID) {
		t.Fatalf("%d messages", len(msgs))
	}
}

// TestAuthmailCommandListsEveryCommand: `caddy authmail`, where a user
// looks for the module's commands, names each of them, the ones Caddy
// makes register under names of their own included.
func TestAuthmailCommandListsEveryCommand(t *testing.T) {
	cmds := caddycmd.Commands()
	long := cmds["authmail"].Long
	names := func(c string) bool { return strings.Contains(long, c+" ") || strings.Contains(long, c+"\n") }
	cmd := &cobra.Command{Use: "authmail"}
	cmds["authmail"].CobraFunc(cmd)
	for _, sub := range cmd.Commands() {
		if !names("caddy authmail " + sub.Name()) {
			t.Errorf("caddy authmail does not list caddy authmail %s", sub.Name())
		}
	}
	n := 0
	for name := range cmds {
		if strings.HasPrefix(name, "authmail-") {
			n++
			if !names("caddy " + name) {
				t.Errorf("caddy authmail does not list caddy %s", name)
			}
		}
	}
	if n < 2 {
		t.Fatalf("found %d authmail-* commands", n)
	}
}
