package outbox

import "fmt"

// The queue limits. max_queued bounds the unfinished messages (queued,
// in an attempt, or being written by Accept) of the engine, so that a
// backlog cannot grow without end; a request that would pass it gets
// ErrQueueFull. Two refinements keep one key's mail from locking the
// others out of their codes:
//
//   - the auth reserve: mail of the send and bulk lanes is refused once
//     max_queued minus auth_reserve messages are unfinished, while the
//     auth lane (codes, links, alerts) may fill max_queued. A flood of
//     /send mail, however large, leaves auth_reserve places for codes.
//   - max_queued_per_key, when set, bounds the unfinished messages of one
//     tenant (tenantKey), whatever their lane: one key cannot fill the
//     queue for all the others.
//
// Accept counts a request's messages from the moment it takes them;
// the counts fall as messages become final, or leave this instance
// (adopted or dropped batches). A parked batch keeps its messages
// counted, by tenant (parkedBatch.tenants).

// defaultAuthReservePart is the default auth reserve as a part of
// max_queued: a tenth.
const defaultAuthReservePart = 10

// ErrKeyQueueFull is returned by Accept when the request's key has
// max_queued_per_key messages unfinished; it is an ErrQueueFull.
var ErrKeyQueueFull = fmt.Errorf("%w for this key", ErrQueueFull)

// AuthReserveOf is the auth reserve of a config: its AuthReserve, at
// most MaxQueued, or a tenth of MaxQueued when it is 0.
func AuthReserveOf(c *Config) int {
	if c.AuthReserve > 0 {
		return min(c.AuthReserve, c.MaxQueued)
	}
	return c.MaxQueued / defaultAuthReservePart
}

// admitLocked reports ErrQueueFull (or ErrKeyQueueFull) when msgs do not
// fit in the queue limits.
func (e *Engine) admitLocked(cfg *Config, msgs []*NewMessage) error {
	if cfg.MaxQueued > 0 {
		limit := cfg.MaxQueued
		for _, m := range msgs {
			if laneOf(&State{Flow: m.Flow, Priority: m.Priority}) != laneAuth {
				limit -= AuthReserveOf(cfg)
				break
			}
		}
		if e.nonFinal+e.reserved+len(msgs) > limit {
			return ErrQueueFull
		}
	}
	if cfg.MaxQueuedPerKey > 0 {
		// a request holds one key's messages; the engine does not rely on it
		need := make(map[string]int, 1)
		for _, m := range msgs {
			need[tenantKey(m.Tenant, m.KeyID)]++
		}
		for k, n := range need {
			if e.unfinished[k]+n > cfg.MaxQueuedPerKey {
				return ErrKeyQueueFull
			}
		}
	}
	return nil
}

// countLocked adds d to the unfinished messages of a tenant.
func (e *Engine) countLocked(tenant string, d int) {
	if n := e.unfinished[tenant] + d; n > 0 {
		e.unfinished[tenant] = n
	} else {
		delete(e.unfinished, tenant)
	}
}

// unfinishedLocked adds d to the messages not in a final state, in all
// (nonFinal) and of st's tenant.
func (e *Engine) unfinishedLocked(st *State, d int) {
	e.nonFinal += d
	e.countLocked(tenantKey(st.Tenant, st.KeyID), d)
}

// reserveLocked counts (d 1) or uncounts (d -1) the messages of an
// Accept that are being written.
func (e *Engine) reserveLocked(msgs []*NewMessage, d int) {
	e.reserved += d * len(msgs)
	for _, m := range msgs {
		e.countLocked(tenantKey(m.Tenant, m.KeyID), d)
	}
}

// parkedCountLocked takes a parked batch's queued messages out of the
// counts (it is loaded back, or dropped).
func (e *Engine) parkedCountLocked(pb *parkedBatch) {
	e.nonFinal -= pb.queued
	for k, n := range pb.tenants {
		e.countLocked(k, -n)
	}
}
