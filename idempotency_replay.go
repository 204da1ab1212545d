package authmail

import (
	"context"
	"net/http"
	"time"
)

// replayDone answers a request whose idempotency record is complete
// without taking the record's storage lock.
//
// Why: a contended storage lock is polled about once a second (certmagic's
// file storage and the Redis module both), so a retry that meets another
// instance holding the lock waits up to a second. Same-key requests of one
// process are already serialised by idemLocks before the storage lock, so
// the storage lock is only ever contended across instances; and a
// complete ("done") record never changes until it expires, so its stored
// answer (or a 409 for a different request) can be given from one Load.
// A pending or absent record still goes through the lock: only the lock
// makes a concurrent duplicate on another instance wait for the first.
// Any error here (the record unreadable) falls back to the locked path,
// which reports it.
func (h *Handler) replayDone(ctx context.Context, key, reqHash string) (apiResponse, bool) {
	var rec idemRecord
	if err := h.shared.st.getJSON(ctx, key, &rec); err != nil {
		return apiResponse{}, false
	}
	if rec.State != "done" || time.Since(rec.Created) >= h.engine.Config().IdemTTL {
		return apiResponse{}, false
	}
	if rec.RequestHash != reqHash {
		return errorAnswer(http.StatusConflict, "idempotency_conflict", "this Idempotency-Key was used with a different request"), true
	}
	return apiResponse{status: rec.Status, body: rec.Body, location: rec.Location, created: true, replayed: true}, true
}
