package outbox

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/redistest"
)

// BenchmarkEngine accepts b.N messages, one per request from 16
// goroutines, and waits until the fake transport delivered every one and
// its outcome is durable: the hot path (accept, claim, dot mark, final
// dot, state write) on each storage.
func BenchmarkEngine(b *testing.B) {
	stores := map[string]func(b *testing.B) certmagic.Storage{
		"file": func(b *testing.B) certmagic.Storage { return &certmagic.FileStorage{Path: b.TempDir()} },
		"redis": func(b *testing.B) certmagic.Storage {
			srv := redistest.Start(b)
			return srv.Storage(b, redistest.Prefix(b))
		},
	}
	for _, name := range []string{"file", "redis"} {
		b.Run(name, func(b *testing.B) {
			tr := newFake()
			e := newEngine(b, stores[name](b), "bench", tr, nil)
			e.Start()
			var next atomic.Int64
			var wg sync.WaitGroup
			ids := make([]string, b.N)
			b.ResetTimer()
			for range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						k := int(next.Add(1)) - 1
						if k >= b.N {
							return
						}
						ids[k] = accept(b, e, fmt.Sprintf("u%d@example.org", k))[0]
					}
				}()
			}
			wg.Wait()
			deadline := time.Now().Add(5 * time.Minute)
			for _, id := range ids {
				for tr.deliveries(id) == 0 {
					if time.Now().After(deadline) {
						b.Fatalf("%s never delivered", id)
					}
					time.Sleep(time.Millisecond)
				}
			}
			for {
				n, _ := e.QueueStats()
				if n == 0 {
					break
				}
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}
