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
// The lane is not stored: it follows from the flow and the stored
// priority, so a message read back after a restart or an adoption is in
// the lane it was accepted in.

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

// readyQueue holds the queued messages of an engine, one heap per lane
// ordered by next attempt time.
type readyQueue struct {
	lanes  [numLanes]heapq.Heap[*Entry, byNextAttempt]
	credit [numLanes]float64 // what each lower lane earned of a claim
	share  float64           // bulk_share as a fraction; 0 means the default
}

// defaultBulkShare is the default bulk_share, as a fraction.
const defaultBulkShare = 0.1

func (q *readyQueue) Len() int {
	n := 0
	for i := range q.lanes {
		n += q.lanes[i].Len()
	}
	return n
}

// laneLen is the number of queued messages of one lane.
func (q *readyQueue) laneLen(l lane) int { return q.lanes[l].Len() }

func (q *readyQueue) push(en *Entry) {
	en.lane = laneOf(&en.st)
	q.lanes[en.lane].Push(en)
}

// remove takes a queued message out.
func (q *readyQueue) remove(en *Entry) {
	q.lanes[en.lane].Remove(en)
}

// fix restores the order after en's NextAt changed.
func (q *readyQueue) fix(en *Entry) {
	q.lanes[en.lane].Fix(en)
}

// earliest is the soonest next attempt of any queued message.
func (q *readyQueue) earliest() (time.Time, bool) {
	var at time.Time
	ok := false
	for i := range q.lanes {
		if h := &q.lanes[i]; h.Len() > 0 && (!ok || h.Peek().st.NextAt.Before(at)) {
			at, ok = h.Peek().st.NextAt, true
		}
	}
	return at, ok
}

func (q *readyQueue) due(l lane, now time.Time) bool {
	h := &q.lanes[l]
	return h.Len() > 0 && !h.Peek().st.NextAt.After(now)
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
	return q.lanes[pick].Pop()
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

// each calls f for every queued message (tests and stats).
func (q *readyQueue) each(f func(*Entry)) {
	for i := range q.lanes {
		for _, en := range q.lanes[i].Items() {
			f(en)
		}
	}
}

// reinit restores the heap order of every lane after NextAt values were
// changed in place (tests).
func (q *readyQueue) reinit() {
	for i := range q.lanes {
		q.lanes[i].Init()
	}
}

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
