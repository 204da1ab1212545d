package heapq

import (
	"math/rand/v2"
	"slices"
	"testing"
)

type item struct {
	key, idx int
}

type byKey struct{}

func (byKey) Less(a, b *item) bool { return a.key < b.key }
func (byKey) Index(x *item) *int   { return &x.idx }

// check verifies the heap property and that every item knows its place.
func check(t *testing.T, h *Heap[*item, byKey]) {
	t.Helper()
	for i, x := range h.items {
		if x.idx != i {
			t.Fatalf("item %d says it is at %d", i, x.idx)
		}
		if i > 0 && x.key < h.items[(i-1)/2].key {
			t.Fatalf("item %d (%d) is less than its parent", i, x.key)
		}
	}
}

// Random pushes, pops, removals and key changes keep the order and the
// positions, and pops come out sorted.
func TestHeapAgainstASortedList(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var h Heap[*item, byKey]
	var live []*item
	for step := range 20000 {
		switch op := r.IntN(10); {
		case op < 4 || len(live) == 0:
			x := &item{key: r.IntN(1000), idx: -1}
			h.Push(x)
			live = append(live, x)
		case op < 6:
			x := h.Pop()
			for _, y := range live {
				if y.key < x.key {
					t.Fatalf("step %d: popped %d with %d still in", step, x.key, y.key)
				}
			}
			if x.idx != -1 {
				t.Fatalf("popped item keeps index %d", x.idx)
			}
			live = slices.DeleteFunc(live, func(y *item) bool { return y == x })
		case op < 8:
			x := live[r.IntN(len(live))]
			if !h.Remove(x) || x.idx != -1 || h.Remove(x) {
				t.Fatalf("step %d: remove", step)
			}
			live = slices.DeleteFunc(live, func(y *item) bool { return y == x })
		default:
			x := live[r.IntN(len(live))]
			x.key = r.IntN(1000)
			h.Fix(x)
		}
		if h.Len() != len(live) {
			t.Fatalf("step %d: %d items, want %d", step, h.Len(), len(live))
		}
		check(t, &h)
	}
	for _, x := range h.Items() {
		x.key = -x.key
	}
	h.Init()
	check(t, &h)
	prev := -1 << 31
	for h.Len() > 0 {
		x := h.Pop()
		if x.key < prev {
			t.Fatalf("popped %d after %d", x.key, prev)
		}
		prev = x.key
	}
	if h.In(&item{idx: -1}) {
		t.Fatal("an item that was never pushed is in")
	}
}
