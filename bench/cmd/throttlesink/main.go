// Command throttlesink is an SMTP server for benchmarks that limits the
// send rate the way Amazon SES does: a token bucket shared by all
// connections (-rate messages per second, -burst), checked at MAIL FROM,
// and "454 4.7.0 Throttling failure: Maximum sending rate exceeded" for a
// message that finds it empty. It keeps nothing but counts (no TLS, no
// AUTH, PIPELINING offered).
//
// It appends its counters to -counter in the format of postfix's
// smtp-sink -c ("mesg=N throttled=M\r", a record whenever they change), so
// that loadgen -sink-counter and bench/internal/sinkcount read it as they
// read smtp-sink's: mesg counts messages accepted at the final dot,
// throttled the throttling replies sent.
//
//	throttlesink -addr 127.0.0.1:12530 -rate 50 -burst 10 -counter throttle.out
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddy-authmail/authmail/internal/smtptest"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	rate := flag.Float64("rate", 50, "messages per second the server takes, across connections")
	burst := flag.Int("burst", 10, "token bucket size")
	counter := flag.String("counter", "", "file to append the counter records to")
	flag.Parse()
	if *counter == "" || *rate <= 0 || *burst <= 0 {
		flag.Usage()
		os.Exit(2)
	}
	out, err := os.OpenFile(*counter, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		fatal(err)
	}
	dir, err := os.MkdirTemp("", "throttlesink-")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(dir)
	srv, err := smtptest.New(smtptest.Options{TLS: smtptest.None, Addr: *addr, Dir: dir,
		Throttle: &smtptest.Throttle{Rate: *rate, Burst: *burst}})
	if err != nil {
		fatal(err)
	}
	var delivered atomic.Int64
	// the counts are all a benchmark needs; the bodies would grow memory
	srv.SetHooks(smtptest.Hooks{Data: func(*smtptest.Message) error {
		srv.ClearMessages()
		delivered.Add(1)
		return nil
	}})

	last := ""
	write := func() {
		_, throttled := srv.ThrottleTotals()
		rec := fmt.Sprintf("mesg=%d throttled=%d\r", delivered.Load(), throttled)
		if rec == last {
			return
		}
		if _, err := out.WriteString(rec); err != nil {
			fatal(err)
		}
		last = rec
	}
	write()
	fmt.Printf("THROTTLESINK addr=%s rate=%g burst=%d\n", srv.Addr, *rate, *burst)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			write()
		case <-sig:
			write()
			accepted, throttled := srv.ThrottleTotals()
			fmt.Printf("THROTTLESINK delivered=%d passed_mail=%d throttled=%d max_per_second=%d\n",
				delivered.Load(), accepted, throttled, srv.MaxAcceptedPerSecond())
			_ = srv.Close()
			_ = out.Close()
			return
		}
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "throttlesink:", err)
	os.Exit(1)
}
