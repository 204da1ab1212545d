package authmail

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// Codes configures the one-time codes and link tokens that authmail
// issues itself ("code": "auto" on /send/otp, "token": "auto" on the link
// flows) and checks at /verify/otp and /verify/token, so that apps need
// no cryptography of their own. Storage keeps only keyed hashes of them.
type Codes struct {
	// Issue makes /send/otp issue a code for every request that gives
	// none, as if it said "code": "auto". Default: false, so a request
	// without a code is refused and only "code": "auto" issues one.
	Issue bool `json:"issue,omitempty"`

	// Secret keys the HMAC-SHA256 hashes of issued codes and tokens in
	// storage, so that a copy of the storage reveals neither. At least 16
	// characters; accepts {env.*} and {file.*} placeholders, expanded when
	// the config loads. Changing it invalidates every outstanding code and
	// token. Required.
	Secret string `json:"secret,omitempty"`

	// Length is the number of characters of an issued code, from 4 to
	// 32. Default: 6.
	Length int `json:"length,omitempty"`

	// Alphabet holds the characters of issued codes: 2 to 64 distinct
	// printable ASCII characters, no space. Default: "0123456789".
	Alphabet string `json:"alphabet,omitempty"`
}

const (
	defaultCodeLength   = 6
	defaultCodeAlphabet = "0123456789"
	defaultPurpose      = "login"
	// maxCodeAttempts wrong codes burn a challenge.
	maxCodeAttempts = 5
	// issuedGrace is how long a used-up or expired record stays before
	// the janitor deletes it; until then an expired one answers
	// code_expired rather than not_found.
	issuedGrace = time.Hour
	// autoValue asks authmail to issue the code or token.
	autoValue = "auto"
	// tokenBytes of randomness in an issued link token (256 bits).
	tokenBytes = 32
)

// Storage keys of issued values (see the layout in internal/outbox/store.go).
const (
	keyCodes  = "authmail/codes/"
	keyTokens = "authmail/tokens/"
)

var purposePattern = regexp.MustCompile(`^[a-z0-9_-]{1,32}$`)

// issuedNow is the clock of issued values; tests move it.
var issuedNow = time.Now

func (c *Codes) check() error {
	if c.Secret == "" {
		return errors.New("codes: secret is required; give it as {env.*} or {file.*}")
	}
	if !hasPlaceholder(c.Secret) && len(c.Secret) < minSecretLength {
		return fmt.Errorf("codes: secret is shorter than %d characters", minSecretLength)
	}
	if c.Length != 0 && (c.Length < 4 || c.Length > 32) {
		return fmt.Errorf("codes: length must be between 4 and 32, not %d", c.Length)
	}
	if c.Alphabet != "" {
		if err := checkAlphabet(c.Alphabet); err != nil {
			return err
		}
	}
	return nil
}

func checkAlphabet(a string) error {
	if len(a) < 2 || len(a) > 64 {
		return errors.New("codes: alphabet must have 2 to 64 characters")
	}
	var seen [128]bool
	for i := 0; i < len(a); i++ {
		c := a[i]
		if c <= ' ' || c >= 0x7f {
			return errors.New("codes: alphabet must consist of printable ASCII characters without spaces")
		}
		if seen[c] {
			return fmt.Errorf("codes: alphabet holds '%c' twice", c)
		}
		seen[c] = true
	}
	return nil
}

// issuer issues and hashes codes and tokens for one handler.
type issuer struct {
	issue    bool
	secret   []byte
	length   int
	alphabet string
}

// resolve expands the secret and fills in the defaults; nil when codes
// are not configured. Errors name the placeholder, never the secret.
func (c *Codes) resolve(repl *caddy.Replacer, logger *zap.Logger) (*issuer, error) {
	if c == nil {
		return nil, nil
	}
	if err := c.check(); err != nil {
		return nil, err
	}
	secret, err := expandSecret(repl, "codes secret", c.Secret)
	if err != nil {
		return nil, err
	}
	if len(secret) < minSecretLength {
		return nil, fmt.Errorf("codes: secret is shorter than %d characters", minSecretLength)
	}
	if !hasPlaceholder(c.Secret) {
		logger.Warn("codes secret is written literally in the config; use {env.*} or {file.*} so that it does not appear in the JSON config")
	}
	is := &issuer{issue: c.Issue, secret: []byte(secret), length: c.Length, alphabet: c.Alphabet}
	if is.length == 0 {
		is.length = defaultCodeLength
	}
	if is.alphabet == "" {
		is.alphabet = defaultCodeAlphabet
	}
	return is, nil
}

// newCode draws a code uniformly from the alphabet: random bytes at or
// above the largest multiple of the alphabet's size are rejected, so
// that the modulo favours no character.
func (is *issuer) newCode() string {
	n := len(is.alphabet)
	limit := 256 - 256%n
	out := make([]byte, 0, is.length)
	buf := make([]byte, 2*is.length)
	for len(out) < is.length {
		_, _ = rand.Read(buf) // never fails (crypto/rand crashes the program instead)
		for _, b := range buf {
			if int(b) < limit && len(out) < is.length {
				out = append(out, is.alphabet[int(b)%n])
			}
		}
	}
	return string(out)
}

// newToken returns a URL-safe token of 256 random bits.
func newToken() string {
	b := make([]byte, tokenBytes)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// mac is HMAC-SHA256 over length-prefixed parts, so that no two
// different part lists hash alike.
func (is *issuer) mac(parts ...string) []byte {
	m := hmac.New(sha256.New, is.secret)
	var n [8]byte
	for _, p := range parts {
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		m.Write(n[:])
		m.Write([]byte(p))
	}
	return m.Sum(nil)
}

// issuedValue is a code or token a request asked authmail to issue. The
// value itself lives only in memory (and in the mail); storage gets its
// hash when the message is accepted.
type issuedValue struct {
	otp      bool   // a code (true) or a link token
	value    string // the code or token
	purpose  string // otp: the caller's label
	flow     string // token: the link flow
	to       string // the recipient's address
	oldEmail string // email-change: the old address
	expiry   time.Duration
	expires  time.Time // set when the record is stored
}

// codeRecord is an issued code at authmail/codes/<tenant>/<slot>. The
// slot is a keyed hash of recipient and purpose, so a new code for them
// overwrites the old one; the nonce tells the challenges apart.
type codeRecord struct {
	Nonce    string    `json:"nonce"`
	Hash     string    `json:"hash"`
	To       string    `json:"to"`
	Purpose  string    `json:"purpose"`
	Expires  time.Time `json:"expires"`
	Failures int       `json:"failures"`
}

// tokenRecord is an issued token at authmail/tokens/<tenant>/<hash>.
type tokenRecord struct {
	Flow     string    `json:"flow"`
	To       string    `json:"to"`
	OldEmail string    `json:"old_email,omitempty"`
	Expires  time.Time `json:"expires"`
}

// issuedExpiry returns the record's expiry; the janitor needs nothing
// else from either kind.
type issuedExpiry struct {
	Expires time.Time `json:"expires"`
}

func (is *issuer) slot(tenant, purpose, to string) []byte {
	return is.mac("slot", tenant, purpose, strings.ToLower(to))[:16]
}

func codePath(tenant string, slot []byte) string {
	return keyCodes + tenant + "/" + hex.EncodeToString(slot)
}

func (is *issuer) codeHash(tenant, slotHex, nonce, code string) string {
	return hex.EncodeToString(is.mac("code", tenant, slotHex, nonce, code))
}

func (is *issuer) tokenPath(tenant, token string) string {
	return keyTokens + tenant + "/" + hex.EncodeToString(is.mac("token", tenant, token))
}

// parseChallenge splits a challenge id into its slot and nonce.
func parseChallenge(id string) (slot []byte, nonce string, ok bool) {
	if len(id) != 43 {
		return nil, "", false
	}
	b, err := base64.RawURLEncoding.DecodeString(id)
	if err != nil || len(b) != 32 {
		return nil, "", false
	}
	return b[:16], hex.EncodeToString(b[16:]), true
}

var issuedLocks keyedMutex

// lockIssued takes the in-process mutex and then the storage lock of a
// record, so that load-check-write or -delete is atomic across the
// engines and instances sharing the storage; the mutex spares requests
// of this process the storage lock's poll. The returned context is not
// cancelled by the client, so a sequence once started completes, but it
// keeps ctx's deadline (the request's storageTimeout): a stalled storage
// ends the sequence as a storage failure.
func (e *shared) lockIssued(ctx context.Context, key string) (context.Context, func(), error) {
	unlock := issuedLocks.lock(e.key + "\x00" + key)
	sum := sha256.Sum256([]byte(key))
	name := "authmail_issued_" + hex.EncodeToString(sum[:16])
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := e.st.s.Lock(lctx, name); err != nil {
		unlock()
		return nil, nil, err
	}
	seq, seqCancel := context.WithoutCancel(ctx), context.CancelFunc(func() {})
	if d, ok := ctx.Deadline(); ok {
		seq, seqCancel = context.WithDeadline(seq, d)
	}
	return seq, func() {
		seqCancel()
		uctx, cancel := withStorageDeadline(context.Background())
		_ = e.st.s.Unlock(uctx, name)
		cancel()
		unlock()
	}, nil
}

// storeIssued writes the hash of an issued value before its message is
// accepted, so that the mail can never arrive before its record. It
// returns the challenge id (codes) and a function that withdraws the
// record when the message is not accepted after all.
func (h *Handler) storeIssued(ctx context.Context, tenant string, v *issuedValue) (string, func(), error) {
	is, e := h.codes, h.shared
	expires := issuedNow().Add(v.expiry).UTC().Truncate(time.Second)
	v.expires = expires
	if !v.otp {
		key := is.tokenPath(tenant, v.value)
		rec := tokenRecord{Flow: v.flow, To: v.to, OldEmail: v.oldEmail, Expires: expires}
		if err := e.st.putJSON(ctx, key, rec); err != nil {
			return "", nil, err
		}
		return "", func() {
			dctx, cancel := withStorageDeadline(context.Background())
			defer cancel()
			_ = e.st.s.Delete(dctx, key)
		}, nil
	}
	slot := is.slot(tenant, v.purpose, v.to)
	nonceB := make([]byte, 16)
	_, _ = rand.Read(nonceB)
	nonce := hex.EncodeToString(nonceB)
	key := codePath(tenant, slot)
	rec := codeRecord{Nonce: nonce, Hash: is.codeHash(tenant, hex.EncodeToString(slot), nonce, v.value),
		To: v.to, Purpose: v.purpose, Expires: expires}
	lctx, unlock, err := e.lockIssued(ctx, key)
	if err != nil {
		return "", nil, err
	}
	err = e.st.putJSON(lctx, key, rec)
	unlock()
	if err != nil {
		return "", nil, err
	}
	withdraw := func() {
		// its own deadline: the request's may be spent by the accept
		wctx, cancel := withStorageDeadline(context.Background())
		defer cancel()
		lctx, unlock, err := e.lockIssued(wctx, key)
		if err != nil {
			return
		}
		defer unlock()
		var cur codeRecord
		// only our own challenge: a newer request may have replaced it
		if e.st.getJSON(lctx, key, &cur) == nil && cur.Nonce == nonce {
			_ = e.st.s.Delete(lctx, key)
		}
	}
	return base64.RawURLEncoding.EncodeToString(append(slot, nonceB...)), withdraw, nil
}

// issuedOf returns the value a request asked authmail to issue, if any.
func issuedOf(msgs []*outMessage) *issuedValue {
	if len(msgs) == 0 {
		return nil
	}
	return msgs[0].issued
}

// submitIssued stores the hash of an issued code or token and submits
// the messages. A code's answer carries its challenge_id and expiry.
// When the message is not accepted (queue full, storage down) the
// record is withdrawn; a code it replaced stays replaced.
func (h *Handler) submitIssued(ctx context.Context, rc *requestCtx, key *apiKey, msgs []*outMessage, envs []*mailer.Envelope, batch string, pref preference) apiResponse {
	v := issuedOf(msgs)
	if v == nil {
		return withLocale(h.submit(rc, msgs, envs, batch, pref), msgs)
	}
	challenge, withdraw, err := h.storeIssued(ctx, key.tenant, v)
	if err != nil {
		h.logger.Error("storing an issued code or token failed", zap.String("flow", msgs[0].flow), zap.Error(err))
		return errorAnswer(http.StatusServiceUnavailable, "outbox_unavailable", "the code or token could not be written to storage; nothing was sent, retry later")
	}
	resp := withLocale(h.submit(rc, msgs, envs, batch, pref), msgs)
	if !resp.created {
		withdraw()
		return resp
	}
	if v.otp {
		resp.body = withJSONField(resp.body, "challenge_id", strconv.Quote(challenge))
		resp.body = withJSONField(resp.body, "expires_at", strconv.Quote(v.expires.Format(time.RFC3339)))
	}
	return resp
}

// withJSONField appends a field (name and raw JSON value) to an encoded
// JSON object, keeping the documented order of the fields before it.
func withJSONField(obj []byte, name, raw string) []byte {
	s := strings.TrimRight(string(obj), "\n")
	if !strings.HasSuffix(s, "}") {
		return obj
	}
	s = strings.TrimSuffix(s, "}")
	if !strings.HasSuffix(s, "{") {
		s += ","
	}
	return []byte(s + strconv.Quote(name) + ":" + raw + "}\n")
}

// issueCode decides whether an OTP request gets an issued code and
// checks its purpose. The code is drawn by the caller of issueCode.
func (h *Handler) issueCode(code, purpose string) (bool, string, *apiError) {
	auto := code == autoValue || (code == "" && h.codes != nil && h.codes.issue)
	if !auto {
		if purpose != "" {
			return false, "", invalid("purpose", "is only used with issued codes (\"code\": \"auto\")")
		}
		return false, "", nil
	}
	if h.codes == nil {
		return false, "", invalid("code", "cannot be auto: this server does not issue codes; configure `codes { secret … }`")
	}
	if purpose == "" {
		purpose = defaultPurpose
	}
	if !purposePattern.MatchString(purpose) {
		return false, "", invalid("purpose", "must be 1 to 32 characters of a-z, 0-9, '_' and '-'")
	}
	return true, purpose, nil
}

// issueToken decides whether a link request gets an issued token.
func (h *Handler) issueToken(token string) (bool, *apiError) {
	if token != autoValue {
		return false, nil
	}
	if h.codes == nil {
		return false, invalid("token", "cannot be auto: this server does not issue tokens; configure `codes { secret … }`")
	}
	return true, nil
}

// unmarshalCodes parses `codes [issue] { secret …; length …; alphabet … }`.
func unmarshalCodes(d *caddyfile.Dispenser) (*Codes, error) {
	c := &Codes{}
	if d.NextArg() {
		if d.Val() != "issue" {
			return nil, d.Errf("codes takes no argument but issue, not '%s'", d.Val())
		}
		c.Issue = true
		if d.NextArg() {
			return nil, d.ArgErr()
		}
	}
	err := eachOption(d, "codes", func(sub, v string) error {
		switch sub {
		case "secret":
			c.Secret = v
		case "length":
			n, err := strconv.Atoi(v)
			if err != nil || n < 4 || n > 32 {
				return d.Errf("codes length must be a number from 4 to 32, not '%s'", v)
			}
			c.Length = n
		case "alphabet":
			if err := checkAlphabet(v); err != nil {
				return d.WrapErr(err)
			}
			c.Alphabet = v
		default:
			return d.Errf("unrecognized codes subdirective '%s'", sub)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := c.check(); err != nil {
		return nil, d.WrapErr(err)
	}
	return c, nil
}

// sweepIssued deletes issued records that expired more than issuedGrace
// ago. A code slot is reused by the next code for the same recipient and
// purpose, so it is deleted under its lock and only if it is still the
// expired record; a token's key is never reused.
func (e *shared) sweepIssued(ctx context.Context) {
	now := issuedNow()
	for _, dir := range []string{keyCodes, keyTokens} {
		keys, err := e.st.s.List(ctx, strings.TrimSuffix(dir, "/"), true)
		if err != nil {
			continue
		}
		for _, k := range keys {
			var rec issuedExpiry
			if err := e.st.getJSON(ctx, k, &rec); err != nil || rec.Expires.IsZero() || now.Sub(rec.Expires) <= issuedGrace {
				continue
			}
			if dir == keyTokens {
				_ = e.st.s.Delete(ctx, k)
				continue
			}
			lctx, unlock, err := e.lockIssued(ctx, k)
			if err != nil {
				continue
			}
			if e.st.getJSON(lctx, k, &rec) == nil && now.Sub(rec.Expires) > issuedGrace {
				_ = e.st.s.Delete(lctx, k)
			}
			unlock()
		}
	}
}
