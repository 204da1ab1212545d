package authmail

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
)

// The console endpoints: the outbox's message list and retry, and (in
// preview.go) the preview page. They are routed from the same table as
// the others and documented in the OpenAPI document.
//
// Permissions: any key lists and retries its own messages (those created
// with its secret, as GET /messages/{id}); a key with `allow admin` sees
// and retries every key's, and the list names each message's key id.
const (
	kindMessages endpointKind = 101 + iota
	kindRetry
)

var (
	messagesEndpoint = &endpoint{path: "/messages", flow: "messages", kind: kindMessages}
	retryEndpoint    = &endpoint{path: "/messages/{id}/retry", flow: "retry", kind: kindRetry}
)

func init() {
	endpoints[messagesEndpoint.path] = messagesEndpoint
	extraEndpoints = append(extraEndpoints, retryEndpoint)
	pathTemplates[kindRetry] = retryEndpoint.path
}

// consoleGET reports the console kinds answered to GET and HEAD.
func consoleGET(k endpointKind) bool {
	return k == kindMessages || k == kindPreview || k == kindPreviewFile
}

// lookupConsole routes the console paths that carry a parameter.
func lookupConsole(rest string) (*endpoint, string) {
	if p, ok := strings.CutPrefix(rest, "/messages/"); ok {
		if id, ok := strings.CutSuffix(p, "/retry"); ok && id != "" && !strings.Contains(id, "/") {
			return retryEndpoint, id
		}
	}
	if f, ok := strings.CutPrefix(rest, "/preview/"); ok && f != "" && !strings.Contains(f, "/") {
		return previewFileEndpoint, f
	}
	return nil, ""
}

// serveConsole answers the console endpoints after authentication.
func (h *Handler) serveConsole(w http.ResponseWriter, r *http.Request, rc *requestCtx, ep *endpoint, key *apiKey, arg string) error {
	switch ep.kind {
	case kindMessages:
		return h.serveMessages(w, r, rc, key)
	case kindRetry:
		return h.serveRetry(w, r, rc, key, arg)
	}
	return h.servePreview(w, r, rc, ep, key, arg)
}

const (
	defaultListLimit = 50
	maxListLimit     = 200
)

// ListQuery is a parsed GET /messages query.
type ListQuery struct {
	Status, Flow string
	Since        time.Time
	Limit        int
	After        string // list ids below this one (the cursor)
	All          bool   // an admin key: every tenant's messages
	KeyID        string
	Tenant       string
}

func parseListQuery(q url.Values) (ListQuery, *apiError) {
	lq := ListQuery{Limit: defaultListLimit}
	for k := range q {
		if !slices.Contains([]string{"status", "flow", "since", "limit", "cursor"}, k) {
			if k == "" {
				return lq, invalid("query", "holds a parameter without a name")
			}
			return lq, invalid(k, "is not a parameter of /messages (status, flow, since, limit, cursor)")
		}
	}
	if v := q.Get("status"); v != "" {
		if !slices.Contains(AllStates, v) {
			return lq, invalid("status", "must be queued, sending, sent, failed or unknown")
		}
		lq.Status = v
	}
	if v := q.Get("flow"); v != "" {
		if len(v) > 64 || !saneToken(v) {
			return lq, invalid("flow", "must be a flow name such as otp")
		}
		lq.Flow = v
	}
	if v := q.Get("since"); v != "" {
		t, err := time.Parse(time.RFC3339, strings.ToUpper(v))
		if err != nil {
			return lq, invalid("since", "must be an RFC 3339 timestamp such as 2026-01-02T15:04:05Z")
		}
		lq.Since = t
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxListLimit {
			return lq, invalid("limit", "must be between 1 and %d", maxListLimit)
		}
		lq.Limit = n
	}
	if v := q.Get("cursor"); v != "" {
		b, err := base64.RawURLEncoding.DecodeString(v)
		if err != nil || BatchOf(string(b)) == "" {
			return lq, invalid("cursor", "is not a cursor from a /messages answer")
		}
		lq.After = string(b)
	}
	return lq, nil
}

// listItem is one message of the list: its state, never its body.
type listItem struct {
	ID            string   `json:"id"`
	Status        string   `json:"status"`
	Flow          string   `json:"flow"`
	Attempts      int      `json:"attempts"`
	CreatedAt     string   `json:"created_at"`
	UpdatedAt     string   `json:"updated_at"`
	MessageID     string   `json:"message_id"`
	Recipients    int      `json:"recipients"`
	Rcpts         []string `json:"rcpts"`
	LastErrorCode *string  `json:"last_error_code"`
	LastError     *string  `json:"last_error"`
	KeyID         string   `json:"key_id,omitempty"`
}

type listResponse struct {
	Messages   []listItem `json:"messages"`
	NextCursor *string    `json:"next_cursor"`
}

func (h *Handler) serveMessages(w http.ResponseWriter, r *http.Request, rc *requestCtx, key *apiKey) error {
	lq, aerr := parseListQuery(r.URL.Query())
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	lq.All, lq.KeyID, lq.Tenant = key.allow["admin"], key.id, key.tenant
	states, next, err := h.engine.ListMessages(r.Context(), lq)
	if err != nil {
		h.logger.Error("listing messages failed", zap.Error(err))
		return h.reject(w, rc, &apiError{Status: http.StatusServiceUnavailable, Code: "outbox_unavailable",
			Message: "the message states could not be read; retry later"})
	}
	out := listResponse{Messages: make([]listItem, 0, len(states))}
	for _, st := range states {
		s := statusOf(st)
		it := listItem{ID: st.ID, Status: st.Status, Flow: st.Flow, Attempts: st.Attempts, CreatedAt: s.CreatedAt,
			UpdatedAt: s.UpdatedAt, MessageID: st.MessageID, Recipients: st.Recipients, Rcpts: st.Rcpts,
			LastErrorCode: s.LastErrorCode, LastError: s.LastError}
		if it.Rcpts == nil {
			it.Rcpts = []string{}
		}
		if lq.All {
			it.KeyID = st.KeyID
		}
		out.Messages = append(out.Messages, it)
	}
	if next != "" {
		c := base64.RawURLEncoding.EncodeToString([]byte(next))
		out.NextCursor = &c
	}
	rc.setStatus("ok", "")
	return writeJSON(w, http.StatusOK, out)
}

// ListMessages returns the messages the query may see, newest first,
// and the id to continue below ("" at the end). Its cost is bounded: it
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
			if !q.All && !m.OwnedBy(q.KeyID, q.Tenant) || q.Status != "" && m.Status != q.Status ||
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

// retryResponse is the answer of POST /messages/{id}/retry.
type retryResponse struct {
	statusResponse
	Warning string `json:"warning,omitempty"`
}

func (h *Handler) serveRetry(w http.ResponseWriter, r *http.Request, rc *requestCtx, key *apiKey, id string) error {
	prev, _, _ := h.engine.Lookup(r.Context(), id)
	may := func(m State) bool { return key.allow["admin"] || m.OwnedBy(key.id, key.tenant) }
	st, ok, err := h.engine.Requeue(r.Context(), id, may)
	switch {
	case !ok && err == nil:
		return h.reject(w, rc, &apiError{Status: http.StatusNotFound, Code: "not_found", Message: "no message with this id for this key"})
	case errors.Is(err, ErrNotRetryable):
		return h.reject(w, rc, &apiError{Status: http.StatusConflict, Code: "not_retryable",
			Message: "the message is " + st.Status + "; only a failed or unknown message can be retried"})
	case errors.Is(err, ErrRetryElsewhere):
		w.Header().Set("Retry-After", "5")
		return h.reject(w, rc, &apiError{Status: http.StatusConflict, Code: "retry_later",
			Message: "the message's batch still has work in progress (other messages, or its webhook); retry later"})
	case errors.Is(err, ErrBodyGone):
		return h.reject(w, rc, &apiError{Status: http.StatusGone, Code: "body_gone",
			Message: "the message body is gone: bodies are kept for delivery replay_window after a message is final; send it again"})
	case err != nil:
		h.logger.Error("requeueing a message failed", zap.String("id", id), zap.Error(err))
		return h.reject(w, rc, &apiError{Status: http.StatusServiceUnavailable, Code: "outbox_unavailable",
			Message: "the message could not be requeued; retry later"})
	}
	rc.id, rc.messageID = st.ID, st.MessageID
	rc.setStatus(st.Status, "")
	resp := retryResponse{statusResponse: statusOf(st)}
	if prev.Status == Unknown {
		resp.Warning = "the last attempt's outcome was unknown: the server may have accepted it, so the recipient may get this message twice"
	}
	if viaBrowserForm(r) {
		// the preview page's retry button: back to the page
		w.Header().Set("Location", strings.TrimSuffix(h.prefix, "/")+"/preview#outbox")
		w.WriteHeader(http.StatusSeeOther)
		return nil
	}
	w.Header().Set("Location", h.statusPath(st.ID))
	return writeJSON(w, http.StatusAccepted, resp)
}
