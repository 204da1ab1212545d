package authmail

import (
	"context"
	"crypto/hmac"
	"encoding/hex"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// verifyOTPRequest is the body of POST /verify/otp.
type verifyOTPRequest struct {
	ChallengeID string `json:"challenge_id"`
	Code        string `json:"code"`
	IP          string `json:"ip"`
}

// verifyTokenRequest is the body of POST /verify/token.
type verifyTokenRequest struct {
	Token string `json:"token"`
	Flow  string `json:"flow"`
	IP    string `json:"ip"`
}

// verifiedResponse is the answer to a successful verification.
type verifiedResponse struct {
	Valid    bool   `json:"valid"`
	To       string `json:"to"`
	Purpose  string `json:"purpose,omitempty"`
	Flow     string `json:"flow,omitempty"`
	OldEmail string `json:"old_email,omitempty"`
	NewEmail string `json:"new_email,omitempty"`
}

// codeInvalidResponse is the answer to a wrong code.
type codeInvalidResponse struct {
	ErrorCode    string `json:"error_code"`
	Message      string `json:"message"`
	AttemptsLeft int    `json:"attempts_left"`
}

// verifyOutcome is what checking a value found: an answer, and whether
// it counts as a failed attempt of the client.
type verifyOutcome struct {
	status  int
	body    any
	code    string // error code, "" on success
	failure bool
}

func verifyFail(status int, code, msg string, failure bool) verifyOutcome {
	return verifyOutcome{status: status, body: errorResponse{ErrorCode: code, Message: msg}, code: code, failure: failure}
}

var (
	verifyNotFound = func() verifyOutcome {
		return verifyFail(http.StatusNotFound, "not_found", "no such code or token for this key: unknown, replaced or already used", true)
	}
	verifyUnavailable = func() verifyOutcome {
		return verifyFail(http.StatusServiceUnavailable, "outbox_unavailable", "the verification record could not be read or written; retry later", false)
	}
)

// parseVerifyOTP decodes and validates the body of /verify/otp; a
// well-formed body still needs its challenge to be found.
func parseVerifyOTP(body []byte) (*verifyOTPRequest, *apiError) {
	var req verifyOTPRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, err
	}
	if req.ChallengeID == "" {
		return nil, invalid("challenge_id", "is required")
	}
	if _, _, ok := parseChallenge(req.ChallengeID); !ok {
		return nil, invalid("challenge_id", "is not a challenge_id issued by /send/otp")
	}
	if req.Code == "" {
		return nil, invalid("code", "is required")
	}
	if utf8.RuneCountInString(req.Code) > maxCodeRunes {
		return nil, invalid("code", "is longer than %d characters", maxCodeRunes)
	}
	if err := checkVerifyIP(req.IP); err != nil {
		return nil, err
	}
	return &req, nil
}

// parseVerifyToken decodes and validates the body of /verify/token.
func parseVerifyToken(body []byte) (*verifyTokenRequest, *apiError) {
	var req verifyTokenRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, err
	}
	if req.Token == "" {
		return nil, invalid("token", "is required")
	}
	if len(req.Token) > maxTokenBytes {
		return nil, invalid("token", "is longer than %d bytes", maxTokenBytes)
	}
	if req.Flow == "" {
		return nil, invalid("flow", "is required")
	}
	if !slices.Contains(linkFlows, req.Flow) {
		return nil, invalid("flow", "must be one of %s", strings.Join(linkFlows, ", "))
	}
	if err := checkVerifyIP(req.IP); err != nil {
		return nil, err
	}
	return &req, nil
}

func checkVerifyIP(ip string) *apiError {
	if ip == "" {
		return nil
	}
	if a, err := netip.ParseAddr(ip); err != nil || a.Zone() != "" {
		return invalid("ip", "must be an IPv4 or IPv6 address without a zone")
	}
	return nil
}

// serveVerify answers POST /verify/otp and /verify/token. Failed
// attempts (a wrong code, an unknown value) count against the client,
// which is the end user's ip when the app passes it, else the caller's
// address, with the same limit and window as auth_failures.
func (h *Handler) serveVerify(w http.ResponseWriter, r *http.Request, rc *requestCtx, ep *endpoint, key *apiKey, body []byte, dryRun bool) error {
	if dryRun {
		return h.reject(w, rc, &apiError{Status: http.StatusBadRequest, Code: "invalid_request",
			Message: "X-Dry-Run is not supported for verification: a verification uses the code or token up"})
	}
	if h.codes == nil {
		return h.reject(w, rc, &apiError{Status: http.StatusNotFound, Code: "not_found",
			Message: "this server does not issue codes or tokens; configure `codes { secret … }`"})
	}
	var otpReq *verifyOTPRequest
	var tokReq *verifyTokenRequest
	var aerr *apiError
	ip := ""
	if ep.kind == kindVerifyOTP {
		if otpReq, aerr = parseVerifyOTP(body); aerr == nil {
			ip = otpReq.IP
		}
	} else {
		if tokReq, aerr = parseVerifyToken(body); aerr == nil {
			ip = tokReq.IP
		}
	}
	if aerr != nil {
		return h.reject(w, rc, aerr)
	}
	if ip == "" {
		ip = clientIP(r)
	}
	lim := h.shared.limits
	// "a:" puts these with the failed authentications, whose published
	// share is bounded: the ip comes from the end user
	vKey := "a:v:" + lim.Hash(authFailureSubject(ip))
	if blocked, wait := lim.Blocked(vKey, h.authFail, time.Now()); blocked {
		return h.rateLimited(w, rc, "rate_limited", "too many failed verifications from this client; retry later", wait)
	}
	var out verifyOutcome
	if otpReq != nil {
		out = h.verifyCode(r.Context(), key.tenant, otpReq)
	} else {
		out = h.verifyToken(r.Context(), key.tenant, tokReq)
	}
	if out.failure {
		lim.Record(vKey, h.authFail, time.Now())
	}
	if out.code != "" {
		rc.setStatus("rejected", out.code)
		metricRejected(out.code)
		if ce := h.logger.Check(zap.DebugLevel, "verification failed"); ce != nil {
			ce.Write(zap.String("error_code", out.code), zap.String("flow", rc.flow),
				zap.String("key_id", rc.keyID), zap.String("request_id", rc.requestID))
		}
		return writeJSON(w, out.status, out.body)
	}
	rc.setStatus("verified", "")
	// the purpose is a validated label, never the code; no address is logged
	v := out.body.(verifiedResponse)
	fields := []zap.Field{zap.String("flow", rc.flow), zap.String("key_id", rc.keyID), zap.String("request_id", rc.requestID)}
	if v.Purpose != "" {
		fields = append(fields, zap.String("purpose", v.Purpose))
	} else {
		fields = append(fields, zap.String("link_flow", v.Flow))
	}
	h.logger.Info("verified", fields...)
	return writeJSON(w, http.StatusOK, out.body)
}

// verifyCode checks a code against its challenge and uses it up, under
// the record's lock: of concurrent verifications of one challenge, on
// any instance, at most one succeeds. The record is deleted before the
// success is answered; if the delete fails, the answer is 503 and the
// code stays valid.
func (h *Handler) verifyCode(ctx context.Context, tenant string, req *verifyOTPRequest) verifyOutcome {
	is, e := h.codes, h.shared
	slot, nonce, _ := parseChallenge(req.ChallengeID)
	key := codePath(tenant, slot)
	// hashed before the lock: the lock is held for storage work only
	slotHex := hex.EncodeToString(slot)
	got := is.codeHash(tenant, slotHex, nonce, strings.TrimSpace(req.Code))
	lctx, unlock, err := e.lockIssued(ctx, key)
	if err != nil {
		h.logger.Error("locking an issued code failed", zap.Error(err))
		return verifyUnavailable()
	}
	defer unlock()
	var rec codeRecord
	if err := e.st.getJSON(lctx, key, &rec); err != nil {
		if outbox.IsNotExist(err) {
			return verifyNotFound()
		}
		h.logger.Error("reading an issued code failed", zap.Error(err))
		return verifyUnavailable()
	}
	if !hmac.Equal([]byte(rec.Nonce), []byte(nonce)) {
		// the slot holds a newer challenge for the same recipient and purpose
		return verifyNotFound()
	}
	if rec.Failures >= maxCodeAttempts {
		return verifyFail(http.StatusGone, "code_burned", "too many wrong codes were tried for this challenge; send a new code", false)
	}
	if !issuedNow().Before(rec.Expires) {
		return verifyFail(http.StatusGone, "code_expired", "the code has expired; send a new code", false)
	}
	want, err := hex.DecodeString(rec.Hash)
	gotB, _ := hex.DecodeString(got)
	if err != nil || !hmac.Equal(gotB, want) {
		rec.Failures++
		if err := e.st.putJSON(lctx, key, rec); err != nil {
			// not counted, so not answered as a counted attempt either
			h.logger.Error("recording a wrong code failed", zap.Error(err))
			return verifyUnavailable()
		}
		return verifyOutcome{status: http.StatusUnprocessableEntity, code: "code_invalid", failure: true,
			body: codeInvalidResponse{ErrorCode: "code_invalid", Message: "the code is wrong", AttemptsLeft: maxCodeAttempts - rec.Failures}}
	}
	if err := e.st.s.Delete(lctx, key); err != nil {
		h.logger.Error("using up an issued code failed", zap.Error(err))
		return verifyUnavailable()
	}
	return verifyOutcome{status: http.StatusOK, body: verifiedResponse{Valid: true, To: rec.To, Purpose: rec.Purpose}}
}

// verifyToken checks a link token for its flow and uses it up, with the
// same locking as verifyCode. A token of another flow is not found and
// stays valid for its own.
func (h *Handler) verifyToken(ctx context.Context, tenant string, req *verifyTokenRequest) verifyOutcome {
	e := h.shared
	key := h.codes.tokenPath(tenant, req.Token)
	lctx, unlock, err := e.lockIssued(ctx, key)
	if err != nil {
		h.logger.Error("locking an issued token failed", zap.Error(err))
		return verifyUnavailable()
	}
	defer unlock()
	var rec tokenRecord
	if err := e.st.getJSON(lctx, key, &rec); err != nil {
		if outbox.IsNotExist(err) {
			return verifyNotFound()
		}
		h.logger.Error("reading an issued token failed", zap.Error(err))
		return verifyUnavailable()
	}
	if rec.Flow != req.Flow {
		return verifyNotFound()
	}
	if !issuedNow().Before(rec.Expires) {
		return verifyFail(http.StatusGone, "token_expired", "the link has expired; send a new one", false)
	}
	if err := e.st.s.Delete(lctx, key); err != nil {
		h.logger.Error("using up an issued token failed", zap.Error(err))
		return verifyUnavailable()
	}
	out := verifiedResponse{Valid: true, To: rec.To, Flow: rec.Flow}
	if rec.Flow == "email-change" {
		out.OldEmail, out.NewEmail = rec.OldEmail, rec.To
	}
	return verifyOutcome{status: http.StatusOK, body: out}
}
