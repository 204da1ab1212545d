package outbox

import (
	"math"
	"time"

	"github.com/caddy-authmail/authmail/internal/heapq"
)

// Priority lanes. Every queued message is in one of three lanes:
//
//   - auth: the flows that carry a code or a link or warn the user (OTP,
//     magic link, password reset, verify, email change, security alert,
//     the test command's message). A person is waiting for them.
//   - send: /send mail.
//   - bulk: /send mail that asked for "priority": "bulk".
//
// A worker that claims messages takes the due messages of the highest
// lane first. A lower lane is never starved: while it has due messages
// and a higher lane is served, it earns part of a claim per claim of the
// higher lanes, and a whole one is spent on its own next message, so
// that it gets bulk_share of the claims. With the default 10%, bulk mail
// behind a steady stream of codes still leaves at a tenth of the rate,
// and an idle auth lane gives it all.
//
// Inside a lane, keys take turns. Each tenant (the key's secret; a
// record from before tenants by its key id) queues its messages apart,
// in the order of their next attempt, and a claim in the lane goes to
// the tenant with a due message that was served least recently; one
// with nothing queued or in flight counts as never served. A worker
// that claimed a key's messages ahead gives them back when another
// key's message becomes due whose turn they would take, as it does for
// a higher lane. So once a key's message is due, at most one message of
// each other key with due mail in its lane is claimed before it (and,
// from the lanes below, their bulk_share), besides the attempts already
// in progress, one per worker: a key that queued 100,000 codes holds
// back another key's code by those attempts and a message, where one
// queue in order of time made the code wait for all of them, long
// enough to expire at a paced server's rate.
//
// The lane is not stored: it follows from the flow and the stored
// priority, so a message read back after a restart or an adoption is in
// the lane it was accepted in. Neither is a tenant's turn: after a
// restart every tenant starts as never served.

type lane int

const (
	laneAuth lane = iota
	laneSend
	laneBulk
	numLanes
)

var laneNames = [numLanes]string{"auth", "send", "bulk"}

// PriorityBulk is /send's "priority" that puts a message in the bulk lane.
const PriorityBulk = "bulk"

// laneOf is the lane of a message.
func laneOf(st *State) lane {
	switch {
	case st.Flow != "send":
		return laneAuth
	case st.Priority == PriorityBulk:
		return laneBulk
	}
	return laneSend
}

// readyQueue holds the queued messages of an engine: in each lane, the
// messages of each tenant ordered by next attempt time.
type readyQueue struct {
	lanes  [numLanes]laneQueue
	credit [numLanes]float64 // what each lower lane earned of a claim
	share  float64           // bulk_share as a fraction; 0 means the default
}

// laneQueue is one lane: its tenants and their turns. A tenant with a
// due message is in turns, the least recently served first; a tenant
// whose messages all wait for a later time is in waiting, by the
// earliest, until promote moves it to turns. Its place in turns is its
// served turn, so a tenant loses nothing by moving between the two.
//
// Every operation is O(log n) in the tenants or the tenant's messages;
// promote moves a tenant once per time it becomes due.
type laneQueue struct {
	tenants map[string]*tenantQueue // tenants with messages queued or in flight
	turns   heapq.Heap[*tenantQueue, byTurn]
	waiting heapq.Heap[*tenantQueue, byHead]
	turn    uint64 // claims taken from the lane so far
	n       int    // queued messages
}

// tenantQueue is one tenant's part of a lane.
type tenantQueue struct {
	key  string // tenantKey
	msgs heapq.Heap[*Entry, byNextAttempt]
	// served is the lane's turn when the tenant was last served; 0 for a
	// tenant that had nothing queued or in flight since (it goes first)
	served uint64
	// since is the lane's turn when the tenant last joined turns
	since    uint64
	inflight int  // messages claimed from here whose claim has not ended
	due      bool // in turns; else in waiting while it has messages
	idx      int  // index in turns or waiting, -1 in neither
}

// tenantKey names the tenant whose turn a message takes and whose count
// it is in: the key's tenant, or, for a record written before tenants,
// its key id (a tenant is hex, so the two never meet).
func tenantKey(tenant, keyID string) string {
	if tenant != "" {
		return tenant
	}
	return "key " + keyID
}

// defaultBulkShare is the default bulk_share, as a fraction.
const defaultBulkShare = 0.1

func (q *readyQueue) Len() int {
	n := 0
	for i := range q.lanes {
		n += q.lanes[i].n
	}
	return n
}

// laneLen is the number of queued messages of one lane.
func (q *readyQueue) laneLen(l lane) int { return q.lanes[l].n }

func (q *readyQueue) push(en *Entry) {
	en.lane = laneOf(&en.st)
	q.lanes[en.lane].push(en)
}

// remove takes a queued message out.
func (q *readyQueue) remove(en *Entry) {
	q.lanes[en.lane].remove(en)
}

// fix restores the order after en's NextAt changed.
func (q *readyQueue) fix(en *Entry) {
	q.lanes[en.lane].fix(en)
}

// settle ends the claim of a message that popDue handed out (attempted,
// expired or given back); a message given back is pushed first, so that
// its tenant keeps its turn.
func (q *readyQueue) settle(en *Entry) {
	if en.counted {
		q.lanes[en.lane].settle(en)
	}
}

// earliest is the soonest next attempt of any queued message.
func (q *readyQueue) earliest() (time.Time, bool) {
	var at time.Time
	ok := false
	for i := range q.lanes {
		if t, lok := q.lanes[i].earliest(); lok && (!ok || t.Before(at)) {
			at, ok = t, true
		}
	}
	return at, ok
}

func (q *readyQueue) due(l lane, now time.Time) bool {
	return q.lanes[l].due(now)
}

// popDue takes the next due message by lane and share, or nil when none
// is due.
func (q *readyQueue) popDue(now time.Time) *Entry {
	share := q.share
	if share <= 0 {
		share = defaultBulkShare
	}
	top := lane(-1)
	for l := laneAuth; l < numLanes; l++ {
		if !q.due(l, now) {
			q.credit[l] = 0 // no saving up while there is nothing to send
			continue
		}
		if top < 0 {
			top = l
		}
	}
	if top < 0 {
		return nil
	}
	pick := top
	// the lowest lane with a whole claim earned goes first: bulk behind
	// both send and auth still gets its share
	for l := numLanes - 1; l > top; l-- {
		if q.due(l, now) && q.credit[l] >= 1 {
			pick = l
			q.credit[l]--
			break
		}
	}
	if pick == top {
		// share/(1-share) per claim of a higher lane makes the lower
		// lane's part of the claims exactly share
		for l := top + 1; l < numLanes; l++ {
			if q.due(l, now) {
				q.credit[l] += share / (1 - share)
			}
		}
	}
	return q.lanes[pick].pop(now)
}

// waitingAbove reports whether a message of a lane above l is due: a
// worker holding claims of lane l gives them back for it.
func (q *readyQueue) waitingAbove(l lane, now time.Time) bool {
	for h := laneAuth; h < l; h++ {
		if q.due(h, now) {
			return true
		}
	}
	return false
}

// yields reports whether a worker gives back en, a message it claimed
// ahead and has not begun: a message of a higher lane is due, or the
// tenant whose turn is next in en's lane became due after en was
// claimed and has not been served since (another key's message that
// arrived meanwhile), so that en would take its turn. The tenants that
// were due when en was claimed had their turns as the claims were
// taken, and a tenant served since keeps its place behind: so keys with
// a backlog each do not make the workers give their claims back, only a
// message that becomes due does, once.
func (q *readyQueue) yields(en *Entry, now time.Time) bool {
	if q.waitingAbove(en.lane, now) {
		return true
	}
	lq := &q.lanes[en.lane]
	if !lq.due(now) {
		return false
	}
	t := lq.turns.Peek()
	return t.since >= en.turn && t.served < en.turn
}

// each calls f for every queued message (tests and stats).
func (q *readyQueue) each(f func(*Entry)) {
	for i := range q.lanes {
		for _, t := range q.lanes[i].tenants {
			for _, en := range t.msgs.Items() {
				f(en)
			}
		}
	}
}

// reinit restores the order of every lane after NextAt values were
// changed in place (tests).
func (q *readyQueue) reinit() {
	for i := range q.lanes {
		q.lanes[i].reinit()
	}
}

// --- one lane ------------------------------------------------------------

// tenant returns the tenant's queue, made when there is none.
func (lq *laneQueue) tenant(key string) *tenantQueue {
	t := lq.tenants[key]
	if t == nil {
		if lq.tenants == nil {
			lq.tenants = map[string]*tenantQueue{}
		}
		t = &tenantQueue{key: key, idx: -1}
		lq.tenants[key] = t
	}
	return t
}

func (lq *laneQueue) push(en *Entry) {
	t := lq.tenant(tenantKey(en.st.Tenant, en.st.KeyID))
	en.tq = t
	empty := t.msgs.Len() == 0 // then in neither turns nor waiting
	t.msgs.Push(en)
	lq.n++
	switch {
	case empty:
		lq.waiting.Push(t)
	case !t.due && t.msgs.Peek() == en:
		lq.waiting.Fix(t)
	}
	// a tenant in turns stays there: its head can only be earlier now
}

func (lq *laneQueue) remove(en *Entry) {
	t := en.tq
	if t == nil {
		return
	}
	head := t.msgs.Len() > 0 && t.msgs.Peek() == en
	if !t.msgs.Remove(en) {
		return
	}
	lq.n--
	if !en.counted {
		en.tq = nil
	}
	if head {
		lq.replace(t)
	}
}

func (lq *laneQueue) fix(en *Entry) {
	if t := en.tq; t != nil && t.msgs.In(en) {
		t.msgs.Fix(en)
		lq.replace(t)
	}
}

// replace puts a tenant whose head left or may be later now where it
// belongs: in waiting, from which promote takes it back to its place in
// turns once its new head is due; a tenant with nothing queued leaves
// both, and the lane when nothing of it is in flight either.
func (lq *laneQueue) replace(t *tenantQueue) {
	if t.due {
		lq.turns.Remove(t)
	} else {
		lq.waiting.Remove(t)
	}
	t.due = false
	if t.msgs.Len() == 0 {
		lq.forget(t)
		return
	}
	lq.waiting.Push(t)
}

// forget drops a tenant with nothing queued and nothing in flight: when
// it comes back, it counts as never served.
func (lq *laneQueue) forget(t *tenantQueue) {
	if t.msgs.Len() == 0 && t.inflight == 0 && lq.tenants[t.key] == t {
		delete(lq.tenants, t.key)
	}
}

// promote moves the tenants whose head is due by now to turns.
func (lq *laneQueue) promote(now time.Time) {
	for lq.waiting.Len() > 0 && !lq.waiting.Peek().msgs.Peek().st.NextAt.After(now) {
		t := lq.waiting.Pop()
		t.due, t.since = true, lq.turn
		lq.turns.Push(t)
	}
}

// due reports whether a message of the lane is due.
func (lq *laneQueue) due(now time.Time) bool {
	lq.promote(now)
	return lq.turns.Len() > 0
}

// earliest is the soonest next attempt in the lane. The head of a tenant
// in turns was due when it got there and can only have moved earlier
// since (replace takes it out otherwise), so any of them is due now.
func (lq *laneQueue) earliest() (time.Time, bool) {
	switch {
	case lq.turns.Len() > 0:
		return lq.turns.Peek().msgs.Peek().st.NextAt, true
	case lq.waiting.Len() > 0:
		return lq.waiting.Peek().msgs.Peek().st.NextAt, true
	}
	return time.Time{}, false
}

// pop takes the due message of the tenant whose turn it is and counts it
// in flight until settle, or returns nil when none is due.
func (lq *laneQueue) pop(now time.Time) *Entry {
	if !lq.due(now) {
		return nil
	}
	t := lq.turns.Pop()
	t.due = false
	en := t.msgs.Pop()
	lq.n--
	lq.turn++
	t.served, en.turn = lq.turn, lq.turn
	t.inflight++
	en.counted = true
	if t.msgs.Len() > 0 {
		if !t.msgs.Peek().st.NextAt.After(now) {
			// to the back of the turns
			t.due, t.since = true, lq.turn
			lq.turns.Push(t)
		} else {
			lq.waiting.Push(t)
		}
	}
	return en
}

// settle ends the claim of a message pop handed out.
func (lq *laneQueue) settle(en *Entry) {
	t := en.tq
	en.counted = false
	if en.heapIdx < 0 {
		en.tq = nil
	}
	t.inflight--
	lq.forget(t)
}

// reinit rebuilds the lane's order after NextAt values were changed in
// place (tests).
func (lq *laneQueue) reinit() {
	lq.turns, lq.waiting = heapq.Heap[*tenantQueue, byTurn]{}, heapq.Heap[*tenantQueue, byHead]{}
	for _, t := range lq.tenants {
		t.msgs.Init()
		t.due, t.idx = false, -1
		if t.msgs.Len() > 0 {
			lq.waiting.Push(t)
		}
	}
}

// byTurn orders the tenants with due messages: the least recently served
// first.
type byTurn struct{}

func (byTurn) Less(a, b *tenantQueue) bool {
	if a.served != b.served {
		return a.served < b.served
	}
	return a.key < b.key
}
func (byTurn) Index(t *tenantQueue) *int { return &t.idx }

// byHead orders the tenants with nothing due by their earliest message.
type byHead struct{}

func (byHead) Less(a, b *tenantQueue) bool {
	return byNextAttempt{}.Less(a.msgs.Peek(), b.msgs.Peek())
}
func (byHead) Index(t *tenantQueue) *int { return &t.idx }

// BulkSharePercent is a configured share (0: the default) in percent.
func BulkSharePercent(share float64) float64 {
	if share <= 0 {
		share = defaultBulkShare
	}
	return math.Round(share * 100)
}

// LaneStats counts the queued messages in memory by lane.
func (e *Engine) LaneStats() map[string]int {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]int, numLanes)
	for l := laneAuth; l < numLanes; l++ {
		out[laneNames[l]] = e.ready.laneLen(l)
	}
	return out
}
