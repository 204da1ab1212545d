package outbox

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/redistest"
)

// gatedTransport holds every attempt until open is closed, and records
// the order in which they pass.
type gatedTransport struct {
	open    chan struct{}
	mu      sync.Mutex
	waiting int      // attempts held at the gate
	order   []string // the ids of the attempts past the gate, in order
}

func (g *gatedTransport) Send(ctx context.Context, env *mailer.Envelope) (mailer.Result, error) {
	g.mu.Lock()
	g.waiting++
	g.mu.Unlock()
	select {
	case <-g.open:
	case <-ctx.Done():
		return mailer.Result{}, &mailer.Error{Code: mailer.CodeSMTPTimeout, Phase: mailer.PhaseConnect, Err: ctx.Err()}
	}
	g.mu.Lock()
	g.order = append(g.order, env.ID)
	g.mu.Unlock()
	if env.BeforeDot != nil {
		if err := env.BeforeDot(); err != nil {
			return mailer.Result{}, &mailer.Error{Code: mailer.CodeOutboxUnavailable, Phase: mailer.PhaseBody, Err: err}
		}
	}
	return mailer.Result{Status: "sent", Response: "2.0.0 Ok: queued"}, nil
}

func (g *gatedTransport) held() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting
}

func (g *gatedTransport) reached() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.order)
}

// tenantMessage is a message of a tenant (the key of that name) in flow,
// bulk when priority is PriorityBulk.
func tenantMessage(tenant, flow, priority, to string) *NewMessage {
	m := message(to)
	m.KeyID, m.Tenant, m.Flow, m.Priority = tenant, tenant, flow, priority
	return m
}

// One key's flood does not hold back another key's code. Key A has
// 1,000 codes and 1,000 bulk messages queued, every worker is in an
// attempt of A's with more of A's claimed ahead, and then key B sends
// one code: B's code reaches the transport after the two attempts that
// were in progress, at most one more begun by the other worker while B's
// was on its way, and at most one of A's bulk messages (the bulk lane's
// bulk_share of the claims), however long A's backlog. Positions are counted at
// the transport, so the bound holds however slow the machine.
func TestOneKeysFloodDoesNotHoldBackAnothersCode(t *testing.T) {
	redistest.ForEachStorage(t, testOneKeysFloodDoesNotHoldBackAnothersCode)
}

func testOneKeysFloodDoesNotHoldBackAnothersCode(t *testing.T, newStorage func() certmagic.Storage) {
	const flood = 1000
	tr := &gatedTransport{open: make(chan struct{})}
	e := newEngine(t, newStorage(), "inst", tr, nil)
	opened := false
	t.Cleanup(func() {
		if !opened {
			close(tr.open)
		}
	})
	e.Start()
	for i := 0; i < flood; i += 100 {
		var msgs []*NewMessage
		for j := i; j < i+100; j++ {
			msgs = append(msgs, tenantMessage("a", "otp", "", fmt.Sprintf("code%d@example.org", j)),
				tenantMessage("a", "send", PriorityBulk, fmt.Sprintf("bulk%d@example.org", j)))
		}
		if _, err := e.Accept(msgs, "", false); err != nil {
			t.Fatal(err)
		}
	}
	// every worker is in an attempt of A's, with a group of A's claimed
	// ahead behind it
	waitFor(t, "every worker to hold an attempt", func() bool { return tr.held() >= 2 })
	entries, err := e.Accept([]*NewMessage{tenantMessage("b", "otp", "", "jane@example.org")}, "", false)
	if err != nil {
		t.Fatal(err)
	}
	b := entries[0].ID()
	close(tr.open)
	opened = true
	const bound = 4
	var order []string
	waitFor(t, "B's code, or more of A's messages than the bound", func() bool {
		order = tr.reached()
		return slices.Contains(order, b) || len(order) > 50
	})
	ahead := slices.Index(order, b)
	if ahead < 0 {
		ahead = len(order)
	}
	t.Logf("%d of A's messages reached the transport between B's acceptance and B's code", ahead)
	if ahead > bound {
		t.Fatalf("%d of A's messages reached the transport before B's code, want at most %d (the attempts in progress when it came, one begun meanwhile, one by bulk_share)", ahead, bound)
	}
}

// waitFor polls cond for up to a minute: long enough for a loaded
// machine, and the tests count positions, not time.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited a minute for %s", what)
		}
	}
}

// queued makes a queued message of a tenant in a flow (and priority),
// due at at.
func queued(id, tenant, flow, priority string, at time.Time) *Entry {
	return &Entry{st: State{ID: id, KeyID: tenant, Tenant: tenant, Flow: flow, Priority: priority, NextAt: at}, heapIdx: -1}
}

// The ready queue takes a lane's due messages by turns of their tenants:
// the least recently served first, a tenant with nothing queued or in
// flight as never served, and each tenant's own in order of time.
func TestReadyQueueTakesTurnsByKey(t *testing.T) {
	now := time.Now()
	var q readyQueue
	n := 0
	add := func(tenant string, count int, at time.Time) {
		for range count {
			n++
			q.push(queued(fmt.Sprintf("m%05d", n), tenant, "otp", "", at.Add(time.Duration(n))))
		}
	}
	add("a", 1000, now.Add(-time.Hour)) // long before the others
	add("b", 3, now.Add(-time.Minute))
	add("c", 1, now.Add(-time.Second))
	add("d", 2, now.Add(time.Hour)) // not due
	var order strings.Builder
	last := map[string]time.Time{}
	for {
		en := q.popDue(now)
		if en == nil {
			break
		}
		if en.st.NextAt.Before(last[en.st.Tenant]) {
			t.Fatalf("%s of %s out of its order of time", en.st.ID, en.st.Tenant)
		}
		last[en.st.Tenant] = en.st.NextAt
		order.WriteString(en.st.Tenant)
		q.settle(en)
		checkReadyQueue(t, &q)
	}
	got := order.String()
	if len(got) != 1004 || q.Len() != 2 {
		t.Fatalf("%d taken, %d left; want 1004 and the 2 not due", len(got), q.Len())
	}
	if !strings.HasPrefix(got, "abcabab") || strings.Count(got[7:], "a") != len(got)-7 {
		t.Fatalf("turns %s…, want abcabab and then the rest of a", got[:20])
	}
	if l := &q.lanes[laneAuth]; len(l.tenants) != 1 || l.tenants["d"] == nil {
		t.Fatalf("tenants kept: %v, want only d's, which has messages queued", l.tenants)
	}

	// a key that comes back after its mail left goes first; one with
	// mail in flight takes its turn after the others
	q = readyQueue{}
	add("a", 100, now.Add(-time.Hour))
	for range 10 {
		q.settle(q.popDue(now))
	}
	add("b", 1, now.Add(-time.Second))
	b1 := q.popDue(now)
	if b1.st.Tenant != "b" {
		t.Fatalf("%s came first, want b's first message", b1.st.Tenant)
	}
	add("b", 1, now.Add(-time.Second)) // b1 still in flight
	order.Reset()
	for range 4 {
		en := q.popDue(now)
		order.WriteString(en.st.Tenant)
		q.settle(en)
	}
	if got := order.String(); got != "abaa" {
		t.Fatalf("turns %s, want abaa: b served last, a goes first", got)
	}
	q.settle(b1)
	add("b", 1, now.Add(-time.Second)) // nothing of b queued or in flight: b goes first
	if en := q.popDue(now); en.st.Tenant != "b" {
		t.Fatalf("%s came first, want b, which had nothing queued or in flight", en.st.Tenant)
	}
	checkReadyQueue(t, &q)
}

// A worker that holds messages claimed ahead gives them back for a
// message of another key that became due after the claim and whose
// turn they would take: a key's first message, or its next one when the
// key was served before they were claimed. Keys that each have a
// backlog make no worker give anything back.
func TestReadyQueueYieldsToAKeyWhoseTurnItWouldTake(t *testing.T) {
	now := time.Now()
	var q readyQueue
	for i := range 100 {
		q.push(queued(fmt.Sprintf("a%03d", i), "a", "otp", "", now.Add(-time.Hour)))
	}
	var group []*Entry
	for range 16 {
		group = append(group, q.popDue(now))
	}
	if q.yields(group[1], now) {
		t.Fatal("gives a's claims back with only a's mail queued")
	}
	q.push(queued("b000", "b", "otp", "", now))
	if !q.yields(group[1], now) {
		t.Fatal("keeps a's claims with b's first message due")
	}
	if b := q.popDue(now); b.st.Tenant != "b" || q.yields(group[1], now) {
		t.Fatalf("%s taken next; gives back with b's message taken: %v", b.st.Tenant, q.yields(group[1], now))
	}
	// b's second message, with its first in flight: claims taken after
	// b's turn give it back, the ones taken before do not
	var later []*Entry
	for range 4 {
		later = append(later, q.popDue(now))
	}
	q.push(queued("b001", "b", "otp", "", now))
	if !q.yields(later[1], now) || q.yields(group[1], now) {
		t.Fatalf("b's next message: a claim after b's turn gives back %v (want true), one before %v (want false)", q.yields(later[1], now), q.yields(group[1], now))
	}
	if b := q.popDue(now); b.st.Tenant != "b" {
		t.Fatalf("%s taken next, want b's", b.st.Tenant)
	}
	// a message of a lower lane does not take a turn from the codes
	q.push(queued("s000", "c", "send", "", now))
	if q.yields(later[1], now) {
		t.Fatal("gives codes back for /send mail")
	}
	// a claim taken while another key's message was due does not give
	// way to it: that key's turn is still to come
	q.push(queued("c001", "c", "otp", "", now))
	q.push(queued("d001", "d", "otp", "", now))
	if late := q.popDue(now); q.yields(late, now) {
		t.Fatal("a claim gives way to a key that was due when it was taken")
	}
	checkReadyQueue(t, &q)

	// two keys with a backlog each, their claims in turns
	q = readyQueue{}
	for i := range 100 {
		q.push(queued(fmt.Sprintf("a%03d", i), "a", "otp", "", now.Add(-time.Hour)))
		q.push(queued(fmt.Sprintf("b%03d", i), "b", "otp", "", now.Add(-time.Hour)))
	}
	var claims []*Entry
	for range 32 {
		claims = append(claims, q.popDue(now))
	}
	for i, en := range claims {
		if q.yields(en, now) {
			t.Fatalf("claim %d (%s) gives way with two keys' backlogs taking turns", i, en.st.ID)
		}
	}
}

// Random pushes, claims, give-backs, outcomes and removals keep the
// queue's structure, hand out only due messages, each tenant's in order
// of time, and forget a tenant once nothing of it is queued or in
// flight.
func TestReadyQueueRandomOperations(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	now := time.Now()
	var q readyQueue
	var live, claimed []*Entry
	flows := []struct{ flow, priority string }{{"otp", ""}, {"send", ""}, {"send", PriorityBulk}}
	for step := range 20000 {
		switch op := r.IntN(20); {
		case op < 7:
			f := flows[r.IntN(len(flows))]
			en := queued(fmt.Sprintf("m%06d", step), fmt.Sprintf("t%d", r.IntN(6)), f.flow, f.priority,
				now.Add(time.Duration(r.IntN(20)-10)*time.Second))
			if r.IntN(4) == 0 {
				en.st.Tenant = "" // a record from before tenants
			}
			q.push(en)
			live = append(live, en)
		case op < 13:
			en := q.popDue(now)
			if en == nil {
				continue
			}
			if en.st.NextAt.After(now) {
				t.Fatalf("step %d: %s handed out before it is due", step, en.st.ID)
			}
			for _, o := range live {
				if o != en && o.lane == en.lane && o.tq == en.tq && o.heapIdx >= 0 && (byNextAttempt{}).Less(o, en) {
					t.Fatalf("step %d: %s handed out before %s of its tenant", step, en.st.ID, o.st.ID)
				}
			}
			live = slices.DeleteFunc(live, func(o *Entry) bool { return o == en })
			claimed = append(claimed, en)
		case op < 16 && len(claimed) > 0:
			i := r.IntN(len(claimed))
			en := claimed[i]
			claimed = slices.Delete(claimed, i, i+1)
			if r.IntN(2) == 0 { // given back, or retried later
				en.st.NextAt = now.Add(time.Duration(r.IntN(10)) * time.Second)
				q.push(en)
				live = append(live, en)
			}
			q.settle(en)
		case op < 18 && len(live) > 0:
			i := r.IntN(len(live))
			q.remove(live[i])
			live = slices.Delete(live, i, i+1)
		case op < 19 && len(live) > 0:
			en := live[r.IntN(len(live))]
			en.st.NextAt = en.st.NextAt.Add(time.Duration(r.IntN(10)-5) * time.Second)
			q.fix(en)
		default:
			now = now.Add(time.Second)
		}
		checkReadyQueue(t, &q)
		if q.Len() != len(live) {
			t.Fatalf("step %d: %d queued, want %d", step, q.Len(), len(live))
		}
	}
	for _, en := range live {
		q.remove(en)
	}
	for _, en := range claimed {
		q.settle(en)
	}
	for l := range q.lanes {
		if n := len(q.lanes[l].tenants); n != 0 || q.lanes[l].turns.Len()+q.lanes[l].waiting.Len() != 0 {
			t.Fatalf("lane %s keeps %d tenants with nothing queued or in flight", laneNames[l], n)
		}
	}
}

// checkReadyQueue verifies the structure of every lane: the count, every
// tenant with messages in exactly one of turns and waiting, none with
// nothing queued or in flight, and every message's tenant.
func checkReadyQueue(t *testing.T, q *readyQueue) {
	t.Helper()
	for l := range q.lanes {
		lq := &q.lanes[l]
		n := 0
		for key, tq := range lq.tenants {
			n += tq.msgs.Len()
			if tq.key != key || (tq.msgs.Len() == 0 && tq.inflight == 0) || tq.inflight < 0 {
				t.Fatalf("lane %s: tenant %q (%q) with %d queued and %d in flight", laneNames[l], key, tq.key, tq.msgs.Len(), tq.inflight)
			}
			inTurns, inWaiting := lq.turns.In(tq), lq.waiting.In(tq)
			if tq.msgs.Len() > 0 && (inTurns == inWaiting || inTurns != tq.due) || tq.msgs.Len() == 0 && (inTurns || inWaiting) {
				t.Fatalf("lane %s: tenant %q with %d queued: in turns %v, in waiting %v, due %v", laneNames[l], key, tq.msgs.Len(), inTurns, inWaiting, tq.due)
			}
			for _, en := range tq.msgs.Items() {
				if en.tq != tq || en.lane != lane(l) || tenantKey(en.st.Tenant, en.st.KeyID) != key {
					t.Fatalf("lane %s: %s queued under %q", laneNames[l], en.st.ID, key)
				}
			}
		}
		if n != lq.n {
			t.Fatalf("lane %s counts %d, holds %d", laneNames[l], lq.n, n)
		}
		if lq.turns.Len()+lq.waiting.Len() > len(lq.tenants) {
			t.Fatalf("lane %s: %d tenants in turns and waiting, %d known", laneNames[l], lq.turns.Len()+lq.waiting.Len(), len(lq.tenants))
		}
	}
}

// With max_queued 20, /send mail, bulk or not, is refused once 18
// messages are unfinished: a tenth is kept for codes and links, which
// may fill all 20. With max_queued_per_key, a key's messages stop at
// that many while another key's are still taken; delivered messages
// make room again.
func TestQueueLimitKeepsRoomForCodes(t *testing.T) {
	redistest.ForEachStorage(t, testQueueLimitKeepsRoomForCodes)
}

func testQueueLimitKeepsRoomForCodes(t *testing.T, newStorage func() certmagic.Storage) {
	tr := &gatedTransport{open: make(chan struct{})}
	cfg := testConfig()
	cfg.MaxQueued = 20
	e := newEngine(t, newStorage(), "inst", tr, cfg)
	opened := false
	t.Cleanup(func() {
		if !opened {
			close(tr.open)
		}
	})
	e.Start()
	one := func(tenant, flow, priority, to string) error {
		_, err := e.Accept([]*NewMessage{tenantMessage(tenant, flow, priority, to)}, "", false)
		return err
	}
	bulk := 0
	for ; bulk < 100; bulk++ {
		if err := one("a", "send", PriorityBulk, fmt.Sprintf("bulk%d@example.org", bulk)); err != nil {
			if !errors.Is(err, ErrQueueFull) {
				t.Fatal(err)
			}
			break
		}
	}
	if bulk != 18 {
		t.Fatalf("%d bulk messages taken, want 18: max_queued less its tenth", bulk)
	}
	if err := one("a", "send", "", "plain@example.org"); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("/send mail past the reserve: %v, want ErrQueueFull", err)
	}
	if err := one("b", "otp", "", "jane@example.org"); err != nil {
		t.Fatalf("b's code with the queue full of a's bulk mail: %v", err)
	}
	if err := one("a", "password-reset", "", "joe@example.org"); err != nil {
		t.Fatalf("a's link: %v", err)
	}
	if err := one("b", "otp", "", "ann@example.org"); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("a code past max_queued: %v, want ErrQueueFull", err)
	}
	if inv := e.Inventory(); inv.NonFinal != 20 || inv.Reserved != 0 || inv.Unfinished["a"] != 19 || inv.Unfinished["b"] != 1 || len(inv.Unfinished) != 2 {
		t.Fatalf("%d unfinished, %d reserved, by key %v; want 20, 0, a 19 and b 1", inv.NonFinal, inv.Reserved, inv.Unfinished)
	}

	per := *cfg
	per.MaxQueued, per.MaxQueuedPerKey = 100, 19
	e.SetConfig(&per)
	if err := one("a", "otp", "", "joe@example.org"); !errors.Is(err, ErrKeyQueueFull) || !errors.Is(err, ErrQueueFull) {
		t.Fatalf("a's 20th message with max_queued_per_key 19: %v, want ErrKeyQueueFull", err)
	}
	if err := one("b", "otp", "", "ann@example.org"); err != nil {
		t.Fatalf("b's second code: %v", err)
	}
	// a request is counted for each key it holds
	two := []*NewMessage{tenantMessage("c", "otp", "", "c@example.org"), tenantMessage("a", "otp", "", "a@example.org")}
	if _, err := e.Accept(two, "", false); !errors.Is(err, ErrKeyQueueFull) {
		t.Fatalf("a request with a message of a: %v, want ErrKeyQueueFull", err)
	}
	close(tr.open)
	opened = true
	waitFor(t, "every message to be delivered", func() bool {
		inv := e.Inventory()
		return inv.NonFinal == 0 && len(inv.Unfinished) == 0
	})
	if err := one("a", "otp", "", "joe@example.org"); err != nil {
		t.Fatalf("a's code once its mail left: %v", err)
	}
}

// The counts by key follow batches out of memory and back: parked
// messages still count against max_queued_per_key, and nothing is
// counted twice when they are loaded back and delivered.
func TestKeyCountsFollowParkedBatches(t *testing.T) {
	redistest.ForEachStorage(t, testKeyCountsFollowParkedBatches)
}

func testKeyCountsFollowParkedBatches(t *testing.T, newStorage func() certmagic.Storage) {
	tr := newFake()
	tr.outcome = func(*mailer.Envelope, int) error { return transient() }
	cfg := hourBackoff()
	cfg.MaxQueuedPerKey = 3
	e := newEngine(t, newStorage(), "inst", tr, cfg)
	e.Tunables().ParkEvery = time.Hour // parking is driven by the test
	e.Start()
	var ids []string
	for i, tenant := range []string{"a", "a", "a", "b"} {
		entries, err := e.Accept([]*NewMessage{tenantMessage(tenant, "otp", "", fmt.Sprintf("p%d@example.org", i))}, "", false)
		if err != nil {
			t.Fatal(err)
		}
		waitAttempted(t, e, entries[0].ID(), 1)
		ids = append(ids, entries[0].ID())
	}
	waitFor(t, "the deferred batches to park", func() bool {
		e.parkIdle(time.Now())
		resident, _ := residentIDs(e, ids)
		return resident == 0
	})
	if inv := e.Inventory(); inv.NonFinal != 4 || inv.Unfinished["a"] != 3 || inv.Unfinished["b"] != 1 {
		t.Fatalf("parked: %d unfinished, by key %v; want 4, a 3 and b 1", inv.NonFinal, inv.Unfinished)
	}
	if _, err := e.Accept([]*NewMessage{tenantMessage("a", "otp", "", "more@example.org")}, "", false); !errors.Is(err, ErrKeyQueueFull) {
		t.Fatalf("a's fourth message with three parked: %v, want ErrKeyQueueFull", err)
	}
	e.Tunables().UnparkLead = 2 * time.Hour
	if n := e.unparkDue(time.Now()); n != 4 {
		t.Fatalf("%d batches loaded back, want 4", n)
	}
	if inv := e.Inventory(); inv.NonFinal != 4 || inv.Unfinished["a"] != 3 || inv.Unfinished["b"] != 1 {
		t.Fatalf("loaded back: %d unfinished, by key %v; want 4, a 3 and b 1", inv.NonFinal, inv.Unfinished)
	}
	tr.mu.Lock()
	tr.outcome = nil
	tr.mu.Unlock()
	e.mu.Lock()
	e.ready.each(func(en *Entry) { en.st.NextAt = time.Now() })
	e.ready.reinit()
	e.mu.Unlock()
	e.notify()
	for _, id := range ids {
		waitStatus(t, e, id, Sent, 10*time.Second)
	}
	if inv := e.Inventory(); inv.NonFinal != 0 || len(inv.Unfinished) != 0 {
		t.Fatalf("delivered: %d unfinished, by key %v; want none", inv.NonFinal, inv.Unfinished)
	}
}
