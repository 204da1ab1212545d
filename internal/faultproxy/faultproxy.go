// Package faultproxy is a TCP proxy for tests that cuts one client off
// from its server the ways a network does: it can stall every byte in
// both directions (a blackhole: connections stay open, nothing is
// answered, and what was held is delivered once the fault ends, as TCP
// retransmission would), reset every connection (and refuse new ones
// while the fault lasts), or delay each chunk in each direction.
package faultproxy

import (
	"io"
	"net"
	"sync"
	"time"
)

// Mode is the proxy's current behaviour.
type Mode int

const (
	Pass      Mode = iota // forward at once
	Blackhole             // accept and hold every byte, answer nothing
	Reset                 // close every connection, refuse new ones
	Latency               // delay every chunk, each direction
)

func (m Mode) String() string {
	return [...]string{"pass", "blackhole", "reset", "latency"}[m]
}

// Proxy forwards connections from Addr to a target address.
type Proxy struct {
	Addr   string
	target string
	ln     net.Listener

	mu    sync.Mutex
	mode  Mode
	delay func() time.Duration
	heal  chan struct{} // closed when a blackhole ends
	conns map[net.Conn]struct{}
	done  bool
}

// Start listens on a free loopback port and forwards to target.
func Start(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, heal: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	close(p.heal)
	go p.serve()
	return p, nil
}

// Set switches the proxy's mode; delay, for Latency, draws each chunk's
// delay. Reset closes every open connection at once.
func (p *Proxy) Set(m Mode, delay func() time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if m == Blackhole && p.mode != Blackhole {
		p.heal = make(chan struct{})
	}
	if m != Blackhole && p.mode == Blackhole {
		close(p.heal)
	}
	p.mode, p.delay = m, delay
	if m == Reset {
		for c := range p.conns {
			_ = c.Close()
		}
	}
}

// Close stops the proxy and closes its connections.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.done = true
	if p.mode == Blackhole {
		close(p.heal)
		p.mode = Pass
	}
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	return p.ln.Close()
}

func (p *Proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.handle(c)
	}
}

func (p *Proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done || p.mode == Reset {
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *Proxy) untrack(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		delete(p.conns, c)
		_ = c.Close()
	}
}

func (p *Proxy) handle(c net.Conn) {
	if !p.track(c) {
		_ = c.Close()
		return
	}
	// the upstream dial waits out a blackhole, as a SYN would
	p.hold()
	u, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil || !p.track(u) {
		if u != nil {
			_ = u.Close()
		}
		p.untrack(c)
		return
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(u, c) }()
	go func() { defer wg.Done(); p.pipe(c, u) }()
	wg.Wait()
	p.untrack(c, u)
}

// hold waits while a blackhole lasts.
func (p *Proxy) hold() {
	p.mu.Lock()
	heal := p.heal
	p.mu.Unlock()
	<-heal
}

// pipe copies src to dst chunk by chunk, holding each chunk while a
// blackhole lasts and delaying it under Latency.
func (p *Proxy) pipe(dst, src net.Conn) {
	defer func() {
		// half-close is enough for the other side to see the end
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.hold()
			p.mu.Lock()
			m, delay := p.mode, p.delay
			p.mu.Unlock()
			if m == Latency && delay != nil {
				time.Sleep(delay())
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				_ = src.Close()
				return
			}
		}
		if err != nil {
			if err != io.EOF {
				_ = dst.Close()
			}
			return
		}
	}
}
