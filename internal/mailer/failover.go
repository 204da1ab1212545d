package mailer

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Tunables; tests shorten them.
var (
	// failoverProbeBase is the first delay before a failing server is
	// probed again; it doubles per failed probe up to failoverProbeMax
	failoverProbeBase = 5 * time.Second
	failoverProbeMax  = 5 * time.Minute
	// failoverTransientLimit is how many 4xx answers in a row mark a
	// server down: one 4xx moves only that message on, since a temporary
	// refusal can be about the message (a recipient's full mailbox)
	failoverTransientLimit = 3
)

var (
	mServerUp     *prometheus.GaugeVec
	mServerUpOnce sync.Once
)

// FailoverCollectors returns the per-server gauge, 1 while a server is
// up and 0 while it is down, labelled host:port.
func FailoverCollectors() []prometheus.Collector {
	mServerUpOnce.Do(func() {
		mServerUp = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: "caddy", Subsystem: "authmail",
			Name: "smtp_server_up", Help: "1 while an SMTP server of a failover list is healthy, 0 while it is down and probed."}, []string{"server"})
	})
	return []prometheus.Collector{mServerUp}
}

// serverHealth is the failover state of one SMTP server.
type serverHealth struct {
	down       bool
	since      time.Time // when the current state began
	transients int       // 4xx answers in a row
	lastError  string    // the error code that took it down
	nextProbe  time.Time
	backoff    time.Duration
}

// Failover delivers through the first healthy server of a list
// in priority order. A server that cannot take the message (connection,
// TLS, authentication, timeout, a 4xx) passes it on to the next one at
// once, and counts towards marking that server down; a 5xx refusal of
// the message itself, and any outcome after the message may have been
// accepted, end the attempt and count against no server: a message is
// never offered to a second server once a first one may have it, and a
// server is never marked down for a message it may have taken.
type Failover struct {
	senders []*Sender
	// the tunables, read once at construction
	probeBase, probeMax time.Duration
	transientLimit      int

	mu     sync.Mutex
	health []serverHealth

	done chan struct{}
	once sync.Once
}

func NewFailover(senders []*Sender) *Failover {
	f := &Failover{senders: senders, health: make([]serverHealth, len(senders)), done: make(chan struct{}),
		probeBase: failoverProbeBase, probeMax: failoverProbeMax, transientLimit: failoverTransientLimit}
	now := time.Now()
	for i := range f.health {
		f.health[i].since = now
		f.setGauge(i)
	}
	go f.prober()
	return f
}

// Destruct stops the prober; the senders are released by their own pool
// keys.
func (f *Failover) Destruct() error {
	f.once.Do(func() { close(f.done) })
	return nil
}

func (f *Failover) label(i int) string {
	c := &f.senders[i].cfg
	return fmt.Sprintf("%s:%d", c.Host, c.Port)
}

func (f *Failover) setGauge(i int) {
	FailoverCollectors()
	v := 1.0
	if f.health[i].down {
		v = 0
	}
	mServerUp.WithLabelValues(f.label(i)).Set(v)
}

// order returns the servers to try: the healthy ones in priority order,
// then, as a last resort when none is healthy, the down ones.
func (f *Failover) order() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	var up, down []int
	for i, h := range f.health {
		if h.down {
			down = append(down, i)
		} else {
			up = append(up, i)
		}
	}
	if len(up) > 0 {
		return up
	}
	return down
}

// passesOn reports whether a failure of one server should move the
// message to the next: the message was certainly not accepted, and the
// failure is about the server (not a 5xx refusal of the message).
func passesOn(de *Error) bool {
	switch de.Code {
	case CodeSMTPConnection, CodeSMTPTimeout, CodeSMTPAuthFailed, CodeStartTLSUnsupported, CodeSMTPTransient, CodeSMTPThrottled:
		return true
	}
	// codeUncertain: the server may have it; codeSMTPRejected and
	// codeRecipientRefused: the message is refused, not the server;
	// codeOutboxUnavailable: storage, not the server
	return false
}

func (f *Failover) Send(ctx context.Context, env *Envelope) (Result, error) {
	var last error
	for _, i := range f.order() {
		// BeforeDot runs right before the final dot; once it has run the
		// message may be on its way, so whatever happens next it goes to
		// no other server
		committed := false
		e := *env
		e.BeforeDot = func() error {
			committed = true
			if env.BeforeDot != nil {
				return env.BeforeDot()
			}
			return nil
		}
		d, err := f.senders[i].Send(ctx, &e)
		if err == nil {
			f.succeeded(i)
			return d, nil
		}
		de, _ := err.(*Error)
		if ctx.Err() != nil && !committed {
			// the attempt's time ran out (waiting for a free connection,
			// or dialing): says nothing about the server, and there is no
			// time left for the next one
			return Result{}, err
		}
		if committed {
			// the dot may have reached the server: what follows it (a
			// drop or a timeout that leaves the message unknown, a reply
			// to the dot) tells about this message, not about whether the
			// server takes mail, so it marks nothing down and adds nothing
			// to the server's run of 4xx answers. Only failures before the
			// dot count.
			return Result{}, err
		}
		if de == nil || !passesOn(de) {
			// the message is refused, or storage failed: not the server
			return Result{}, err
		}
		f.failed(i, de)
		last = err
	}
	return Result{}, last
}

func (f *Failover) succeeded(i int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := &f.health[i]
	h.transients = 0
	if h.down {
		f.markUp(i)
	}
}

// markUp brings server i back; f.mu is held.
func (f *Failover) markUp(i int) {
	h := &f.health[i]
	*h = serverHealth{since: time.Now()}
	f.setGauge(i)
}

func (f *Failover) failed(i int, de *Error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := &f.health[i]
	if de.Code == CodeSMTPTransient {
		h.transients++
		if h.transients < f.transientLimit {
			return
		}
	}
	if h.down {
		return
	}
	h.down, h.since, h.lastError = true, time.Now(), de.Code
	h.backoff = f.probeBase
	h.nextProbe = time.Now().Add(h.backoff)
	f.setGauge(i)
}

// prober dials each down server when its probe is due: a connection
// that completes the greeting, EHLO, TLS and AUTH brings it back; a
// failure doubles the delay.
func (f *Failover) prober() {
	every := f.probeBase / 4
	if every < 10*time.Millisecond {
		every = 10 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-f.done:
			return
		case <-t.C:
		}
		now := time.Now()
		var due []int
		f.mu.Lock()
		for i, h := range f.health {
			if h.down && !now.Before(h.nextProbe) {
				due = append(due, i)
			}
		}
		f.mu.Unlock()
		for _, i := range due {
			s := f.senders[i]
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
			c, err := s.dial(ctx, "")
			cancel()
			if err == nil {
				// a working connection: keep it for the next message
				s.putIdle(c)
			}
			f.mu.Lock()
			h := &f.health[i]
			if h.down {
				if err == nil {
					f.markUp(i)
				} else {
					h.backoff = min(2*h.backoff, f.probeMax)
					h.nextProbe = time.Now().Add(h.backoff)
				}
			}
			f.mu.Unlock()
		}
	}
}

// ServerState is one server of a failover list: its sender, whether it
// is down (and probed), since when, and the code of the error that
// marked it down.
type ServerState struct {
	Sender    *Sender
	Down      bool
	Since     time.Time
	LastError string
}

// Status lists the servers in priority order with their state.
func (f *Failover) Status() []ServerState {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]ServerState, len(f.senders))
	for i, s := range f.senders {
		h := f.health[i]
		out[i] = ServerState{Sender: s, Down: h.down, Since: h.since, LastError: h.lastError}
	}
	return out
}

// ShareRate shares each server's configured rate with the cluster.
func (f *Failover) ShareRate(st certmagic.Storage, instance string, demand func() int, logger *zap.Logger) {
	for _, s := range f.senders {
		s.ShareRate(st, instance, demand, logger)
	}
}
