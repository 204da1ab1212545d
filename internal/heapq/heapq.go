// Package heapq is a binary min-heap whose items know their position,
// so that an item can be removed or re-ordered in O(log n) without a
// search: the outbox's ready queue, its pending webhooks and its parked
// batches are each one of these.
//
// The order is a type parameter with no state (a struct{} with methods),
// so the zero Heap is ready to use and carries no function values.
package heapq

// Order orders the items of a heap and tells where each keeps its
// position: Index returns a pointer to an int field of the item, which
// the heap sets to the item's place and to -1 when it leaves.
type Order[T any] interface {
	Less(a, b T) bool
	Index(T) *int
}

// Heap is a min-heap of T ordered by O. The zero value is an empty heap.
// It is not safe for concurrent use.
type Heap[T comparable, O Order[T]] struct {
	items []T
}

func (h *Heap[T, O]) order() O {
	var o O
	return o
}

// Len is the number of items.
func (h *Heap[T, O]) Len() int { return len(h.items) }

// Peek returns the least item; the heap must not be empty.
func (h *Heap[T, O]) Peek() T { return h.items[0] }

// Items returns the items in heap order (not sorted); the slice is the
// heap's own, for reading only.
func (h *Heap[T, O]) Items() []T { return h.items }

// In reports whether x is in this heap.
func (h *Heap[T, O]) In(x T) bool {
	i := *h.order().Index(x)
	return i >= 0 && i < len(h.items) && h.items[i] == x
}

// Push adds x.
func (h *Heap[T, O]) Push(x T) {
	h.items = append(h.items, x)
	i := len(h.items) - 1
	*h.order().Index(x) = i
	h.up(i)
}

// Pop removes and returns the least item; the heap must not be empty.
func (h *Heap[T, O]) Pop() T {
	return h.removeAt(0)
}

// Remove takes x out if it is in this heap, and reports whether it was.
func (h *Heap[T, O]) Remove(x T) bool {
	i := *h.order().Index(x)
	if i < 0 || i >= len(h.items) || h.items[i] != x {
		return false
	}
	h.removeAt(i)
	return true
}

// Fix restores the order after x's key changed; it does nothing when x
// is not in this heap.
func (h *Heap[T, O]) Fix(x T) {
	i := *h.order().Index(x)
	if i < 0 || i >= len(h.items) || h.items[i] != x {
		return
	}
	if !h.down(i) {
		h.up(i)
	}
}

// Init restores the order after keys were changed in place.
func (h *Heap[T, O]) Init() {
	for i := len(h.items)/2 - 1; i >= 0; i-- {
		h.down(i)
	}
}

func (h *Heap[T, O]) removeAt(i int) T {
	o := h.order()
	n := len(h.items) - 1
	x := h.items[i]
	if i != n {
		h.swap(i, n)
	}
	var zero T
	h.items[n] = zero
	h.items = h.items[:n]
	if i != n {
		if !h.down(i) {
			h.up(i)
		}
	}
	*o.Index(x) = -1
	return x
}

func (h *Heap[T, O]) swap(i, j int) {
	o := h.order()
	h.items[i], h.items[j] = h.items[j], h.items[i]
	*o.Index(h.items[i]) = i
	*o.Index(h.items[j]) = j
}

func (h *Heap[T, O]) up(j int) {
	o := h.order()
	for j > 0 {
		i := (j - 1) / 2
		if !o.Less(h.items[j], h.items[i]) {
			break
		}
		h.swap(i, j)
		j = i
	}
}

// down sifts item i down and reports whether it moved.
func (h *Heap[T, O]) down(i0 int) bool {
	o := h.order()
	i, n := i0, len(h.items)
	for {
		l := 2*i + 1
		if l >= n {
			break
		}
		j := l
		if r := l + 1; r < n && o.Less(h.items[r], h.items[l]) {
			j = r
		}
		if !o.Less(h.items[j], h.items[i]) {
			break
		}
		h.swap(i, j)
		i = j
	}
	return i > i0
}
