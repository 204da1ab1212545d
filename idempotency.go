package authmail

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// idemRecord is stored at authmail/idem/<tenant>/<sha256 of the key>,
// the tenant being the API key's tenantOf.
//
// Records written before tenants existed sit under the key id instead
// (authmail/idem/<key id>/…) and are not read: reading them would let any
// key of the same id replay them, which is the hole tenants close. They
// expire with idempotency_ttl (the janitor deletes them like any other);
// meanwhile a retry that crosses the upgrade with a pre-upgrade
// Idempotency-Key is accepted as a new request, so it may send a second
// message.
type idemRecord struct {
	RequestHash string    `json:"request_hash"`
	ID          string    `json:"id"`    // the message id reserved for the request
	State       string    `json:"state"` // pending, done
	Status      int       `json:"status,omitempty"`
	Body        []byte    `json:"body,omitempty"`
	Location    string    `json:"location,omitempty"`
	Created     time.Time `json:"created"`
}

// checkIdempotencyKey validates an Idempotency-Key header value: 1 to
// 255 visible ASCII characters.
func checkIdempotencyKey(v string) *apiError {
	bad := &apiError{Status: http.StatusBadRequest, Code: "invalid_idempotency_key",
		Message: "Idempotency-Key must be 1 to 255 visible ASCII characters"}
	if len(v) == 0 || len(v) > 255 {
		return bad
	}
	for i := 0; i < len(v); i++ {
		if v[i] < 0x21 || v[i] > 0x7e {
			return bad
		}
	}
	return nil
}

// keyedMutex serialises requests with the same idempotency key inside
// this process, so concurrent duplicates wait for the first instead of
// contending for the storage lock.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyedLock
}

type keyedLock struct {
	mu   chan struct{} // holds a token while locked
	refs int
}

func (k *keyedMutex) lock(key string) func() {
	unlock, _ := k.lockCtx(context.Background(), key)
	return unlock
}

// lockCtx is lock that gives up when ctx is done: a request waits for
// another with the same key within its storage deadline only.
func (k *keyedMutex) lockCtx(ctx context.Context, key string) (func(), error) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyedLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyedLock{mu: make(chan struct{}, 1)}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()
	deref := func() {
		k.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
	select {
	case l.mu <- struct{}{}:
	case <-ctx.Done():
		deref()
		return nil, ctx.Err()
	}
	return func() {
		<-l.mu
		deref()
	}, nil
}

var idemLocks keyedMutex

// apiResponse is a complete answer, so that idempotent requests can
// store and replay it.
type apiResponse struct {
	status   int
	body     []byte
	location string
	// created is true when a message was accepted, i.e. the answer must
	// be replayed for a retry with the same key.
	created bool
	// retryAfter, when set, is sent as Retry-After.
	retryAfter string
	replayed   bool
	prefer     string
}

// idempotent runs submit at most once per (tenant, Idempotency-Key)
// across instances and restarts: same key and body replay the stored
// answer, a different body is a 409, and a request that creates no
// message does not consume the key. submit gets the batch id reserved
// for the message, which makes a crash between acceptance and the
// stored answer recoverable without sending twice.
func (h *Handler) idempotent(ctx context.Context, tenant, idemKey, endpointPath string, body []byte, submit func(batch string) apiResponse) apiResponse {
	sum := sha256.Sum256([]byte(idemKey))
	hash := hex.EncodeToString(sum[:])
	reqSum := sha256.Sum256(append([]byte(endpointPath+"\x00"), body...))
	reqHash := hex.EncodeToString(reqSum[:])
	key := outbox.KeyIdem + tenant + "/" + hash

	unlock, err := idemLocks.lockCtx(ctx, key)
	if err != nil {
		return errorAnswer(http.StatusServiceUnavailable, "outbox_unavailable", "another request with this Idempotency-Key is still in progress; retry later")
	}
	held := true
	defer func() {
		if held {
			unlock()
		}
	}()
	st := h.shared.st
	if resp, ok := h.replayDone(ctx, key, reqHash); ok {
		return resp
	}
	lockName := "authmail_idem_" + tenant + "_" + hash
	// a concurrent duplicate on another instance waits for the first
	// request, within this request's storage deadline (storageTimeout):
	// past it, it is answered 503 and its retry replays the first's answer
	lctx, cancel := context.WithTimeout(ctx, maxPreferWait+30*time.Second)
	defer cancel()
	if err := st.s.Lock(lctx, lockName); err != nil {
		h.logger.Error("locking an idempotency record failed", zap.Error(err))
		return errorAnswer(http.StatusServiceUnavailable, "outbox_unavailable", "the idempotency record could not be locked; retry later")
	}
	// A write of the record (the pending record, or its delete) that
	// outlasts the deadline is answered 503 but may still land. Were the
	// locks released meanwhile, a retry could write its own record, have
	// its message accepted and its answer stored, and the late write
	// would then overwrite (or delete) that answer: the next retry would
	// send a second message. So the locks, the storage's and this
	// process's, are kept until every such write has returned: a retry
	// waits for it (and is answered 503 until then). What remains is a
	// write the storage applies after its call returned an error, or
	// after the lock expired (Redis's after 5 s without renewal), the
	// same limit as the fenced writes' (docs/cluster.md).
	var inflight sync.WaitGroup
	stalled := false
	write := func(ctx context.Context, fn func(ctx context.Context) error) error {
		inflight.Add(1)
		_, err := bounded(ctx, func(ctx context.Context) (struct{}, error) { return struct{}{}, fn(ctx) },
			func(struct{}, error) { inflight.Done() })
		if err != nil && ctx.Err() != nil {
			stalled = true
		}
		return err
	}
	defer func() {
		held = false
		release := func() {
			uctx, cancel := withStorageDeadline(context.Background())
			_ = st.s.Unlock(uctx, lockName)
			cancel()
			unlock()
		}
		if stalled {
			go func() { inflight.Wait(); release() }()
			return
		}
		release()
	}()

	var rec idemRecord
	err = st.getJSON(lctx, key, &rec)
	found := err == nil && time.Since(rec.Created) < h.engine.Config().IdemTTL
	if err != nil && !outbox.IsNotExist(err) {
		h.logger.Error("reading an idempotency record failed", zap.Error(err))
		return errorAnswer(http.StatusServiceUnavailable, "outbox_unavailable", "the idempotency record could not be read; retry later")
	}
	if found {
		if rec.RequestHash != reqHash {
			return errorAnswer(http.StatusConflict, "idempotency_conflict", "this Idempotency-Key was used with a different request")
		}
		if rec.State == "done" {
			return apiResponse{status: rec.Status, body: rec.Body, location: rec.Location, created: true, replayed: true}
		}
		// pending: an earlier attempt stopped between reserving the id and
		// storing its answer. If the message was accepted, answer for it;
		// otherwise accept it now under the reserved id.
		state, ok, lerr := h.lookup(lctx, rec.ID)
		if lerr != nil {
			// not knowing whether the message exists, accepting it again
			// could send it twice
			h.logger.Error("reading the message of a pending idempotency record failed", zap.Error(lerr))
			return errorAnswer(http.StatusServiceUnavailable, "outbox_unavailable", "the idempotency record's message could not be read; retry later")
		}
		if ok {
			resp := h.answerFor([]outbox.State{state})
			h.storeIdem(key, rec, resp)
			resp.replayed = true
			return resp
		}
	} else {
		rec = idemRecord{RequestHash: reqHash, ID: outbox.MessageID(outbox.NewID(time.Now()), 0), State: "pending", Created: time.Now()}
		// the raw storage: write bounds the call and tracks it
		if err := write(lctx, func(ctx context.Context) error { return outbox.PutJSON(ctx, h.shared.live, key, rec) }); err != nil {
			h.logger.Error("writing an idempotency record failed", zap.Error(err))
			return errorAnswer(http.StatusServiceUnavailable, "outbox_unavailable", "the idempotency record could not be written; retry later")
		}
	}
	resp := submit(outbox.BatchOf(rec.ID))
	if resp.created {
		h.storeIdem(key, rec, resp)
	} else if !found {
		// nothing was created: the key stays unused
		dctx, dcancel := withStorageDeadline(context.Background())
		_ = write(dctx, func(ctx context.Context) error { return h.shared.live.Delete(ctx, key) })
		dcancel()
	}
	return resp
}

// storeIdem records the answer. It has its own deadline (storageTimeout):
// the request's may be spent by a long first attempt, and the answer
// must still land. Past it the request is answered anyway (the message
// is accepted); a write that lands later carries the same answer a
// retry would store, so it is safe whenever it lands.
func (h *Handler) storeIdem(key string, rec idemRecord, resp apiResponse) {
	rec.State, rec.Status, rec.Body, rec.Location = "done", resp.status, resp.body, resp.location
	ctx, cancel := withStorageDeadline(context.Background())
	defer cancel()
	if err := h.shared.st.putJSON(ctx, key, rec); err != nil {
		// the message is accepted; a retry finds the pending record and
		// answers for the same message
		h.logger.Error("writing an idempotency record failed", zap.Error(err))
	}
}
