// Command storeprobe measures one durable write of certmagic's file
// storage (the default Caddy storage) in a directory: n Stores of a
// value of the given size, one after the other, and their p50 and p99.
//
//	storeprobe -dir /var/lib/caddy/probe -n 200 -size 3000
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/caddyserver/certmagic"
)

func main() {
	dir := flag.String("dir", "", "directory for the storage (created; removed afterwards)")
	n := flag.Int("n", 200, "number of writes")
	size := flag.Int("size", 3000, "bytes per value")
	flag.Parse()
	if *dir == "" || *n <= 0 {
		flag.Usage()
		os.Exit(2)
	}
	defer os.RemoveAll(*dir)
	st := &certmagic.FileStorage{Path: *dir}
	val := make([]byte, *size)
	took := make([]time.Duration, 0, *n)
	ctx := context.Background()
	for i := range *n {
		t0 := time.Now()
		if err := st.Store(ctx, fmt.Sprintf("probe/%d", i%16), val); err != nil {
			fmt.Fprintln(os.Stderr, "storeprobe:", err)
			os.Exit(1)
		}
		took = append(took, time.Since(t0))
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	fmt.Printf("STOREPROBE n=%d p50_ms=%.3f p99_ms=%.3f\n", *n, ms(took[len(took)/2]), ms(took[len(took)*99/100]))
}
