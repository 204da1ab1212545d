package outbox

import (
	"context"
	"encoding/json"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/storagex"
)

// Storage layout of the outbox. Every key lives under authmail/.
//
//	authmail/seg/<batch>             accepted messages of one batch: envelopes
//	                                 and bodies; immutable; deleted when every
//	                                 message of the batch reached a final state
//	authmail/st/<batch>              the batch's message states (no bodies); the
//	                                 status record, kept for `retention`
//	authmail/own/<instance>/<batch>  marks a batch with work left for an instance
//	authmail/inst/<instance>         an instance's heartbeat
//	authmail/dot/<instance>/<process> an engine's dot marks: the attempts whose
//	                                 final dot may be in flight, and the answers
//	                                 to dots whose outcome is not yet in st/
//	                                 (dots.go)
//	authmail/fence/<instance>        an instance's fencing epoch (fence.go), on
//	                                 storages other than Redis; on Redis a raw
//	                                 integer key <key_prefix>/authmail/epoch/<instance>
//	                                 outside the module's directory index
//	authmail/idem/<tenant>/<hash>    idempotency records, kept for idempotency_ttl
//	authmail/codes/<tenant>/<slot>   an issued OTP code: its keyed hash, recipient,
//	                                 purpose, expiry and wrong attempts; the slot is
//	                                 a keyed hash of recipient and purpose, so a new
//	                                 code replaces the old one; deleted when used,
//	                                 or by the janitor an hour after it expired
//	authmail/tokens/<tenant>/<hash>  an issued link token, under its keyed hash:
//	                                 flow, recipient (and old address), expiry;
//	                                 deleted like codes
//	authmail/rl/<instance>           an instance's rate-limit events, and
//	authmail/salt                    the cluster's hashing salt: package
//	                                 internal/ratelimit owns both
//	authmail/pace/...                each SMTP server's cluster-shared send
//	                                 rate: package internal/pace owns it
//
// A message id is its batch id followed by two characters of index, so
// every instance finds a message's state from its id alone.
const (
	KeyRoot = "authmail" // the prefix of internal/ratelimit's keys
	KeySeg  = "authmail/seg/"
	KeySt   = "authmail/st/"
	KeyOwn  = "authmail/own/"
	KeyInst = "authmail/inst/"
	KeyDot  = "authmail/dot/"
	KeyIdem = "authmail/idem/"

	BatchIDLen = 26
	msgIDLen   = BatchIDLen + 2
	maxBatch   = 256 // messages per batch; the index needs 2 base32 chars (1024)
)

// OwnKey is the key of the marker that says instance works on batch.
func OwnKey(instance, batch string) string { return KeyOwn + instance + "/" + batch }

// Message states.
const (
	Queued  = "queued"
	Sending = "sending"
	Sent    = "sent"
	Failed  = "failed"
	Unknown = "unknown"
	// Expired: a code or link that was still queued when it expired;
	// it was not sent
	Expired = "expired"
)

// AllStates are the message states, in the order a message passes them.
var AllStates = []string{Queued, Sending, Sent, Failed, Unknown, Expired}

// IsFinal reports whether a state is final (sent, failed, unknown,
// expired).
func IsFinal(s string) bool {
	return s == Sent || s == Failed || s == Unknown || s == Expired
}

// MessageID builds the id of the idx-th message of a batch.
func MessageID(batch string, idx int) string {
	const digits = "0123456789abcdefghjkmnpqrstvwxyz"
	return batch + string(digits[idx/32]) + string(digits[idx%32])
}

// BatchOf returns the batch id of a message id, or "" if id is malformed.
func BatchOf(id string) string {
	if len(id) != msgIDLen {
		return ""
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z') || c == 'i' || c == 'l' || c == 'o' || c == 'u' {
			return ""
		}
	}
	return id[:BatchIDLen]
}

// StoredMessage is one accepted message as written to authmail/seg.
type StoredMessage struct {
	ID   string   `json:"id"`
	From string   `json:"from"`
	To   []string `json:"to"`
	Data []byte   `json:"data"`
}

// Segment is the content of authmail/seg/<batch>.
type Segment struct {
	Batch    string          `json:"batch"`
	Owner    string          `json:"owner"`
	Created  time.Time       `json:"created"`
	Messages []StoredMessage `json:"messages"`
	// States holds the initial state of every message, so that a batch
	// without an st object is fully described.
	States []State `json:"states"`
}

// State is the persistent state of one message: authmail/st holds one
// per message of a batch.
type State struct {
	ID         string `json:"id"`
	KeyID      string `json:"key_id"`
	Flow       string `json:"flow"`
	Profile    string `json:"profile"`
	MessageID  string `json:"message_id"`
	Recipients int    `json:"recipients"`
	// Tenant is the tenantOf of the key that created the message: only
	// that key may read its status. Empty in records written before
	// tenants existed.
	Tenant string `json:"tenant,omitempty"`
	// Rcpts are the recipients as logged: a salted hash and the domain
	// ("3f2a…@example.com"), or the addresses with log_recipients.
	Rcpts        []string  `json:"rcpts,omitempty"`
	Status       string    `json:"status"`
	Attempts     int       `json:"attempts"`
	Created      time.Time `json:"created"`
	Updated      time.Time `json:"updated"`
	NextAt       time.Time `json:"next_at,omitzero"`
	SentAt       time.Time `json:"sent_at,omitzero"`
	LastCode     string    `json:"last_code,omitempty"`
	LastError    string    `json:"last_error,omitempty"`
	SMTPResponse string    `json:"smtp_response,omitempty"`
	// ExpiresAt, for a message that carries a code or a link, is when it
	// expires (expires_in_minutes after it was accepted): a message still
	// queued then is not sent but made expired. Zero for other messages.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Priority is "bulk" for /send mail that asked to step aside (the
	// bulk lane, lanes.go); empty otherwise.
	Priority string `json:"priority,omitempty"`
	// Webhook is set (URL not empty) when the caller asked for a webhook.
	// It is a value, so that copies of a msgState are snapshots.
	Webhook WebhookState `json:"webhook,omitzero"`
}

// OwnedBy reports whether the key with this id and tenant created the
// message. A record without a tenant was written by a version that
// scoped by key id only; it is matched by key id, as it was then: such
// records are kept at most `retention` (7 days) after their batch is
// final, and refusing them would answer "not found" for messages still in
// flight across an upgrade. Every record written since names its tenant.
func (m State) OwnedBy(keyID, tenant string) bool {
	if m.Tenant == "" {
		return m.KeyID == keyID
	}
	return m.Tenant == tenant
}

// BatchState is the content of authmail/st/<batch>.
type BatchState struct {
	Batch    string    `json:"batch"`
	Owner    string    `json:"owner"`
	Updated  time.Time `json:"updated"`
	Done     bool      `json:"done"`
	Messages []State   `json:"messages"`
}

// Message returns the state of the batch's message id.
func (bs *BatchState) Message(id string) (State, bool) {
	for _, m := range bs.Messages {
		if m.ID == id {
			return m, true
		}
	}
	return State{}, false
}

// store wraps the Caddy storage with the outbox's encodings.
type store struct {
	s certmagic.Storage
}

func (st store) putJSON(ctx context.Context, key string, v any) error {
	return PutJSON(ctx, st.s, key, v)
}
func (st store) getJSON(ctx context.Context, key string, v any) error {
	return GetJSON(ctx, st.s, key, v)
}

// PutJSON stores v, JSON-encoded, under key.
func PutJSON(ctx context.Context, s certmagic.Storage, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.Store(ctx, key, b)
}

// GetJSON loads key and decodes it into v; a missing key is an error for
// which IsNotExist is true.
func GetJSON(ctx context.Context, s certmagic.Storage, key string, v any) error {
	b, err := s.Load(ctx, key)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// IsNotExist reports whether err means the key does not exist.
func IsNotExist(err error) bool { return storagex.NotExist(err) }

func (st store) loadSegment(ctx context.Context, batch string) (*Segment, error) {
	var seg Segment
	if err := st.getJSON(ctx, KeySeg+batch, &seg); err != nil {
		return nil, err
	}
	return &seg, nil
}

// loadState returns the batch's states: the st object if there is one,
// else the initial states from the segment.
func (st store) loadState(ctx context.Context, batch string) (*BatchState, error) {
	var bs BatchState
	err := st.getJSON(ctx, KeySt+batch, &bs)
	if err == nil {
		return &bs, nil
	}
	if !IsNotExist(err) {
		return nil, err
	}
	seg, err := st.loadSegment(ctx, batch)
	if err != nil {
		return nil, err
	}
	return &BatchState{Batch: batch, Owner: seg.Owner, Updated: seg.Created, Messages: seg.States}, nil
}

// ownedBatches lists the batches an instance has work for.
func (st store) ownedBatches(ctx context.Context, instance string) ([]string, error) {
	keys, err := st.list(ctx, KeyOwn+instance)
	out := make([]string, 0, len(keys))
	for _, k := range keys {
		if b := path.Base(k); len(b) == BatchIDLen {
			out = append(out, b)
		}
	}
	return out, err
}

// list lists the keys directly below dir (storagex.List).
func (st store) list(ctx context.Context, dir string) ([]string, error) {
	return storagex.List(ctx, st.s, dir)
}

// StorageTempName reports whether a listed name is a file storage's
// write in progress (storagex.TempName): instance ids are UUIDs and
// batch ids have 26 characters, so no real name consists of digits only.
func StorageTempName(name string) bool { return storagex.TempName(name) }

// Heartbeat is the content of authmail/inst/<instance>.
type Heartbeat struct {
	Instance string    `json:"instance"`
	Updated  time.Time `json:"updated"`
	// AdoptedBy is set when another instance took over this one's work.
	AdoptedBy string `json:"adopted_by,omitempty"`
	// Process is the writing engine's nonce, and Proc where it runs: a
	// second process with the same instance id tells them apart (see
	// identity.go).
	Process string      `json:"process,omitempty"`
	Proc    hostProcess `json:"proc,omitzero"`
}

func (st store) instances(ctx context.Context) ([]string, error) {
	keys, err := st.list(ctx, strings.TrimSuffix(KeyInst, "/"))
	if err != nil {
		return nil, err
	}
	// instances that own work but never wrote a heartbeat count too
	owners, err := st.list(ctx, strings.TrimSuffix(KeyOwn, "/"))
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, k := range append(keys, owners...) {
		id := path.Base(k)
		if StorageTempName(id) {
			continue
		}
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out, nil
}

// StorageIdentity names a storage for the engine pool: the same storage
// configuration, across reloads, gives the same engine.
func StorageIdentity(s certmagic.Storage) string {
	if str, ok := s.(fmt.Stringer); ok {
		return fmt.Sprintf("%T:%s", s, str.String())
	}
	if fsys, ok := s.(*certmagic.FileStorage); ok {
		return "file:" + fsys.Path
	}
	return fmt.Sprintf("%T", s)
}
