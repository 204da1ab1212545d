// Command delayproxy is a TCP proxy that delays every chunk of data by a
// fixed time in each direction, preserving order, to emulate network
// latency on loopback: with -delay 5ms a round trip through it takes
// 10 ms more.
//
//	delayproxy -listen 127.0.0.1:12526 -target 127.0.0.1:12525 -delay 5ms
//
// Each direction has a reader goroutine that stamps every chunk with its
// due time (arrival + delay) and a writer that sleeps until the chunk is
// due. Chunks that arrive while earlier ones wait are not delayed twice.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type chunk struct {
	b   []byte
	due time.Time
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	target := flag.String("target", "", "address to forward to")
	delay := flag.Duration("delay", 5*time.Millisecond, "delay added in each direction")
	flag.Parse()
	if *target == "" {
		flag.Usage()
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stderr, "delayproxy: %s -> %s, %s each way\n", ln.Addr(), *target, *delay)
	var stopping atomic.Bool
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		<-sig
		stopping.Store(true)
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if stopping.Load() {
				return
			}
			log.Fatal(err)
		}
		go handle(c.(*net.TCPConn), *target, *delay)
	}
}

func handle(client *net.TCPConn, target string, delay time.Duration) {
	sc, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		log.Printf("delayproxy: dial %s: %v", target, err)
		client.Close()
		return
	}
	server := sc.(*net.TCPConn)
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			client.Close()
			server.Close()
		})
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); pipe(server, client, delay, closeBoth) }()
	go func() { defer wg.Done(); pipe(client, server, delay, closeBoth) }()
	wg.Wait()
	closeBoth()
}

// pipe copies src to dst, delaying each chunk by delay. At EOF it
// half-closes dst so the other side sees the end of the stream; on an
// error it closes both connections.
func pipe(dst, src *net.TCPConn, delay time.Duration, closeBoth func()) {
	ch := make(chan chunk, 1024)
	go func() {
		defer close(ch)
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if n > 0 {
				ch <- chunk{b: buf[:n], due: time.Now().Add(delay)}
			}
			if err != nil {
				if err != io.EOF {
					closeBoth()
				}
				return
			}
		}
	}()
	for c := range ch {
		if d := time.Until(c.due); d > 0 {
			time.Sleep(d)
		}
		if _, err := dst.Write(c.b); err != nil {
			closeBoth()
			for range ch {
				// drain so the reader can finish
			}
			return
		}
	}
	_ = dst.CloseWrite()
}
