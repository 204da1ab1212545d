// Command loadgen submits a fixed number of POST requests to an authmail
// endpoint with a fixed concurrency, reports throughput and latency, and
// optionally waits until postfix's smtp-sink has received every accepted
// message (end-to-end delivery rate).
//
//	loadgen -url http://127.0.0.1:18080/authmail/send/otp -n 20000 -c 32 \
//	    -key bench-key-0123456789abcdef -async -sink-counter sink.out
//
// It prints one line of key=value pairs starting with "LOADGEN".
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-authmail/authmail/bench/internal/cpu"
	"github.com/caddy-authmail/authmail/bench/internal/sinkcount"
)

func main() {
	url := flag.String("url", "", "endpoint to POST to")
	n := flag.Int("n", 1000, "number of requests")
	conc := flag.Int("c", 32, "concurrent requests (one keep-alive connection each)")
	body := flag.String("body", `{"to":"user@example.com","code":"123456"}`, "JSON request body")
	key := flag.String("key", "", "API key sent as Authorization: Bearer <key>")
	async := flag.Bool("async", true, "send Prefer: respond-async")
	reqTimeout := flag.Duration("timeout", 60*time.Second, "per-request timeout")
	sinkFile := flag.String("sink-counter", "", "smtp-sink -c output file; if set, wait until it counts every accepted message")
	sinkTimeout := flag.Duration("sink-timeout", 5*time.Minute, "how long to wait for smtp-sink")
	progress := flag.Bool("progress", false, "print progress to stderr every 5 s")
	flag.Parse()
	if *url == "" || *n <= 0 || *conc <= 0 {
		flag.Usage()
		os.Exit(2)
	}

	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        *conc,
		MaxIdleConnsPerHost: *conc,
		MaxConnsPerHost:     *conc,
		DisableCompression:  true,
		IdleConnTimeout:     90 * time.Second,
	}
	client := &http.Client{Transport: tr, Timeout: *reqTimeout}
	payload := []byte(*body)

	base := 0
	if *sinkFile != "" {
		var err error
		if base, err = sinkcount.Read(*sinkFile); err != nil {
			fatal(err)
		}
	}

	var (
		next      atomic.Int64
		done      atomic.Int64
		mu        sync.Mutex
		statuses  = map[int]int{}
		errSample = map[string]int{}
		netErrs   int
		lat       = make([]time.Duration, 0, *n)
	)
	stopProgress := make(chan struct{})
	if *progress {
		go func() {
			t := time.NewTicker(5 * time.Second)
			defer t.Stop()
			for {
				select {
				case <-stopProgress:
					return
				case <-t.C:
					fmt.Fprintf(os.Stderr, "loadgen: %d/%d requests done\n", done.Load(), *n)
				}
			}
		}()
	}
	start := time.Now()
	var wg sync.WaitGroup
	for range *conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, *n / *conc + 1)
			localStatus := map[int]int{}
			localErr := map[string]int{}
			localNetErrs := 0
			for next.Add(1) <= int64(*n) {
				req, err := http.NewRequestWithContext(context.Background(), http.MethodPost, *url, bytes.NewReader(payload))
				if err != nil {
					fatal(err)
				}
				req.Header.Set("Content-Type", "application/json")
				if *key != "" {
					req.Header.Set("Authorization", "Bearer "+*key)
				}
				if *async {
					req.Header.Set("Prefer", "respond-async")
				}
				t0 := time.Now()
				resp, err := client.Do(req)
				if err != nil {
					localNetErrs++
					localErr[shorten(err.Error())]++
					done.Add(1)
					continue
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				local = append(local, time.Since(t0))
				localStatus[resp.StatusCode]++
				if resp.StatusCode >= 300 {
					localErr[fmt.Sprintf("%d %s", resp.StatusCode, shorten(string(b)))]++
				}
				done.Add(1)
			}
			mu.Lock()
			lat = append(lat, local...)
			for k, v := range localStatus {
				statuses[k] += v
			}
			for k, v := range localErr {
				errSample[k] += v
			}
			netErrs += localNetErrs
			mu.Unlock()
		}()
	}
	wg.Wait()
	submitDur := time.Since(start)
	close(stopProgress)

	accepted := statuses[http.StatusOK] + statuses[http.StatusAccepted]
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		i := int(p / 100 * float64(len(lat)-1))
		return float64(lat[i].Microseconds()) / 1000
	}
	var codes []string
	for k, v := range statuses {
		codes = append(codes, fmt.Sprintf("status_%d=%d", k, v))
	}
	sort.Strings(codes)
	for e, c := range errSample {
		fmt.Fprintf(os.Stderr, "loadgen: %d× %s\n", c, e)
	}

	// the client's CPU time, before waiting for the sink
	out := fmt.Sprintf("LOADGEN n=%d c=%d accepted=%d net_errors=%d %s submit_s=%.3f submit_rps=%.1f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f cpu_s=%.3f",
		*n, *conc, accepted, netErrs, strings.Join(codes, " "), submitDur.Seconds(), float64(len(lat))/submitDur.Seconds(),
		pct(50), pct(90), pct(99), pct(100), cpu.Seconds())
	if *sinkFile != "" {
		end, got, err := sinkcount.WaitFor(*sinkFile, base+accepted, *sinkTimeout)
		e2e := end.Sub(start)
		out += fmt.Sprintf(" delivered=%d e2e_s=%.3f e2e_rate=%.1f", got-base, e2e.Seconds(), float64(got-base)/e2e.Seconds())
		if err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			out += " e2e_error=timeout"
		}
	}
	fmt.Println(out)
}

func shorten(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 160 {
		s = s[:160] + "…"
	}
	return s
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "loadgen:", err)
	os.Exit(1)
}
