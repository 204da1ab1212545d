package smtptest

import (
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// Throttle makes a server refuse mail above a send rate, as SES, Microsoft
// 365 or a relay with a rate limit would: a token bucket shared by all
// connections; a message that finds it empty gets Reply.
type Throttle struct {
	// Rate is the messages per second the server takes.
	Rate float64
	// Burst is the bucket size; default 1.
	Burst int
	// Reply is what a message over the rate gets; default 454 4.7.0
	// "Throttling failure: Maximum sending rate exceeded".
	Reply *smtp.SMTPError
	// AtData checks the rate at the final dot instead of at MAIL FROM.
	AtData bool
}

// DefaultThrottleReply is Amazon SES's reply over the sending rate (with
// the enhanced code SES leaves out, as relays in front of it add).
var DefaultThrottleReply = &smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Throttling failure: Maximum sending rate exceeded"}

// Second is what a throttled server counted in one wall-clock second.
type Second struct {
	// Start is the second's start.
	Start time.Time
	// Accepted passed the bucket; Throttled got the reply.
	Accepted, Throttled int
}

// throttler is a server's bucket and counters.
type throttler struct {
	cfg    Throttle
	mu     sync.Mutex
	tokens float64
	last   time.Time
	secs   []Second
}

func newThrottler(t *Throttle) *throttler {
	cfg := *t
	if cfg.Burst <= 0 {
		cfg.Burst = 1
	}
	if cfg.Reply == nil {
		cfg.Reply = DefaultThrottleReply
	}
	return &throttler{cfg: cfg, tokens: float64(cfg.Burst)}
}

// take returns nil when a message may pass, else the reply.
func (th *throttler) take(now time.Time) error {
	th.mu.Lock()
	defer th.mu.Unlock()
	if !th.last.IsZero() {
		th.tokens += now.Sub(th.last).Seconds() * th.cfg.Rate
		if b := float64(th.cfg.Burst); th.tokens > b {
			th.tokens = b
		}
	}
	th.last = now
	sec := now.Truncate(time.Second)
	if n := len(th.secs); n == 0 || !th.secs[n-1].Start.Equal(sec) {
		th.secs = append(th.secs, Second{Start: sec})
	}
	cur := &th.secs[len(th.secs)-1]
	if th.tokens >= 1 {
		th.tokens--
		cur.Accepted++
		return nil
	}
	cur.Throttled++
	r := *th.cfg.Reply
	return &r
}

// check applies the server's throttle, if any, at the given point.
func (s *Server) checkThrottle(atData bool) error {
	if s.throttle == nil || s.throttle.cfg.AtData != atData {
		return nil
	}
	return s.throttle.take(time.Now())
}

// ThrottleSeconds returns what the throttle counted per second, oldest
// first (seconds without a message are left out); nil without a Throttle.
func (s *Server) ThrottleSeconds() []Second {
	if s.throttle == nil {
		return nil
	}
	s.throttle.mu.Lock()
	defer s.throttle.mu.Unlock()
	return append([]Second(nil), s.throttle.secs...)
}

// ThrottleTotals returns how many messages passed and were throttled.
func (s *Server) ThrottleTotals() (accepted, throttled int) {
	for _, sec := range s.ThrottleSeconds() {
		accepted += sec.Accepted
		throttled += sec.Throttled
	}
	return accepted, throttled
}

// MaxAcceptedPerSecond returns the most messages passed in one
// wall-clock second.
func (s *Server) MaxAcceptedPerSecond() int {
	best := 0
	for _, sec := range s.ThrottleSeconds() {
		best = max(best, sec.Accepted)
	}
	return best
}
