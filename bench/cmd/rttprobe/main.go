// Command rttprobe measures one SMTP round trip to a server, as a client
// sees it: after the greeting and EHLO it sends n NOOPs, one after the
// other, and prints the p50 and p99 of the time from each command to its
// reply. Through bench's delay proxy this is the real cost of one round
// trip (the proxy's forwarding included), which the floor of the
// synchronous phase is made of.
//
//	rttprobe -addr 127.0.0.1:12529 -n 200
package main

import (
	"flag"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"sort"
	"time"
)

func main() {
	addr := flag.String("addr", "", "SMTP server (host:port)")
	n := flag.Int("n", 200, "number of NOOP round trips")
	flag.Parse()
	if *addr == "" || *n <= 0 {
		flag.Usage()
		os.Exit(2)
	}
	took, err := probe(*addr, *n)
	if err != nil {
		fmt.Fprintln(os.Stderr, "rttprobe:", err)
		os.Exit(1)
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	fmt.Printf("RTTPROBE n=%d p50_ms=%.3f p99_ms=%.3f\n", *n, ms(took[len(took)/2]), ms(took[len(took)*99/100]))
}

func probe(addr string, n int) ([]time.Duration, error) {
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	c := textproto.NewConn(nc)
	if _, _, err := c.ReadResponse(220); err != nil {
		return nil, fmt.Errorf("greeting: %w", err)
	}
	cmd := func(line string) error {
		if err := c.PrintfLine("%s", line); err != nil {
			return err
		}
		_, _, err := c.ReadResponse(250)
		return err
	}
	if err := cmd("EHLO rttprobe.localhost"); err != nil {
		return nil, fmt.Errorf("EHLO: %w", err)
	}
	took := make([]time.Duration, 0, n)
	for range n {
		t0 := time.Now()
		if err := cmd("NOOP"); err != nil {
			return nil, fmt.Errorf("NOOP: %w", err)
		}
		took = append(took, time.Since(t0))
	}
	_ = c.PrintfLine("QUIT")
	return took, nil
}
