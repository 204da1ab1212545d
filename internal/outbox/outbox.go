package outbox

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/heapq"
	"github.com/caddy-authmail/authmail/internal/mailer"
)

// Config is the delivery configuration. The most recently
// provisioned handler sets it.
type Config struct {
	Wait           time.Duration
	RetryBackoff   time.Duration
	MaxBackoff     time.Duration
	MaxAge         time.Duration
	Retention      time.Duration
	ReplayWindow   time.Duration // bodies kept after final, for retries
	IdemTTL        time.Duration
	Lease          time.Duration
	Drain          time.Duration
	MaxQueued      int
	BulkShare      float64 // delivery bulk_share as a fraction; 0: the default
	RetryUncertain bool
	WebhookSecret  string
	WebhookAllow   []string
	LogRecipients  bool

	// AuthReserve is the part of MaxQueued that only the auth lane may
	// use (quota.go); 0: a tenth of MaxQueued.
	AuthReserve int
	// MaxQueuedPerKey bounds the unfinished messages of one key; 0: no
	// bound.
	MaxQueuedPerKey int

	// WebhookBody, when set, builds the JSON body of a final message's
	// webhook in place of the engine's own (authmail-relay's payload in
	// compat mode); nil means the engine's.
	WebhookBody func(State) any
}

// Observer is told what the engine does, for the metrics. Its methods
// run on the engine's goroutines and must not block.
type Observer interface {
	// Accepted: a message was stored (its flow and API key id)
	Accepted(flow, keyID string)
	// Attempt: a delivery Attempt ended (derr nil: delivered) after took
	Attempt(derr *mailer.Error, took time.Duration)
	// Final: a message reached a Final state
	Final(flow, status string)
	// Webhook: a Webhook post ended with result
	Webhook(result string)
}

type noObserver struct{}

func (noObserver) Accepted(string, string)              {}
func (noObserver) Attempt(*mailer.Error, time.Duration) {}
func (noObserver) Final(string, string)                 {}
func (noObserver) Webhook(string)                       {}

// ErrQueueFull is returned by accept when max_queued messages wait.
var ErrQueueFull = errors.New("the outbox is full")

// Engine is the durable outbox: it writes accepted messages to storage,
// delivers them with retries, and records every state change.
type Engine struct {
	poolKey string
	st      store
	// iid is the instance id the engine runs as: Caddy's, unless another
	// live process runs as that one (claimIdentity sets it at start,
	// before any loop reads it; instance() reads it from elsewhere)
	iid   string
	nonce string      // random per engine: this process's dot record, heartbeats
	proc  hostProcess // this process, for heartbeats

	cfg    atomic.Pointer[Config]
	logger atomic.Pointer[zap.Logger]

	mu          sync.Mutex
	entries     map[string]*Entry
	batches     map[string]*batch
	ready       readyQueue                        // queued messages by lane and next attempt time
	hooks       heapq.Heap[*Entry, byHookAttempt] // pending webhooks by next attempt time
	hookSlots   hookSlots                         // webhooks being posted, by host
	parked      map[string]*parkedBatch
	parkHeap    heapq.Heap[*parkedBatch, byWake] // parked batches by wake time
	nonFinal    int                              // messages not in a final state
	reserved    int                              // messages being written
	unfinished  map[string]int                   // nonFinal and reserved by tenantKey (quota.go)
	regs        []*Registration                  // provisioned handlers, oldest first
	dirty       map[*batch][]func(error)
	urgent      map[*batch]struct{} // dirty batches with a waiter
	dirtySince  time.Time           // when the oldest unwritten change was made
	closing     bool
	workers     int // running delivery workers
	wantWorkers int
	adopted     bool                // another instance took over our work
	identified  bool                // iid is final (claimIdentity ran)
	suspects    map[string]*suspect // instances' heartbeats as last read (watch)
	recovered   bool                // recoverOwn completed since the start

	// clk is the engine's clock; gate says whether, and until when, this
	// instance owns its work (lease.go); epoch is the fencing epoch its
	// writes are made under (fence.go), set by reestablish
	clk   clock
	gate  *leaseGate
	epoch uint64

	wakeCh   chan struct{} // closed and replaced to wake every waiter
	flushCh  chan struct{} // wakes the state writer
	acceptCh chan *acceptReq
	stopCh   chan struct{}
	doneCh   chan struct{} // closed when the background loops ended

	startOnce sync.Once
	started   atomic.Bool
	loops     sync.WaitGroup // background loops
	attempts  sync.WaitGroup // deliveries and webhooks in flight
	segCache  segmentCache
	bodyBytes atomic.Int64 // bytes of bodies cached in entries
	dots      dotMarks     // attempts whose final dot may be in flight

	janitorTasks []func(context.Context) // OnJanitor's; set before Start

	tun Tunables
	obs Observer
}

// Tunables are timing settings that are not part of the public config.
// Each engine copies the package defaults when it is created, so tests
// can shorten them (Engine.Tunables, before Start) without racing engines
// of other tests.
type Tunables struct {
	JanitorEvery, OrphanAge, ForgetAge                time.Duration
	HookTimeout, HookBackoff, HookMaxWait, HookMaxAge time.Duration
	ParkEvery, ParkAfter, UnparkLead, UnparkRetry     time.Duration
	ReadyHigh                                         int
}

func currentTunables() Tunables {
	return Tunables{
		JanitorEvery: janitorInterval, OrphanAge: orphanAge, ForgetAge: instanceForgetAge,
		HookTimeout: webhookTimeout, HookBackoff: webhookBackoff, HookMaxWait: webhookMaxWait, HookMaxAge: webhookMaxAge,
		ParkEvery: parkInterval, ParkAfter: parkAfter, UnparkLead: unparkLead, UnparkRetry: unparkRetry, ReadyHigh: readyHigh,
	}
}

// Entry is a message the engine owns.
type Entry struct {
	st      State
	b       *batch
	idx     int
	from    string   // envelope, kept with a cached body
	to      []string // envelope
	data    []byte   // cached body; nil means load from storage
	heapIdx int      // index in its tenant's queue of engine.ready, -1 when not queued
	lane    lane     // the lane it is queued in (lanes.go)
	hookIdx int      // index in engine.hooks, -1 when none pending
	claimed bool
	// attempting is set once a worker started the claimed message's
	// attempt; a claim without it can still be given back (at a stop)
	attempting bool
	// urgent is set while a request waits for the first attempt: its
	// outcome is written at once instead of with the next batch of changes.
	urgent bool
	// first is closed once the first attempt's outcome is durable (or the
	// message reached a final state some other way).
	first     chan struct{}
	firstDone bool

	// tq is its tenant's queue in its lane while it is queued there, and
	// while counted: handed out by the ready queue and counted in flight
	// for its tenant's turns until ready.settle (lanes.go)
	tq      *tenantQueue
	counted bool
	turn    uint64 // the lane's turn it was handed out at
}

type batch struct {
	id         string
	entries    []*Entry
	open       int // entries that are not final or have a webhook pending
	writing    int // state writes in flight (a failed one until it is redone)
	retired    bool
	registered time.Time // when this engine took the batch on
	// lost is set when another instance adopted the batch while this
	// one's lease lapsed: nothing of it is written or attempted any more
	lost bool
}

// SenderProfile names what a message is sent as and through: the From
// address, and a hash of the route (SMTP host, port and user, or the
// capture directory; never the password). Two handlers with the same
// From and different servers keep their own transports, and a reload
// that only changes credentials keeps the profile of queued messages.
func SenderProfile(from, route string) string {
	sum := sha256.Sum256([]byte(route))
	return strings.ToLower(from) + "#" + hex.EncodeToString(sum[:6])
}

// profileFrom returns a profile's From address. The route hash follows
// the last "#" (a local part may hold one too); a profile without a
// route (written by an older version) is the address alone.
func profileFrom(profile string) string {
	if i := strings.LastIndexByte(profile, '#'); i >= 0 && !strings.Contains(profile[i:], "@") {
		return profile[:i]
	}
	return profile
}

// New allocates an engine. It does no I/O; start does. obs, when
// not nil, is told what it does.
func New(key string, s certmagic.Storage, iid string, obs Observer) *Engine {
	e := &Engine{
		poolKey:  key,
		st:       store{s: s},
		iid:      iid,
		nonce:    randomHex(8),
		proc:     thisProcess(),
		entries:  map[string]*Entry{},
		batches:  map[string]*batch{},
		parked:   map[string]*parkedBatch{},
		dirty:    map[*batch][]func(error){},
		urgent:   map[*batch]struct{}{},
		wakeCh:   make(chan struct{}),
		flushCh:  make(chan struct{}, 1),
		acceptCh: make(chan *acceptReq, 1024),
		stopCh:   make(chan struct{}),
		doneCh:   make(chan struct{}),
	}
	e.unfinished = map[string]int{}
	e.segCache.max = 8
	e.dots.marks, e.dots.accepted, e.dots.refused = map[string]int{}, map[string]int{}, map[string]int{}
	e.tun = currentTunables()
	e.clk = realClock{}
	e.gate = newLeaseGate(e.clk)
	e.logger.Store(zap.NewNop())
	e.obs = obs
	if obs == nil {
		e.obs = noObserver{}
	}
	return e
}

func (e *Engine) Config() *Config  { return e.cfg.Load() }
func (e *Engine) log() *zap.Logger { return e.logger.Load() }

// Logger returns the logger of the most recently configured handler.
func (e *Engine) Logger() *zap.Logger { return e.logger.Load() }

// Registration is one provisioned handler's hold on the engine: its
// delivery settings, logger, and transport for its sender profile.
type Registration struct {
	cfg     *Config
	logger  *zap.Logger
	profile string
	t       mailer.Transport
	conns   int
}

// Configure registers a handler's delivery settings and its transport for
// the handler's sender profile. The most recent registration's settings
// apply, and the most recent transport of each profile.
func (e *Engine) Configure(cfg *Config, logger *zap.Logger, profile string, t mailer.Transport, conns int) *Registration {
	e.mu.Lock()
	defer e.mu.Unlock()
	r := &Registration{cfg: cfg, logger: logger, profile: profile, t: t, conns: conns}
	e.regs = append(e.regs, r)
	e.applyRegsLocked()
	if e.started.Load() && e.identified {
		e.shareRatesLocked()
	}
	return r
}

// shareRatesLocked lets the cluster share the configured rates of the
// registered transports' SMTP servers, under the instance id the engine
// runs as. The demand that weighs this instance's share is its queued
// messages.
func (e *Engine) shareRatesLocked() {
	demand := func() int {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.ready.Len()
	}
	for _, r := range e.regs {
		if rs, ok := r.t.(mailer.RateSharer); ok {
			rs.ShareRate(e.st.s, e.iid, demand, e.log())
		}
	}
}

// Release drops a handler's registration. If it was the most recent one
// (a reload that Caddy rejected after this handler was provisioned, so
// the old config keeps running), the settings and transports of the
// registrations that remain apply again.
func (e *Engine) Release(r *Registration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if i := slices.Index(e.regs, r); i >= 0 {
		e.regs = slices.Delete(e.regs, i, i+1)
		e.applyRegsLocked()
	}
}

// applyRegsLocked applies the newest registration's settings (and the
// newest logger) and sizes the workers for the registrations. With none left (the engine is being
// destroyed) the last settings stay.
func (e *Engine) applyRegsLocked() {
	if n := len(e.regs); n > 0 {
		e.cfg.Store(e.regs[n-1].cfg)
	}
	for i := len(e.regs) - 1; i >= 0; i-- {
		if e.regs[i].logger != nil {
			e.logger.Store(e.regs[i].logger)
			break
		}
	}
	e.updateWorkersLocked()
}

// regForLocked returns the registration whose transport and webhook
// settings serve a message's sender profile: the newest with that From
// address and route; else the newest with that From address (the route
// changed, or the message was queued by a version whose profile was the
// address alone); else the newest registration; nil when there is none.
func (e *Engine) regForLocked(profile string) *Registration {
	from := profileFrom(profile)
	var sameFrom *Registration
	for i := len(e.regs) - 1; i >= 0; i-- {
		r := e.regs[i]
		if r.profile == profile {
			return r
		}
		if sameFrom == nil && profileFrom(r.profile) == from {
			sameFrom = r
		}
	}
	if sameFrom != nil {
		return sameFrom
	}
	if n := len(e.regs); n > 0 {
		return e.regs[n-1]
	}
	return nil
}

// transportFor returns the transport for a message's profile (see
// regForLocked), or nil when no handler is registered.
func (e *Engine) transportFor(profile string) mailer.Transport {
	e.mu.Lock()
	defer e.mu.Unlock()
	if r := e.regForLocked(profile); r != nil {
		return r.t
	}
	return nil
}

// updateWorkersLocked runs one worker per SMTP connection of the sender
// profiles (the newest registration's count for each), 2 to 64 in all.
func (e *Engine) updateWorkersLocked() {
	conns := map[string]int{}
	for _, r := range e.regs {
		conns[r.profile] = r.conns
	}
	n := 0
	for _, c := range conns {
		n += c
	}
	n = min(max(n, 2), 64)
	e.wantWorkers = n
	if e.started.Load() && !e.closing {
		for e.workers < e.wantWorkers {
			e.workers++
			go e.worker()
		}
	}
}

// Start recovers the instance's work from storage and starts the
// background loops. It runs once; the authmail app calls it when a config
// starts (never for `caddy validate`).
func (e *Engine) Start() {
	e.startOnce.Do(func() {
		e.mu.Lock()
		closing := e.closing
		e.mu.Unlock()
		if closing {
			return // destroyed before it ever ran: start nothing
		}
		e.started.Store(true)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		e.claimIdentity(ctx)
		e.mu.Lock()
		e.identified = true
		e.shareRatesLocked()
		e.mu.Unlock()
		if err := e.startDots(ctx); err != nil {
			e.log().Error("writing the outbox's dot record failed; a crash before the first delivery records its claimed messages as unknown", zap.Error(err))
		}
		if n, err := e.recoverOwn(ctx); err != nil {
			e.log().Error("recovering the outbox failed", zap.Error(err))
		} else if n > 0 {
			e.log().Info("recovered queued messages from storage", zap.Int("messages", n), zap.String("instance", e.iid))
		}
		cancel()
		e.loops.Add(6)
		go e.parkLoop()
		go e.appender()
		go e.stateWriter()
		go e.heartbeatLoop()
		go e.adoptionLoop()
		go e.janitorLoop()
		e.mu.Lock()
		e.updateWorkersLocked()
		for range 2 {
			go e.webhookWorker()
		}
		e.mu.Unlock()
		e.notify()
	})
}

// Destruct stops the engine once no config uses it any more (the
// handler's usage pool calls it). New work stops at once; deliveries in
// flight get drain_timeout to finish; whatever is not sent stays in
// storage for the next start. When Caddy is only reloading, this happens
// in the background.
func (e *Engine) Destruct() error {
	if caddy.Exiting() {
		e.Shutdown()
	} else {
		go e.Shutdown()
	}
	return nil
}

// Shutdown stops the engine and returns once new work is refused; the
// background loops end after drain_timeout at most (Done).
func (e *Engine) Shutdown() {
	e.mu.Lock()
	if e.closing {
		e.mu.Unlock()
		return
	}
	e.closing = true
	released := e.releaseAllLocked()
	e.mu.Unlock()
	for range released {
		e.attempts.Done()
	}
	if !e.started.Load() {
		return
	}
	e.notify()
	drain := 10 * time.Second
	if c := e.Config(); c != nil && c.Drain > 0 {
		drain = c.Drain
	}
	done := make(chan struct{})
	go func() { e.attempts.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(drain):
		e.log().Warn("outbox drain timed out; unfinished deliveries stay in storage", zap.Duration("drain_timeout", drain))
	}
	// stop the loops; the state writer flushes what the finished attempts
	// recorded before it exits
	close(e.stopCh)
	e.loops.Wait()
	e.dots.stop()
	close(e.doneCh)
}

// wait sleeps for d and reports whether the engine still runs: the
// background loops do a round of work after each wait.
func (e *Engine) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-e.stopCh:
		return false
	case <-t.C:
		return true
	}
}

// notify wakes every goroutine waiting for work.
func (e *Engine) notify() {
	e.mu.Lock()
	close(e.wakeCh)
	e.wakeCh = make(chan struct{})
	e.mu.Unlock()
}

// --- accepting ---------------------------------------------------------

// pastExpiry reports whether a message that carries a code or a link is
// past its expiry.
func (en *Entry) pastExpiry(now time.Time) bool {
	return !en.st.ExpiresAt.IsZero() && !now.Before(en.st.ExpiresAt)
}

// NewMessage is a rendered message to accept.
type NewMessage struct {
	KeyID, Flow, Profile, MessageID string
	Env                             *mailer.Envelope
	Webhook                         WebhookState
	Rcpts                           []string // recipients as logged
	Tenant                          string   // the key's tenantOf
	// Expiry, for a message that carries a code or a link, is how long
	// it may wait to be sent (expires_in_minutes); 0 for no limit
	Expiry   time.Duration
	Priority string // "bulk" for the bulk lane
}

type acceptReq struct {
	msgs []*NewMessage
	// batch, when set, makes the request its own batch with this id (used
	// for idempotent requests, whose id is reserved beforehand).
	batch   string
	waiting bool
	entries []*Entry
	done    chan error
	// deadline is when the caller stops waiting (acceptTimeout); a
	// request still queued then is not written
	deadline time.Time
}

// Accept writes msgs durably and queues them for immediate delivery. It
// returns once the messages are in storage. With waiting, the caller
// waits for the first attempt (entry.first), so its outcome is written
// without delay.
func (e *Engine) Accept(msgs []*NewMessage, fixedBatch string, waiting bool) ([]*Entry, error) {
	// requests only arrive once a config runs, so starting here is safe; it
	// covers a request that races the authmail app's Start
	e.Start()
	cfg := e.Config()
	e.mu.Lock()
	if e.closing {
		e.mu.Unlock()
		return nil, ErrShuttingDown
	}
	if err := e.admitLocked(cfg, msgs); err != nil {
		e.mu.Unlock()
		return nil, err
	}
	e.reserveLocked(msgs, 1)
	e.mu.Unlock()
	req := &acceptReq{msgs: msgs, batch: fixedBatch, waiting: waiting, done: make(chan error, 1), deadline: time.Now().Add(acceptTimeout)}
	if !e.gate.valid() {
		// cut off from the storage (or not yet re-established after
		// that): nothing is written that this instance could not deliver
		e.failAccept([]*acceptReq{req}, fmt.Errorf("writing to storage: %w", errLeaseLapsed))
		return nil, <-req.done
	}
	// a shutdown can begin between the closing check and here; once the
	// appender has exited (doneCh) it has answered every request it took,
	// and one it never took is failed here instead of waiting forever
	// the appender writes a request by its deadline or not at all (the
	// write is refused past it); this timer answers even when the storage
	// ignores the deadline
	timeout := time.NewTimer(time.Until(req.deadline) + 250*time.Millisecond)
	defer timeout.Stop()
	select {
	case e.acceptCh <- req:
	case <-e.doneCh:
	case <-timeout.C:
		e.failAccept([]*acceptReq{req}, errAcceptTimeout)
		return nil, <-req.done
	}
	select {
	case err := <-req.done:
		return req.entries, err
	case <-e.doneCh:
	case <-timeout.C:
		select {
		case err := <-req.done:
			return req.entries, err
		default:
			return nil, errAcceptTimeout
		}
	}
	select {
	case err := <-req.done: // written or failed just before the end
		return req.entries, err
	default:
		e.failAccept([]*acceptReq{req}, ErrShuttingDown)
		return nil, ErrShuttingDown
	}
}

var ErrShuttingDown = errors.New("the outbox is shutting down")

var errAcceptTimeout = errors.New("the storage did not acknowledge the messages in time; nothing was accepted")

// appender writes accepted messages in batches: whatever arrived while
// the previous batch was being written goes into the next one, so the
// storage's per-write cost is shared.
func (e *Engine) appender() {
	defer e.loops.Done()
	for {
		var first *acceptReq
		select {
		case first = <-e.acceptCh:
		case <-e.stopCh:
			// fail whatever is still waiting
			for {
				select {
				case r := <-e.acceptCh:
					e.failAccept([]*acceptReq{r}, ErrShuttingDown)
				default:
					return
				}
			}
		}
		reqs := []*acceptReq{first}
		n := len(first.msgs)
		if first.batch == "" {
		collect:
			for n < maxBatch {
				select {
				case r := <-e.acceptCh:
					if r.batch != "" || n+len(r.msgs) > maxBatch {
						// write it on its own right after this batch
						e.writeBatch(reqs)
						reqs, n = []*acceptReq{r}, len(r.msgs)
						if r.batch != "" {
							break collect
						}
						continue
					}
					reqs = append(reqs, r)
					n += len(r.msgs)
				default:
					break collect
				}
			}
		}
		e.writeBatch(reqs)
	}
}

func (e *Engine) failAccept(reqs []*acceptReq, err error) {
	e.mu.Lock()
	for _, r := range reqs {
		e.reserveLocked(r.msgs, -1)
	}
	e.mu.Unlock()
	for _, r := range reqs {
		r.done <- err
	}
}

// writeBatch stores one batch (segment, then ownership marker) and hands
// its messages to the workers.
func (e *Engine) writeBatch(reqs []*acceptReq) {
	now := time.Now()
	bid := reqs[0].batch
	if bid == "" {
		bid = NewID(now)
	}
	seg := &Segment{Batch: bid, Owner: e.iid, Created: now}
	b := &batch{id: bid}
	for _, r := range reqs {
		r.entries = make([]*Entry, 0, len(r.msgs))
		for _, m := range r.msgs {
			idx := len(seg.Messages)
			id := MessageID(bid, idx)
			m.Env.ID = id
			seg.Messages = append(seg.Messages, StoredMessage{ID: id, From: m.Env.From, To: m.Env.To, Data: m.Env.Data})
			st := State{
				ID: id, KeyID: m.KeyID, Tenant: m.Tenant, Flow: m.Flow, Profile: m.Profile, MessageID: m.MessageID,
				Recipients: len(m.Env.To), Rcpts: m.Rcpts,
				Status: Queued, Created: now, Updated: now, NextAt: now, Webhook: m.Webhook,
				Priority: m.Priority,
			}
			if m.Expiry > 0 {
				st.ExpiresAt = now.Add(m.Expiry)
			}
			seg.States = append(seg.States, st)
			en := &Entry{st: st, b: b, idx: idx, from: m.Env.From, to: m.Env.To, heapIdx: -1, hookIdx: -1, urgent: r.waiting}
			if r.waiting {
				en.first = make(chan struct{})
			} else {
				en.first, en.firstDone = closedChan, true
			}
			if e.bodyBytes.Load() < maxCachedBodyBytes {
				en.data = m.Env.Data
				if cap(en.data)-len(en.data) > len(en.data)/8 {
					en.data = bytes.Clone(en.data) // drop the rendering buffer's slack
				}
				e.bodyBytes.Add(int64(len(en.data)))
			}
			b.entries = append(b.entries, en)
			r.entries = append(r.entries, en)
		}
	}
	// the segment and the ownership marker are written together, fenced
	// (one round trip on Redis), while this instance owns its work, and
	// by the deadline of the earliest request (acceptTimeout): a write
	// that reaches Redis later is refused, so that a request answered 503
	// leaves nothing behind. The request is answered only when both are
	// durable (a marker without a segment is ignored)
	deadline := reqs[0].deadline
	for _, r := range reqs[1:] {
		if r.deadline.Before(deadline) {
			deadline = r.deadline
		}
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	err := e.writeSegment(ctx, seg, now, deadline)
	if err != nil {
		// the request is told that nothing was accepted: take back
		// whatever half of the pair was written (the segment holds codes
		// and links; the janitor would otherwise keep it for an hour)
		dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = e.st.s.Delete(dctx, OwnKey(e.iid, bid))
		_ = e.st.s.Delete(dctx, KeySeg+bid)
		dcancel()
		e.log().Error("writing accepted messages to storage failed", zap.Error(err), zap.Int("messages", len(b.entries)))
		for _, en := range b.entries {
			if en.data != nil {
				e.bodyBytes.Add(-int64(len(en.data)))
			}
		}
		e.failAccept(reqs, fmt.Errorf("writing to storage: %w", err))
		return
	}
	e.mu.Lock()
	b.registered = time.Now()
	e.batches[bid] = b
	for _, en := range b.entries {
		e.entries[en.st.ID] = en
		e.ready.push(en)
	}
	b.open = len(b.entries)
	// from being written to unfinished: the tenants' counts stay
	e.nonFinal += len(b.entries)
	for _, r := range reqs {
		e.reserved -= len(r.msgs)
	}
	e.mu.Unlock()
	for _, en := range b.entries {
		e.obs.Accepted(en.st.Flow, en.st.KeyID)
	}
	e.notify()
	for _, r := range reqs {
		r.done <- nil
	}
}

// writeSegment stores an accepted batch's segment and ownership marker
// in one fenced group, made under this instance's current epoch and
// ownership, and refused past deadline (less the lease margin, for the
// clocks).
func (e *Engine) writeSegment(ctx context.Context, seg *Segment, now, deadline time.Time) error {
	dl, err := e.fenceDeadline(deadline.Round(0).Add(-leaseMargin(e.leaseDuration())))
	if err != nil {
		return err
	}
	val, err := json.Marshal(seg)
	if err != nil {
		return err
	}
	return fencerFor(e.st.s).apply(ctx, []fenceCond{{e.iid, e.ownEpoch()}}, dl, []fenceOp{
		{key: KeySeg + seg.Batch, value: val},
		{key: OwnKey(e.iid, seg.Batch), value: []byte(now.UTC().Format(time.RFC3339Nano))},
	})
}

// acceptTimeout bounds an Accept: it answers within this long, with the
// messages durable or with an error (the handler's 503
// outbox_unavailable), however the storage misbehaves.
var acceptTimeout = 10 * time.Second

// closedChan is the first channel of entries nobody waits for.
var closedChan = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// maxCachedBodyBytes bounds the message bodies kept in memory between
// acceptance and the first attempt; beyond it bodies are read back from
// storage, so memory stays bounded however large the backlog.
const maxCachedBodyBytes = 16 << 20

// --- delivering --------------------------------------------------------

// maxClaimAhead is the most messages a worker takes from the ready queue
// at once, in due order; under light load a worker claims one message at
// a time. Claims live in memory only (see claimGroup), so claiming ahead
// costs nothing after a crash: the messages not yet attempted are
// attempted again.
const maxClaimAhead = 16

// stateLinger is how long a state change nobody waits for (the outcome
// of an asynchronous message, a webhook result) may wait to be written
// together with later changes. A crash in that window records a sent
// message as "unknown", never sends it twice.
const stateLinger = 50 * time.Millisecond

// worker delivers queued messages. It claims a group of due messages,
// then attempts them one by one. Workers are not waited for at shutdown
// beyond drain_timeout: an attempt cut short is recorded unknown by the
// next start only if its dot was marked (dots.go), else attempted
// again; claimed messages not yet attempted are given back first.
func (e *Engine) worker() {
	for {
		// no claim while this instance does not own its work
		for !e.gate.valid() {
			if !e.wait(50 * time.Millisecond) {
				return
			}
		}
		group := e.claimGroup()
		if group == nil {
			return
		}
		for i, en := range group {
			if !e.beginAttempt(en, i == 0) {
				e.releaseClaims(group[i:])
				break
			}
			e.deliver(en)
		}
		e.mu.Lock()
		excess := e.workers > e.wantWorkers
		if excess {
			e.workers--
		}
		e.mu.Unlock()
		if excess {
			return
		}
	}
}

func (e *Engine) stopping() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.closing || e.adopted
}

// claimGroup blocks until messages are due, claims up to maxClaimAhead
// of them (fewer under light load) and returns them, or nil when the
// engine stops.
//
// A claim is not written to storage before the attempt: what a crash
// must know is whether a message's final dot may have gone out, and the
// dot mark (dots.go) records exactly that, right before the dot.
// A claim that a crash cuts short leaves the message "queued" in storage
// (or "sending", when another change of its batch was written meanwhile),
// and without a mark for that attempt it is simply attempted again.
func (e *Engine) claimGroup() []*Entry {
	for {
		group := e.nextReady()
		if group == nil {
			return nil
		}
		if err := e.holdClaims(group); err == nil {
			return group
		}
		return nil
	}
}

// holdClaims keeps the claims of a group that nextReady took, unless a
// stop began in between: then it gives them back (some may be given back
// already by the stop) and reports errShuttingDown.
func (e *Engine) holdClaims(group []*Entry) error {
	e.mu.Lock()
	closing := e.closing
	e.mu.Unlock()
	if closing {
		e.releaseClaims(group)
		return ErrShuttingDown
	}
	return nil
}

// beginAttempt marks a claimed message's attempt as started, unless the
// engine stops (or lost its work to another instance), a stop already
// gave the claim back, or a message of a higher lane is due, or another
// key's turn came (readyQueue.yields): a worker that claimed bulk mail,
// or one key's codes, ahead gives them back for a code that arrived
// meanwhile, so the code waits for at most the attempt in progress.
func (e *Engine) beginAttempt(en *Entry, first bool) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closing || e.adopted || !en.claimed || en.b.lost {
		return false
	}
	if !first && e.ready.yields(en, time.Now()) {
		return false
	}
	en.attempting = true
	return true
}

// releaseClaims gives claimed messages that were not attempted back to
// the queue, durably, so that a stop does not turn them into "unknown".
// Messages whose claim was already given back are skipped.
func (e *Engine) releaseClaims(group []*Entry) {
	e.mu.Lock()
	n := 0
	for _, en := range group {
		if e.releaseLocked(en) {
			n++
		}
	}
	e.mu.Unlock()
	for range n {
		e.attempts.Done()
	}
}

// releaseLocked gives one claim back if its attempt has not started; the
// caller then calls attempts.Done for it.
func (e *Engine) releaseLocked(en *Entry) bool {
	if !e.unclaimOpenLocked(en, en.st.NextAt) { // due as before
		return false
	}
	e.markDirtyLocked(en.b, nil, true)
	return true
}

// releaseAllLocked gives back every claim whose attempt has not started
// and returns how many, for attempts.Done. A stop calls it at once, while
// the state writer still runs: a worker stuck in a slow attempt would
// otherwise hold its claimed group past the drain, and the next start
// would record those messages, never attempted, as unknown.
func (e *Engine) releaseAllLocked() int {
	n := 0
	for _, en := range e.entries {
		if e.releaseLocked(en) {
			n++
		}
	}
	return n
}

// nextReady blocks until messages are due and returns up to k of them,
// marked claimed, or nil when the engine stops. k grows with the
// backlog per worker. The messages are taken by lane (lanes.go);
// a message past its expiry is not claimed but made expired.
func (e *Engine) nextReady() []*Entry {
	for {
		e.mu.Lock()
		if e.closing || e.adopted {
			e.mu.Unlock()
			return nil
		}
		var wait time.Duration = -1
		if at, ok := e.ready.earliest(); ok {
			now := time.Now()
			if d := at.Sub(now); d > 0 {
				wait = d
			} else {
				e.ready.share = e.Config().BulkShare
				k := min(maxClaimAhead, max(1, e.ready.Len()/max(1, e.workers)))
				group := make([]*Entry, 0, k)
				var expired []*Entry
				for len(group) < k {
					en := e.ready.popDue(now)
					if en == nil {
						break
					}
					if en.pastExpiry(now) {
						// held like a claim, so that nothing else takes it
						// until its final state is recorded
						en.claimed, en.attempting = true, true
						expired = append(expired, en)
						continue
					}
					// claimed and sending change together, under the lock,
					// so that a claim given back (releaseLocked) always
					// undoes exactly one counted attempt
					en.claimed = true
					en.st.Status = Sending
					en.st.Attempts++
					en.st.Updated = now
					group = append(group, en)
				}
				e.attempts.Add(len(group))
				e.mu.Unlock()
				for _, en := range expired {
					e.recordOutcome(en, mailer.Result{}, mailer.ErrExpired(), 0)
				}
				if len(group) == 0 {
					continue
				}
				return group
			}
		}
		wake := e.wakeCh
		e.mu.Unlock()
		var timer <-chan time.Time
		if wait >= 0 {
			t := time.NewTimer(wait)
			timer = t.C
			select {
			case <-wake:
			case <-timer:
			case <-e.stopCh:
				t.Stop()
				return nil
			}
			t.Stop()
			continue
		}
		select {
		case <-wake:
		case <-e.stopCh:
			return nil
		}
	}
}

// deliver attempts one claimed message and records the outcome.
func (e *Engine) deliver(en *Entry) {
	defer e.attempts.Done()
	// Self-fencing (lease.go): no SMTP transaction starts unless this
	// instance owns its work now, and the attempt's waits end the moment
	// that stops being true (lctx); the final dot is checked again below.
	lctx, _, lerr := e.gate.check()
	if lerr == nil {
		lerr = e.stillHeld(en, lctx)
	}
	if lerr != nil {
		e.unclaim(en, time.Now())
		return
	}
	e.mu.Lock()
	if en.pastExpiry(time.Now()) {
		// expired while it waited for a worker: not an attempt
		en.st.Attempts--
		e.mu.Unlock()
		e.recordOutcome(en, mailer.Result{}, mailer.ErrExpired(), 0)
		return
	}
	attempt := en.st.Attempts
	e.mu.Unlock()
	env, err := e.envelopeOf(en)
	if env != nil {
		env.Urgent = en.lane == laneAuth
		env.BeforeDot = func() error {
			// the mark is durable, and this instance still owns the
			// message, under the same holding as when the attempt began
			// (not one re-established since, which may have dropped its
			// batch), or the dot does not go
			if err := e.stillHeld(en, lctx); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(lctx, 30*time.Second)
			defer cancel()
			if err := e.markDot(ctx, en.st.ID, attempt); err != nil {
				return err
			}
			return e.stillHeld(en, lctx)
		}
	}
	var d mailer.Result
	var derr *mailer.Error
	var took time.Duration
	if err != nil {
		derr = &mailer.Error{Code: mailer.CodeOutboxUnavailable, Err: err}
	} else if t := e.transportFor(en.st.Profile); t == nil {
		derr = &mailer.Error{Code: mailer.CodeSMTPConnection, Phase: mailer.PhaseConnect, Err: errors.New("no authmail handler is configured to send this message")}
	} else {
		ctx, cancel := context.WithTimeout(lctx, 10*time.Minute)
		start := time.Now()
		d, err = t.Send(ctx, env)
		cancel()
		if err != nil && !errors.As(err, &derr) {
			derr = &mailer.Error{Code: mailer.CodeSMTPConnection, Phase: mailer.PhaseConnect, Err: err}
		}
		took = time.Since(start)
		e.obs.Attempt(derr, took)
	}
	e.recordOutcome(en, d, derr, took)
}

// stillHeld reports whether this instance still owns its work under the
// holding lctx belongs to (lease.go), and the entry's batch was not
// dropped as adopted.
func (e *Engine) stillHeld(en *Entry, lctx context.Context) error {
	c, _, err := e.gate.check()
	if err != nil {
		return err
	}
	if c != lctx {
		return errLeaseLapsed // lapsed and re-established since the attempt began
	}
	e.mu.Lock()
	lost := en.b.lost
	e.mu.Unlock()
	if lost {
		return errBatchAdopted
	}
	return nil
}

// unclaim undoes a claim in memory without sending; the message is due
// again at retry.
func (e *Engine) unclaim(en *Entry, retry time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.unclaimLocked(en, retry)
}

func (e *Engine) unclaimLocked(en *Entry, retry time.Time) {
	en.st.Status = Queued
	en.st.Attempts--
	en.claimed, en.attempting = false, false
	en.st.NextAt = retry
	if !en.b.lost {
		e.ready.push(en)
	}
	e.ready.settle(en) // after the push: the tenant keeps its turn
}

// envelopeOf returns the message's envelope, from memory or storage.
func (e *Engine) envelopeOf(en *Entry) (*mailer.Envelope, error) {
	e.mu.Lock()
	data, from, to := en.data, en.from, en.to
	e.mu.Unlock()
	if data == nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		seg, err := e.segCache.get(ctx, e.st, en.b.id)
		if err != nil {
			return nil, err
		}
		if en.idx >= len(seg.Messages) || seg.Messages[en.idx].ID != en.st.ID {
			return nil, fmt.Errorf("message %s missing from its batch", en.st.ID)
		}
		sm := seg.Messages[en.idx]
		data, from, to = sm.Data, sm.From, sm.To
	}
	return &mailer.Envelope{ID: en.st.ID, MessageID: en.st.MessageID, From: from, To: to, Data: data}, nil
}

// unclaimIfClaimed is unclaim for a claim nobody started an attempt
// for; it reports false when the claim was already given back.
func (e *Engine) unclaimIfClaimed(en *Entry, retry time.Time) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.unclaimOpenLocked(en, retry)
}

// unclaimOpenLocked undoes a claim whose attempt has not started; it
// reports false when there is none (given back already, or attempted).
func (e *Engine) unclaimOpenLocked(en *Entry, retry time.Time) bool {
	if !en.claimed || en.attempting {
		return false
	}
	e.unclaimLocked(en, retry)
	return true
}

// recordOutcome turns an attempt's result into the next state.
func (e *Engine) recordOutcome(en *Entry, d mailer.Result, derr *mailer.Error, took time.Duration) {
	cfg := e.Config()
	now := time.Now()
	// the server's answer to the dot travels with the next mark's write
	// until the outcome below is durable (dots.go)
	switch {
	case derr == nil:
		e.answerDot(en.st.ID, en.st.Attempts, true)
	case !derr.Uncertain() && derr.Phase == mailer.PhaseEnd:
		e.answerDot(en.st.ID, en.st.Attempts, false)
	}
	e.mu.Lock()
	en.claimed, en.attempting = false, false
	if en.b.lost {
		// another instance adopted the batch while this attempt ran
		// (this one's lease lapsed): its outcome is that instance's to
		// decide, from the dot marks it read
		e.ready.settle(en)
		e.mu.Unlock()
		e.dropDot(en.st.ID, en.st.Attempts)
		return
	}
	en.st.Updated = now
	if en.data != nil {
		e.bodyBytes.Add(-int64(len(en.data)))
		en.data, en.from, en.to = nil, "", nil // retries read the body back from storage
	}
	final := false
	switch {
	case derr == nil:
		en.st.Status, en.st.SentAt, final = Sent, now, true
		en.st.SMTPResponse, en.st.LastCode, en.st.LastError = d.Response, "", ""
		if d.Status == "captured" {
			en.st.SMTPResponse = "captured"
		}
	case derr.Code == mailer.CodeExpired:
		en.st.Status, final = Expired, true
	case derr.Uncertain() && !cfg.RetryUncertain:
		en.st.Status, final = Unknown, true
	case derr.Permanent():
		en.st.Status, final = Failed, true
	default:
		next := now.Add(backoff(cfg, en.st.Attempts, en.b.id))
		if derr.Code == mailer.CodeSMTPThrottled {
			// the server's pacer says when it takes the next message;
			// retry_backoff would leave a code waiting for minutes
			if derr.Reply == nil {
				// it waited for the rate and talked to no server: not an
				// attempt
				en.st.Attempts--
			}
			next = now
			if derr.RetryAt.After(now) {
				next = derr.RetryAt
			}
		}
		if !en.st.ExpiresAt.IsZero() && next.After(en.st.ExpiresAt) {
			// a code or link that would arrive after its expiry is not
			// sent: the message is made expired when the time comes
			next = en.st.ExpiresAt
		}
		if next.Sub(en.st.Created) > cfg.MaxAge {
			en.st.Status, final = Failed, true
		} else {
			en.st.Status, en.st.NextAt = Queued, next
		}
	}
	if derr != nil {
		en.st.LastCode, en.st.LastError = derr.Code, derr.Error()
		if derr.Reply != nil {
			en.st.SMTPResponse = derr.Reply.String()
		}
	}
	if final {
		en.st.NextAt = time.Time{}
		e.unfinishedLocked(&en.st, -1)
		if en.st.Webhook.URL != "" {
			en.st.Webhook.Status = HookPending
			en.st.Webhook.NextAt = now
		}
	} else {
		e.ready.push(en)
	}
	e.ready.settle(en) // after the push: the tenant keeps its turn
	st := en.st
	e.markDirtyLocked(en.b, func(err error) {
		// the outcome is durable (or could not be made so): tell the
		// request that waits for the first attempt, then schedule the
		// webhook and retire the batch when it is complete. Only a durable
		// outcome retires the attempt's dot mark: until then a crash must
		// still find the attempt in doubt.
		if err == nil {
			e.dropDot(st.ID, st.Attempts)
		}
		e.mu.Lock()
		if !en.firstDone {
			en.firstDone = true
			close(en.first)
		}
		if final && !en.b.lost {
			if en.st.Webhook.Status == HookPending && en.hookIdx < 0 {
				e.hooks.Push(en)
			} else {
				e.closeEntryLocked(en)
			}
		}
		e.mu.Unlock()
		if final {
			e.notify()
		}
	}, en.urgent)
	en.urgent = false
	e.mu.Unlock()
	if final || derr != nil {
		e.logOutcome(st, derr, final, took)
	}
	if final {
		e.obs.Final(st.Flow, st.Status)
	}
}

// backoff is the delay before attempt n+1: retry_backoff doubling per
// attempt, with ±25% jitter, never above max_backoff. The jitter is drawn
// per batch and attempt, not per message: messages accepted together
// that failed together are retried together, with one claim write, and
// their batch can leave memory while it waits (see parking); different
// batches still spread out.
func backoff(cfg *Config, attempts int, batch string) time.Duration {
	d := cfg.RetryBackoff
	for i := 1; i < attempts && d < cfg.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, cfg.MaxBackoff)
	h := fnv.New64a()
	_, _ = h.Write([]byte(batch))
	_, _ = h.Write([]byte{byte(attempts), byte(attempts >> 8)})
	jitter := time.Duration(h.Sum64()%uint64(d/2+1)) - d/4
	d += jitter
	if d > cfg.MaxBackoff {
		// max_backoff is a cap: fold the excess back below it, so that
		// capped retries stay spread over [0.75, 1] × max_backoff
		d = max(2*cfg.MaxBackoff-d, cfg.MaxBackoff*3/4)
	}
	return max(d, time.Millisecond)
}

// logOutcome writes the one line of an attempt's outcome; took is how
// long the attempt's SMTP transaction (or capture) lasted, zero when no
// attempt ran (an outcome found after a crash).
func (e *Engine) logOutcome(st State, derr *mailer.Error, final bool, took time.Duration) {
	fields := []zap.Field{
		zap.String("id", st.ID), zap.String("flow", st.Flow), zap.String("key_id", st.KeyID),
		zap.String("status", st.Status), zap.Int("attempts", st.Attempts),
		zap.Strings("rcpt", st.Rcpts), zap.Int("recipients", st.Recipients),
	}
	if took > 0 {
		fields = append(fields, zap.Duration("duration", took))
	}
	if derr != nil {
		fields = append(fields, zap.String("error_code", derr.Code))
		if derr.Phase != "" {
			fields = append(fields, zap.String("smtp_phase", derr.Phase))
		}
		if derr.Reply != nil {
			fields = append(fields, zap.Int("smtp_code", derr.Reply.Code), zap.String("smtp_enhanced_code", derr.Reply.Enhanced))
		} else if derr.Err != nil {
			fields = append(fields, zap.String("error", mailer.ErrText(derr.Err)))
		}
	}
	switch {
	case !final && derr != nil && derr.Code == mailer.CodeSMTPThrottled && derr.Reply == nil:
		// the server's pacer held the message back: nothing was sent and
		// nothing failed, so it is no warning
		fields = append(fields, zap.Time("next_attempt_at", st.NextAt))
		e.log().Debug("waiting for the SMTP server's sending rate", fields...)
	case !final:
		fields = append(fields, zap.Time("next_attempt_at", st.NextAt))
		e.log().Warn("delivery attempt failed; will retry", fields...)
	case st.Status == Sent && st.SMTPResponse == "captured":
		// capture mode: written to the capture directory, not sent
		fields[3] = zap.String("status", "captured")
		e.log().Info("message captured", fields...)
	case st.Status == Sent:
		e.log().Info("message sent", fields...)
	default:
		e.log().Error("message "+st.Status, fields...)
	}
}

// closeEntryLocked notes that an entry needs nothing more (final, no
// webhook pending) and retires its batch when it was the last one.
func (e *Engine) closeEntryLocked(en *Entry) {
	b := en.b
	b.open--
	if b.open == 0 && !b.retired {
		b.retired = true
		e.markDirtyLocked(b, nil, false)
	}
}

// --- persisting state ----------------------------------------------------

// markDirtyLocked schedules the batch's state for the next write; done,
// if not nil, runs after that write. An urgent change is written at once;
// others may wait up to stateLinger to share a write.
func (e *Engine) markDirtyLocked(b *batch, done func(error), urgent bool) {
	cbs := e.dirty[b]
	if done != nil {
		cbs = append(cbs, done)
	}
	e.dirty[b] = cbs
	if urgent {
		e.urgent[b] = struct{}{}
	} else if e.dirtySince.IsZero() {
		e.dirtySince = time.Now()
	}
	select {
	case e.flushCh <- struct{}{}:
	default:
	}
}

// stateWriter writes dirty batch states. Changes that arrive while a
// write is in progress are coalesced into the next one, and changes
// nobody waits for linger a little to share a write.
func (e *Engine) stateWriter() {
	defer e.loops.Done()
	for {
		select {
		case <-e.flushCh:
		case <-e.stopCh:
			e.flushAll()
			return
		}
		for {
			e.mu.Lock()
			n, urgent, since := len(e.dirty), len(e.urgent) > 0, e.dirtySince
			e.mu.Unlock()
			if n == 0 {
				break
			}
			d := stateLinger - time.Since(since) // > 0: lazy changes may still wait
			if urgent && d > 0 {
				// only what somebody waits for; the rest keeps lingering
				e.flushOnce(true)
				continue
			}
			if !urgent && d > 0 {
				t := time.NewTimer(d)
				select {
				case <-e.flushCh:
					t.Stop()
					continue
				case <-t.C:
				case <-e.stopCh:
					t.Stop()
					e.flushAll()
					return
				}
			}
			e.flushOnce(false)
		}
	}
}

// flushAll writes every dirty state now.
func (e *Engine) flushAll() {
	for e.flushOnce(false) {
	}
}

// maxParallelWrites bounds the state objects written at the same time.
const maxParallelWrites = 4

// flushOnce writes the states that are dirty now (with urgentOnly, those
// with a waiter), in parallel, and reports whether there were any. A
// batch's write carries every change made to it so far, urgent or not.
// A batch whose messages are all final, with no webhook left to send, is
// marked done in the same write and then retired.
func (e *Engine) flushOnce(urgentOnly bool) bool {
	e.mu.Lock()
	if len(e.dirty) == 0 || (urgentOnly && len(e.urgent) == 0) {
		e.mu.Unlock()
		return false
	}
	type job struct {
		b   *batch
		bs  BatchState
		cbs []func(error)
	}
	set := e.dirty
	if urgentOnly {
		set = make(map[*batch][]func(error), len(e.urgent))
		for b := range e.urgent {
			set[b] = e.dirty[b]
		}
	}
	jobs := make([]job, 0, len(set))
	now := time.Now()
	// every write carries the epoch its snapshot was taken under: a
	// snapshot of a batch that reestablish drops after this is refused
	ep := e.epoch
	var lost [][]func(error)
	for b, cbs := range set {
		if b.lost {
			delete(e.dirty, b)
			delete(e.urgent, b)
			lost = append(lost, cbs)
			continue
		}
		bs := BatchState{Batch: b.id, Owner: e.iid, Updated: now, Messages: make([]State, len(b.entries))}
		settled := true
		for i, en := range b.entries {
			bs.Messages[i] = en.st
			if !IsFinal(en.st.Status) || en.st.Webhook.Status == HookPending {
				settled = false
			}
		}
		if settled {
			b.retired = true
		}
		bs.Done = b.retired
		b.writing++
		jobs = append(jobs, job{b, bs, cbs})
	}
	for _, j := range jobs {
		delete(e.dirty, j.b)
		delete(e.urgent, j.b)
	}
	if len(e.dirty) == 0 {
		e.dirtySince = time.Time{}
	}
	e.mu.Unlock()
	for _, cbs := range lost {
		for _, cb := range cbs {
			cb(errBatchAdopted)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sem := make(chan struct{}, maxParallelWrites)
	var wg sync.WaitGroup
	for _, j := range jobs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			// fenced (fence.go): refused once another instance adopted the
			// batch, or this one re-established its ownership since the
			// snapshot; a state that is not this instance's to write any
			// more never overwrites the adopter's decision
			var err error
			if val, merr := json.Marshal(j.bs); merr != nil {
				err = merr
			} else {
				err = e.fencedApply(ctx, []fenceCond{{e.iid, ep}}, []fenceOp{{key: KeySt + j.b.id, value: val}})
			}
			if err != nil {
				e.log().Error("writing message state to storage failed; retrying", zap.String("batch", j.b.id), zap.Error(err))
				time.AfterFunc(time.Second, func() {
					e.mu.Lock()
					j.b.writing--
					if e.batches[j.b.id] == j.b && !j.b.lost {
						e.markDirtyLocked(j.b, nil, false)
					}
					e.mu.Unlock()
				})
			} else {
				e.mu.Lock()
				j.b.writing--
				e.mu.Unlock()
				if j.bs.Done {
					e.retire(ctx, j.b)
				}
			}
			for _, cb := range j.cbs {
				cb(err)
			}
		}()
	}
	wg.Wait()
	return true
}

// errBatchAdopted fails the waiters of a state write that was not made
// because another instance adopted the batch.
var errBatchAdopted = errors.New("another instance took the batch over")

// retire deletes a finished batch's bodies and ownership marker and
// forgets it; its st object stays for the retention period.
func (e *Engine) retire(ctx context.Context, b *batch) {
	// with a replay window the bodies stay for POST /messages/{id}/retry;
	// the janitor deletes them when it passed (replay.go)
	if !e.keepsBodies() {
		if err := e.st.s.Delete(ctx, KeySeg+b.id); err != nil && !IsNotExist(err) {
			e.log().Warn("deleting a delivered batch failed", zap.String("batch", b.id), zap.Error(err))
		}
	}
	if err := e.st.s.Delete(ctx, OwnKey(e.iid, b.id)); err != nil && !IsNotExist(err) {
		e.log().Warn("deleting a batch marker failed", zap.String("batch", b.id), zap.Error(err))
	}
	e.segCache.drop(b.id)
	e.mu.Lock()
	delete(e.batches, b.id)
	for _, en := range b.entries {
		delete(e.entries, en.st.ID)
	}
	e.mu.Unlock()
}

// --- queries ---------------------------------------------------------------

// Lookup returns a message's state, from memory when this instance owns
// it, else from storage.
func (e *Engine) Lookup(ctx context.Context, id string) (State, bool, error) {
	bid := BatchOf(id)
	if bid == "" {
		return State{}, false, nil
	}
	e.mu.Lock()
	if en := e.entries[id]; en != nil {
		st := en.st
		e.mu.Unlock()
		return st, true, nil
	}
	e.mu.Unlock()
	bs, err := e.st.loadState(ctx, bid)
	if err != nil {
		if IsNotExist(err) {
			return State{}, false, nil
		}
		return State{}, false, err
	}
	m, ok := bs.Message(id)
	return m, ok, nil
}

// States snapshots the state of accepted entries.
func (e *Engine) States(entries []*Entry) []State {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]State, len(entries))
	for i, en := range entries {
		out[i] = en.st
	}
	return out
}

// QueueStats reports the number of messages waiting and the age of the
// oldest.
func (e *Engine) QueueStats() (int, time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	// every resident message not yet final counts, the ones in an attempt
	// (claimed) too: a message retried for hours is old while it is tried
	var oldest time.Time
	for _, en := range e.entries {
		if !IsFinal(en.st.Status) && (oldest.IsZero() || en.st.Created.Before(oldest)) {
			oldest = en.st.Created
		}
	}
	oldest = e.oldestParkedLocked(oldest)
	if oldest.IsZero() {
		return e.nonFinal, 0
	}
	return e.nonFinal, time.Since(oldest)
}

// --- heap orders ------------------------------------------------------------

// byNextAttempt orders queued messages by their next attempt, then id.
type byNextAttempt struct{}

func (byNextAttempt) Less(a, b *Entry) bool {
	if !a.st.NextAt.Equal(b.st.NextAt) {
		return a.st.NextAt.Before(b.st.NextAt)
	}
	return a.st.ID < b.st.ID
}
func (byNextAttempt) Index(en *Entry) *int { return &en.heapIdx }

// byHookAttempt orders pending webhooks by their next attempt.
type byHookAttempt struct{}

func (byHookAttempt) Less(a, b *Entry) bool {
	return a.st.Webhook.NextAt.Before(b.st.Webhook.NextAt)
}
func (byHookAttempt) Index(en *Entry) *int { return &en.hookIdx }

// --- segment cache -----------------------------------------------------------

// segmentCache keeps a few recently read segments for retries and
// recovered messages, which are read back from storage.
type segmentCache struct {
	mu    sync.Mutex
	max   int
	order []string
	segs  map[string]*Segment
}

func (c *segmentCache) get(ctx context.Context, st store, bid string) (*Segment, error) {
	c.mu.Lock()
	if s := c.segs[bid]; s != nil {
		c.mu.Unlock()
		return s, nil
	}
	c.mu.Unlock()
	seg, err := st.loadSegment(ctx, bid)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.segs == nil {
		c.segs = map[string]*Segment{}
	}
	if _, ok := c.segs[bid]; !ok {
		c.segs[bid] = seg
		c.order = append(c.order, bid)
		for len(c.order) > c.max {
			delete(c.segs, c.order[0])
			c.order = c.order[1:]
		}
	}
	return seg, nil
}

func (c *segmentCache) drop(bid string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.segs[bid]; !ok {
		return
	}
	delete(c.segs, bid)
	for i, b := range c.order {
		if b == bid {
			c.order = append(c.order[:i], c.order[i+1:]...)
			break
		}
	}
}

// What a handler reads of an entry it was given by Accept. These fields
// are set at accept and never change, so they need no lock.

// ID returns the message's id.
func (en *Entry) ID() string { return en.st.ID }

// MessageID returns the message's Message-ID header value.
func (en *Entry) MessageID() string { return en.st.MessageID }

// Flow returns the flow the message was sent by.
func (en *Entry) Flow() string { return en.st.Flow }

// Rcpts returns the recipients as the handler logs them (hashed unless
// log_recipients is on).
func (en *Entry) Rcpts() []string { return en.st.Rcpts }

// Recipients returns the number of envelope recipients.
func (en *Entry) Recipients() int { return en.st.Recipients }

// FirstAttempt is closed once the outcome of the message's first attempt
// is durable, or the message reached a final state some other way.
func (en *Entry) FirstAttempt() <-chan struct{} { return en.first }
