package authmail

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// The console endpoints: the outbox's message list and retry, and (in
// preview.go) the preview page. They are routed from the same table as
// the others and documented in the OpenAPI document.
//
// Permissions (tenant.go): any key lists and retries its own messages
// (those created with its secret, as GET /messages/{id}); a key with
// `allow admin` also those of its site's keys (every key's on the
// storage with admin_scope storage), and the list names each message's
// key id.
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

// statesList names the states a status filter takes, "queued, … or
// expired", from the engine's own list, so that a state added there is
// never missing from the error.
var statesList = strings.Join(outbox.AllStates[:len(outbox.AllStates)-1], ", ") + " or " + outbox.AllStates[len(outbox.AllStates)-1]

func parseListQuery(key *apiKey, q url.Values) (outbox.ListQuery, *apiError) {
	lq := outbox.ListQuery{Limit: defaultListLimit}
	for k := range q {
		if !slices.Contains([]string{"status", "flow", "since", "limit", "cursor"}, k) {
			if k == "" {
				return lq, invalid("query", "holds a parameter without a name")
			}
			return lq, invalid(k, "is not a parameter of /messages (status, flow, since, limit, cursor)")
		}
	}
	if v := q.Get("status"); v != "" {
		if !slices.Contains(outbox.AllStates, v) {
			return lq, invalid("status", "must be %s", statesList)
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
		pos, err := openCursor(key, v)
		if err != nil {
			return lq, invalid("cursor", "is not a cursor from a /messages answer to this key")
		}
		lq.After = pos
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

// listMessages is the engine's ListMessages of the messages key may see
// (sees), answered by ctx's deadline (bounded): GET /messages and the
// preview page's outbox tab.
func (h *Handler) listMessages(ctx context.Context, key *apiKey, q outbox.ListQuery) ([]outbox.State, string, error) {
	q.May = func(m outbox.State) bool { return h.sees(key, m) }
	type page struct {
		states []outbox.State
		next   string
	}
	pg, err := bounded(ctx, func(ctx context.Context) (page, error) {
		states, next, err := h.engine.ListMessages(ctx, q)
		return page{states, next}, err
	}, nil)
	return pg.states, pg.next, err
}

func (h *Handler) serveMessages(w http.ResponseWriter, r *http.Request, rc *requestCtx, key *apiKey) error {
	lq, aerr := parseListQuery(key, r.URL.Query())
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	admin := key.allow["admin"]
	states, next, err := h.listMessages(r.Context(), key, lq)
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
		if admin {
			it.KeyID = st.KeyID
		}
		out.Messages = append(out.Messages, it)
	}
	if next != "" {
		c := sealCursor(key, next)
		out.NextCursor = &c
	}
	rc.setStatus("ok", "")
	return writeJSON(w, http.StatusOK, out)
}

// retryResponse is the answer of POST /messages/{id}/retry.
type retryResponse struct {
	statusResponse
	Warning string `json:"warning,omitempty"`
}

func (h *Handler) serveRetry(w http.ResponseWriter, r *http.Request, rc *requestCtx, key *apiKey, id string) error {
	prev, _, _ := h.lookup(r.Context(), id)
	may := func(m outbox.State) bool { return h.sees(key, m) }
	// a requeue that outlasts the deadline is answered 503 and may still
	// take effect: the message is then queued once more, as asked, and a
	// second retry is refused (409 not_retryable) while it is queued
	type requeued struct {
		st outbox.State
		ok bool
	}
	rq, err := bounded(r.Context(), func(ctx context.Context) (requeued, error) {
		st, ok, err := h.engine.Requeue(ctx, id, may)
		return requeued{st, ok}, err
	}, nil)
	st, ok := rq.st, rq.ok
	switch {
	case !ok && err == nil:
		return h.reject(w, rc, &apiError{Status: http.StatusNotFound, Code: "not_found", Message: "no message with this id for this key"})
	case errors.Is(err, outbox.ErrNotRetryable):
		return h.reject(w, rc, &apiError{Status: http.StatusConflict, Code: "not_retryable",
			Message: "the message is " + st.Status + "; only a failed or unknown message can be retried"})
	case errors.Is(err, outbox.ErrRetryElsewhere):
		w.Header().Set("Retry-After", "5")
		return h.reject(w, rc, &apiError{Status: http.StatusConflict, Code: "retry_later",
			Message: "the message's batch still has work in progress (other messages, or its webhook); retry later"})
	case errors.Is(err, outbox.ErrBodyGone):
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
	if prev.Status == outbox.Unknown {
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
