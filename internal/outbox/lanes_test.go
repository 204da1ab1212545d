package outbox

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// The ready queue hands out due messages by lane: the auth flows first,
// then /send, then bulk; a lower lane gets bulk_share of the claims
// while higher lanes are served, and everything once they are empty.
func TestReadyQueueLanesAndShare(t *testing.T) {
	now := time.Now()
	var q readyQueue
	n := 0
	add := func(flow, priority string, count int, at time.Time) {
		for range count {
			n++
			q.push(&Entry{st: State{ID: fmt.Sprintf("m%05d", n), Flow: flow, Priority: priority, NextAt: at}, heapIdx: -1})
		}
	}
	add("send", PriorityBulk, 100, now.Add(-time.Hour)) // waiting the longest
	add("send", "", 100, now.Add(-time.Minute))
	add("otp", "", 100, now)
	add("otp", "", 5, now.Add(time.Hour)) // not due
	var order strings.Builder
	for {
		en := q.popDue(now)
		if en == nil {
			break
		}
		order.WriteByte("asb"[en.lane])
	}
	got := order.String()
	if len(got) != 300 || q.Len() != 5 {
		t.Fatalf("%d popped, %d left; want 300 and the 5 not due", len(got), q.Len())
	}
	// 10%: each lower lane gets a tenth of the claims while the codes
	// wait; the bulk lane earns its share too (it waits behind both)
	first := got[:110]
	if a := strings.Count(first, "a"); a < 85 || a > 95 {
		t.Fatalf("%d codes in the first 110 claims, want about 90: %s", a, first)
	}
	if s, b := strings.Count(first, "s"), strings.Count(first, "b"); s < 9 || b < 9 {
		t.Fatalf("/send got %d and bulk %d of the first 110 claims, want their share (10%%): %s", s, b, first)
	}
	if strings.Index(got, "a") != 0 || strings.LastIndex(got, "a") > 125 {
		t.Fatalf("codes are not first: %s", got)
	}
	// once the codes are gone, /send goes ahead of bulk, which keeps 10%
	rest := got[strings.LastIndex(got, "a")+1:]
	if i := strings.LastIndex(rest, "s"); i < 0 || strings.Count(rest[:i], "b") > i/9+2 {
		t.Fatalf("after the codes: %s", rest)
	}

	// a bigger share, and nothing saved up while a lane had nothing due
	q = readyQueue{share: 0.5}
	add("otp", "", 20, now)
	add("send", PriorityBulk, 20, now)
	order.Reset()
	for range 9 {
		order.WriteByte("asb"[q.popDue(now).lane])
	}
	if got := order.String(); got != "ababababa" {
		t.Fatalf("bulk_share 50%%: %s, want every other claim bulk", got)
	}
}
