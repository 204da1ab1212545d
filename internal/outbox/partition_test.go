package outbox

import (
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-authmail/authmail/internal/faultproxy"
	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/redistest"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestPartitionedInstances runs three engines in one process, each
// reaching one real redis-server through a TCP proxy of its own, and a
// real SMTP server. While mail is accepted round-robin, one instance at
// a time is cut off from Redis (its proxy holds every byte, resets its
// connections, or delays them), often for longer than the lease, and it
// keeps running meanwhile. Every message the SMTP server receives is
// counted by its Message-ID. The test fails on any message received
// twice, on any accepted message that ends "sent" without having
// arrived, and on any accepted message not final within a minute and a
// half after the last fault healed.
//
// AUTHMAIL_PARTITION_SENDS sets the number of sends (default 600,
// spread over a minute).
func TestPartitionedInstances(t *testing.T) {
	if testing.Short() {
		t.Skip("a partition run takes about a minute")
	}
	redis := redistest.Start(t)
	prefix := redistest.Prefix(t)
	smtp := smtptest.Start(t, smtptest.Options{TLS: smtptest.None})
	sends := 600
	if v, err := strconv.Atoi(os.Getenv("AUTHMAIL_PARTITION_SENDS")); err == nil && v > 0 {
		sends = v
	}
	const n = 3
	spread := time.Minute // the sends are spread over this long
	lease := 2 * time.Second
	cfg := testConfig()
	cfg.Lease = lease
	cfg.RetryBackoff, cfg.MaxBackoff = 300*time.Millisecond, 2*time.Second
	cfg.Drain = time.Second
	proxies := make([]*faultproxy.Proxy, n)
	engines := make([]*Engine, n)
	for i := range n {
		p, err := faultproxy.Start(redis.Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = p.Close() })
		proxies[i] = p
		s := (&redistest.Server{Addr: p.Addr}).Storage(t, prefix)
		sender := mailer.NewSender(mailer.SMTPSettings{Host: smtp.Host, Port: smtp.Port, TLSMode: mailer.TLSNone,
			Timeout: 5 * time.Second, Connections: 2})
		t.Cleanup(func() { _ = sender.Destruct() })
		engines[i] = newEngine(t, NewLiveStorage(s), fmt.Sprintf("node-%d", i+1), sender, cfg)
		engines[i].Start()
	}
	truth := redis.Storage(t, prefix) // a view that no fault touches

	// faults: every 1–2.5 s one instance, for 1–5 s (half of them
	// longer than the lease), until the sends are done
	stop := make(chan struct{})
	var faults sync.WaitGroup
	var faultLog []string
	faults.Add(1)
	go func() {
		defer faults.Done()
		rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(1000+rng.IntN(1500)) * time.Millisecond):
			}
			i := rng.IntN(n)
			m := []faultproxy.Mode{faultproxy.Blackhole, faultproxy.Reset, faultproxy.Latency}[rng.IntN(3)]
			d := time.Duration(1000+rng.IntN(4000)) * time.Millisecond
			proxies[i].Set(m, func() time.Duration { return time.Duration(50+rand.IntN(250)) * time.Millisecond })
			faultLog = append(faultLog, fmt.Sprintf("node-%d %s %s", i+1, m, d))
			select {
			case <-stop:
			case <-time.After(d):
			}
			proxies[i].Set(faultproxy.Pass, nil)
		}
	}()

	type sent struct {
		id   string
		node int
	}
	var mu sync.Mutex
	accepted := map[string]sent{} // token → message
	refused := map[string]bool{}
	var hung atomic.Int32
	var next atomic.Int32
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				k := int(next.Add(1))
				if k > sends {
					return
				}
				token := fmt.Sprintf("p%d.%d@partition.test", k, w)
				m := message(fmt.Sprintf("user%d@example.com", k))
				m.Env.Data = []byte("Message-ID: <" + token + ">\r\nSubject: x\r\n\r\nbody\r\n")
				node := k % n
				start := time.Now()
				entries, err := engines[node].Accept([]*NewMessage{m}, "", false)
				if time.Since(start) > 30*time.Second {
					hung.Add(1)
				}
				mu.Lock()
				if err == nil {
					accepted[token] = sent{entries[0].ID(), node}
				} else {
					refused[token] = true
				}
				mu.Unlock()
				// spread the sends over the run: 6 workers, sends in all
				time.Sleep(6 * spread / time.Duration(sends))
			}
		}()
	}
	wg.Wait()
	close(stop)
	faults.Wait()
	for _, p := range proxies {
		p.Set(faultproxy.Pass, nil)
	}
	healed := time.Now()
	t.Logf("%d sends: %d accepted, %d refused (503), %d answers took over 30 s; faults: %v", sends, len(accepted), len(refused), hung.Load(), faultLog)

	// every accepted message final within 90 s of the heal
	var notFinal []string
	deadline := healed.Add(90 * time.Second)
	for token, m := range accepted {
		for {
			st, ok := storedState(t, truth, m.id)
			if ok && IsFinal(st.Status) {
				break
			}
			if time.Now().After(deadline) {
				notFinal = append(notFinal, fmt.Sprintf("%s (%s, node-%d): %s %s", m.id, token, m.node+1, st.Status, st.LastCode))
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	time.Sleep(time.Second) // late duplicates
	copies := map[string]int{}
	midRe := regexp.MustCompile(`Message-ID: <([^>]+)>`)
	for _, msg := range smtp.Messages() {
		if !msg.Accepted {
			continue
		}
		if mm := midRe.FindSubmatch(msg.Data); mm != nil {
			copies[string(mm[1])]++
		}
	}
	var dups, lost, unknown, sentAfter503 []string
	for token, c := range copies {
		if c > 1 {
			dups = append(dups, fmt.Sprintf("%s ×%d (%s, accepted by node-%d)", token, c, accepted[token].id, accepted[token].node+1))
		}
		if refused[token] {
			sentAfter503 = append(sentAfter503, token)
		}
	}
	for token, m := range accepted {
		st, _ := storedState(t, truth, m.id)
		switch {
		case st.Status == Sent && copies[token] == 0:
			lost = append(lost, fmt.Sprintf("%s (%s): sent, never arrived", m.id, token))
		case st.Status == Unknown:
			unknown = append(unknown, m.id)
		}
	}
	t.Logf("after the heal: %d duplicates, %d sent-but-lost, %d not final after 90 s, %d unknown, %d delivered although answered 503",
		len(dups), len(lost), len(notFinal), len(unknown), len(sentAfter503))
	if len(dups) > 0 {
		t.Errorf("delivered more than once: %v", dups)
	}
	if len(lost) > 0 {
		t.Errorf("lost: %v", lost)
	}
	if len(notFinal) > 0 {
		t.Errorf("not final 90 s after the last heal: %v", notFinal[:min(20, len(notFinal))])
	}
}
