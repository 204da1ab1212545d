// Command tlssink is an SMTP server for benchmarks that, unlike postfix's
// smtp-sink, requires STARTTLS and AUTH PLAIN, as a provider's submission
// server does. It accepts every message (PIPELINING offered), keeps
// nothing but a count, and writes its CA certificate to -ca.
//
//	tlssink -addr 127.0.0.1:12528 -ca /tmp/ca.pem -user bench -pass secret
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	ca := flag.String("ca", "", "where to write the server's CA certificate (PEM)")
	user := flag.String("user", "bench", "AUTH username")
	pass := flag.String("pass", "", "AUTH password")
	flag.Parse()
	if *ca == "" || *pass == "" {
		flag.Usage()
		os.Exit(2)
	}
	srv, err := smtptest.New(smtptest.Options{TLS: smtptest.StartTLS, Username: *user, Password: *pass, Addr: *addr, Dir: filepath.Dir(*ca)})
	if err != nil {
		fmt.Fprintln(os.Stderr, "tlssink:", err)
		os.Exit(1)
	}
	// the count is all a benchmark needs; the bodies would grow memory
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error { srv.ClearMessages(); return nil }})
	if err := os.Rename(srv.CAFile, *ca); err != nil {
		fmt.Fprintln(os.Stderr, "tlssink:", err)
		os.Exit(1)
	}
	fmt.Printf("TLSSINK addr=%s\n", srv.Addr)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	_ = srv.Close()
}
