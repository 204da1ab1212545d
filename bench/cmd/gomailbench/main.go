// Command gomailbench is the raw go-mail baseline for authmail's
// end-to-end benchmark: -conns goroutines, each with its own go-mail
// Client that dials once (DialWithContext) and then calls Send for each
// of its messages, in plaintext (smtp-sink offers no STARTTLS). Messages
// are multipart/alternative text+HTML, sized like authmail's (-size, or
// -sample with a message dumped by smtp-sink -d). Each message is built
// inside the timed loop, as authmail renders each of its messages.
//
// The clock runs from the first dial until smtp-sink's counter (-sink-counter,
// the file smtp-sink -c writes to) shows every message, or, without
// -sink-counter, until the last Send returns. It prints one line of
// key=value pairs starting with "GOMAIL".
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-authmail/authmail/bench/internal/cpu"
	"github.com/caddy-authmail/authmail/bench/internal/sinkcount"
	"github.com/wneessen/go-mail"
)

func main() {
	addr := flag.String("addr", "", "SMTP server host:port")
	n := flag.Int("n", 10000, "messages to send")
	conns := flag.Int("conns", 4, "parallel connections (one goroutine and one Client each)")
	size := flag.Int("size", 3000, "approximate size of a rendered message in bytes")
	sample := flag.String("sample", "", "a message dumped by smtp-sink -d; its size (without smtp-sink's added headers) overrides -size")
	withoutNoop := flag.Bool("without-noop", false, "use mail.WithoutNoop() (authmail sends no NOOP)")
	sinkFile := flag.String("sink-counter", "", "smtp-sink -c output file; if set, stop the clock when it counts every message")
	sinkTimeout := flag.Duration("sink-timeout", 5*time.Minute, "how long to wait for smtp-sink")
	flag.Parse()
	if *addr == "" || *n <= 0 || *conns <= 0 {
		flag.Usage()
		os.Exit(2)
	}
	host, portStr, err := net.SplitHostPort(*addr)
	if err != nil {
		fatal(err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		fatal(err)
	}
	if *sample != "" {
		s, err := sampleSize(*sample)
		if err != nil {
			fatal(err)
		}
		*size = s
	}
	text, html := bodies(*size)
	rendered := renderedSize(text, html)

	opts := []mail.Option{
		mail.WithPort(port),
		mail.WithTLSPolicy(mail.NoTLS),
		mail.WithHELO("bench.example.com"),
		mail.WithTimeout(30 * time.Second),
	}
	if *withoutNoop {
		opts = append(opts, mail.WithoutNoop())
	}
	clients := make([]*mail.Client, *conns)
	for i := range clients {
		c, err := mail.NewClient(host, opts...)
		if err != nil {
			fatal(err)
		}
		clients[i] = c
	}

	base := 0
	if *sinkFile != "" {
		if base, err = sinkcount.Read(*sinkFile); err != nil {
			fatal(err)
		}
	}

	var next, sent, failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func(c *mail.Client) {
			defer wg.Done()
			if err := c.DialWithContext(context.Background()); err != nil {
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			defer c.Close()
			for i := next.Add(1); i <= int64(*n); i = next.Add(1) {
				m := newMsg(text, html)
				if err := c.Send(m); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				sent.Add(1)
			}
		}(c)
	}
	wg.Wait()
	end := time.Now()
	if e := firstErr.Load(); e != nil {
		fmt.Fprintln(os.Stderr, "gomailbench: first error:", e)
	}
	// the client's CPU time, before waiting for the sink
	out := fmt.Sprintf("GOMAIL n=%d conns=%d target_size=%d size=%d without_noop=%t sent=%d failed=%d send_s=%.3f cpu_s=%.3f",
		*n, *conns, *size, rendered, *withoutNoop, sent.Load(), failed.Load(), end.Sub(start).Seconds(), cpu.Seconds())
	delivered := int(sent.Load())
	if *sinkFile != "" {
		var got int
		var werr error
		end, got, werr = sinkcount.WaitFor(*sinkFile, base+int(sent.Load()), *sinkTimeout)
		delivered = got - base
		if werr != nil {
			fmt.Fprintln(os.Stderr, "gomailbench:", werr)
			out += " e2e_error=timeout"
		}
	}
	e2e := end.Sub(start)
	out += fmt.Sprintf(" delivered=%d e2e_s=%.3f e2e_rate=%.1f", delivered, e2e.Seconds(), float64(delivered)/e2e.Seconds())
	fmt.Println(out)
}

// newMsg builds one message like authmail's: From with display name, To,
// Subject, Date, Message-ID, multipart/alternative text+HTML, QP.
func newMsg(text, html string) *mail.Msg {
	m := mail.NewMsg(mail.WithNoDefaultUserAgent())
	if err := m.FromFormat("Bench", "bench@example.com"); err != nil {
		fatal(err)
	}
	if err := m.To("user@example.com"); err != nil {
		fatal(err)
	}
	m.Subject("Your Bench sign-in code")
	m.SetDate()
	m.SetMessageID()
	m.SetBodyString(mail.TypeTextPlain, text)
	m.AddAlternativeString(mail.TypeTextHTML, html)
	return m
}

// bodies returns a text and an HTML body such that the rendered message
// is about size bytes (text ≈ 1/3, HTML ≈ 2/3 of the body bytes, as in
// authmail's templates).
func bodies(size int) (string, string) {
	overhead := renderedSize("", "")
	avail := max(size-overhead, 64)
	text := filler(avail/3, "")
	html := filler(avail-avail/3, "<p>")
	// correct once for quoted-printable and line-ending overhead
	if diff := renderedSize(text, html) - size; diff > 0 && diff < len(html) {
		html = filler(len(html)-diff, "<p>")
	}
	return text, html
}

func filler(n int, prefix string) string {
	const line = "The quick brown fox jumps over the lazy dog, again and again."
	var b strings.Builder
	for b.Len() < n {
		b.WriteString(prefix)
		b.WriteString(line)
		b.WriteString("\n")
	}
	return b.String()[:n]
}

func renderedSize(text, html string) int {
	var buf bytes.Buffer
	if _, err := newMsg(text, html).WriteTo(&buf); err != nil {
		fatal(err)
	}
	return buf.Len()
}

// sampleSize returns the wire size of a message dumped by smtp-sink -d,
// without the X-Client-*, X-Helo-Args, X-Mail-Args, X-Rcpt-Args and
// Received headers smtp-sink puts in front of it.
func sampleSize(path string) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	r := bufio.NewReader(bytes.NewReader(data))
	skipped := 0
	inReceived := false
	for {
		line, err := r.ReadString('\n')
		if err == io.EOF || line == "" {
			break
		}
		switch {
		case strings.HasPrefix(line, "X-Client-"), strings.HasPrefix(line, "X-Helo-Args:"),
			strings.HasPrefix(line, "X-Mail-Args:"), strings.HasPrefix(line, "X-Rcpt-Args:"):
			inReceived = false
		case strings.HasPrefix(line, "Received:"):
			inReceived = true
		case inReceived && (strings.HasPrefix(line, " ") || strings.HasPrefix(line, "\t")):
		default:
			// smtp-sink stores lines with a bare LF; on the wire each
			// line ends in CRLF
			msg := data[skipped:]
			return len(msg) + bytes.Count(msg, []byte("\n")) - bytes.Count(msg, []byte("\r\n")), nil
		}
		skipped += len(line)
	}
	return 0, fmt.Errorf("%s: no message after smtp-sink's headers", path)
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "gomailbench:", err)
	os.Exit(1)
}
