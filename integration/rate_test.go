package integration

import (
	"fmt"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/redistest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// Two and three Caddy processes on one Redis, each with `rate 20/1s`,
// send 400 codes accepted round robin: the rate is the provider's, so
// the cluster shares it, and the server sees about 20 messages in any
// one second, not 20 per instance. The measured overshoot is logged
// (docs/provider-limits.md quotes it); the test fails above 35%.
func TestClusterSharesTheRate(t *testing.T) {
	const limit, n = 20, 400
	for _, size := range []int{2, 3} {
		t.Run(fmt.Sprintf("%d instances", size), func(t *testing.T) {
			srv := smtptest.Start(t, smtptest.Options{Username: "mailer", Password: smtpPassword})
			caddyBinary(t)
			redis := redistest.Start(t)
			storage := fmt.Sprintf("redis {\n\t\t\taddress %s\n\t\t\tkey_prefix %s\n\t\t}", redis.Addr, redistest.Prefix(t))
			var procs []*caddyProc
			for i := range size {
				procs = append(procs, startCaddyWith(t, fmt.Sprintf("rate-%d-%d", size, i), t.TempDir(), storage, redisLease, fmt.Sprintf("rate %d/1s", limit), srv))
			}
			// let every instance see the others before the burst
			time.Sleep(3 * time.Second)
			start := time.Now()
			results := sendQueued(t, procs, fmt.Sprintf("share%d", size), n)
			deadline := time.Now().Add(time.Duration(n/limit)*time.Second*2 + 20*time.Second)
			for len(srv.Messages()) < n && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
			}
			took := time.Since(start)
			msgs := srv.Messages()
			if len(msgs) != n {
				t.Fatalf("%d of %d delivered in %v", len(msgs), n, took)
			}
			deliveredOnce(t, srv, results, finalStates(t, procs[0], results))
			var at []time.Time
			for _, m := range msgs {
				at = append(at, m.Received)
			}
			sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
			most := 0
			for i, j := 0, 0; j < len(at); j++ {
				for at[j].Sub(at[i]) >= time.Second {
					i++
				}
				most = max(most, j-i+1)
			}
			// each instance's metrics show its part of the rate
			c := &http.Client{Timeout: 5 * time.Second}
			var shares []float64
			sum := 0.0
			for _, p := range procs {
				res, err := c.Get(fmt.Sprintf("http://localhost:%d/metrics", p.admin))
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(res.Body)
				res.Body.Close()
				m := regexp.MustCompile(`(?m)^caddy_authmail_smtp_rate_current\{[^}]*\} (\S+)$`).FindSubmatch(b)
				if m == nil {
					t.Fatalf("%s: no caddy_authmail_smtp_rate_current in its metrics", p.name)
				}
				v, _ := strconv.ParseFloat(string(m[1]), 64)
				shares = append(shares, v)
				sum += v
			}
			if sum <= 0 || sum > limit*1.01 {
				t.Fatalf("the instances' current rates %v add up to %.2f/s; the cluster's rate is %d/s", shares, sum, limit)
			}
			t.Logf("%d instances, rate %d/1s: %d messages in %v (%.1f/s; the rate allows them in %v); at most %d in any one second (%+.0f%%); current rates now %v /s",
				size, limit, n, took.Round(time.Millisecond), float64(n)/took.Seconds(), time.Duration(n/limit)*time.Second, most, float64(most-limit)/limit*100, shares)
			if most > limit*135/100 {
				t.Fatalf("the server saw %d messages in one second; the cluster's rate is %d/1s", most, limit)
			}
			if took < time.Duration(n/limit)*time.Second*9/10 {
				t.Fatalf("%d messages in %v: faster than the rate allows", n, took)
			}
		})
	}
}
