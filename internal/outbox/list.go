package outbox

import (
	"context"
	"path"
	"slices"
	"strings"
	"time"
)

// ListQuery is a parsed GET /messages query.
type ListQuery struct {
	Status, Flow string
	Since        time.Time
	Limit        int
	After        string // list ids below this one (the cursor)
	// May reports whether the caller may see a message: the tenant
	// boundary is the caller's, not the engine's. Required.
	May func(State) bool
}

// ListMessages returns the messages the query may see, newest first,
// and the id to continue below ("" at the end). That id may be one the
// caller may not see (the last batch the budget read): the caller must
// not hand it out as it is. Its cost is bounded: it
// lists the names of the state records (no content), sorts them (Caddy
// storage lists in no order; batch ids are time-ordered), and reads at
// most 2×limit batch states — the page and one more page of messages the
// filters or the tenant left out. When that budget runs out first the
// page is shorter than limit and next_cursor continues the scan. A batch
// accepted on another instance whose first state write is still pending
// (its state lives only beside its bodies, in the segment) is not read;
// it shows once its first attempt is recorded.
func (e *Engine) ListMessages(ctx context.Context, q ListQuery) ([]State, string, error) {
	keys, err := e.st.list(ctx, strings.TrimSuffix(KeySt, "/"))
	if err != nil {
		return nil, "", err
	}
	names := make([]string, 0, len(keys))
	for _, k := range keys {
		if b := path.Base(k); len(b) == BatchIDLen && !StorageTempName(b) {
			names = append(names, b)
		}
	}
	e.mu.Lock()
	for bid := range e.batches {
		names = append(names, bid)
	}
	e.mu.Unlock()
	slices.Sort(names)
	names = slices.Compact(names)
	slices.Reverse(names)
	var out []State
	reads := 0
	for i, bid := range names {
		if q.After != "" && MessageID(bid, 0) >= q.After {
			continue // every id of this batch is at or above the cursor
		}
		if reads == 2*q.Limit {
			// the budget is spent: continue below the last batch read
			return out, MessageID(names[i-1], 0), nil
		}
		reads++
		msgs, err := e.BatchStates(ctx, bid)
		if err != nil {
			return nil, "", err
		}
		slices.SortFunc(msgs, func(a, b State) int { return strings.Compare(b.ID, a.ID) })
		older := len(msgs) > 0
		for j, m := range msgs {
			if !q.Since.IsZero() && !m.Created.Before(q.Since) {
				older = false
			}
			if q.After != "" && m.ID >= q.After {
				continue
			}
			if !q.May(m) || q.Status != "" && m.Status != q.Status ||
				q.Flow != "" && m.Flow != q.Flow || !q.Since.IsZero() && m.Created.Before(q.Since) {
				continue
			}
			out = append(out, m)
			if len(out) == q.Limit {
				if j < len(msgs)-1 || i < len(names)-1 {
					return out, m.ID, nil
				}
				return out, "", nil
			}
		}
		if !q.Since.IsZero() && older {
			// batch ids are time-ordered: every batch below is older too
			return out, "", nil
		}
	}
	return out, "", nil
}

// BatchStates reads a batch's message states: from memory when this
// instance works on it, else its state record. Never the segment, which
// holds the bodies.
func (e *Engine) BatchStates(ctx context.Context, bid string) ([]State, error) {
	e.mu.Lock()
	if b := e.batches[bid]; b != nil {
		out := make([]State, len(b.entries))
		for i, en := range b.entries {
			out[i] = en.st
		}
		e.mu.Unlock()
		return out, nil
	}
	e.mu.Unlock()
	var bs BatchState
	if err := e.st.getJSON(ctx, KeySt+bid, &bs); err != nil {
		if IsNotExist(err) {
			return nil, nil // retired by the janitor meanwhile
		}
		return nil, err
	}
	return bs.Messages, nil
}
