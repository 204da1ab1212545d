package authmail

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// Go benchmarks of the accept path, stage by stage, next to a baseline
// measured in the same run: a handler that only answers, served the same
// way. `go test -run '^$' -bench . -benchmem` runs them; docs/benchmarks.md
// has results. They measure CPU and allocations per request on one core;
// bench/run.sh measures the system (HTTP, storage, SMTP) end to end.

const benchOTP = `{"to":"jane@example.org","code":"123456","user_name":"Jane"}`

func benchHandler(b *testing.B) *Handler {
	b.Helper()
	h := provisionedHandler(b, withoutLimits)
	// one log line per message would measure the terminal
	h.logger = zap.NewNop()
	h.engine.SetLogger(zap.NewNop())
	return h
}

// benchOnce serves one OTP request; only the status is checked, so that
// decoding the answer is not measured.
func benchOnce(b *testing.B, h caddyhttp.MiddlewareHandler, headers ...string) {
	req := apiRequest(http.MethodPost, "/authmail/send/otp", strings.NewReader(benchOTP), headers...)
	rec := httptest.NewRecorder()
	if err := h.ServeHTTP(rec, req, nil); err != nil {
		b.Fatal(err)
	}
	if rec.Code != 200 && rec.Code != 202 {
		b.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

func benchServe(b *testing.B, h caddyhttp.MiddlewareHandler, headers ...string) {
	b.Helper()
	b.ReportAllocs()
	for b.Loop() {
		benchOnce(b, h, headers...)
	}
}

// BenchmarkBaselineRespond is the floor: the same request, served by a
// handler that only writes a small JSON answer.
func BenchmarkBaselineRespond(b *testing.B) {
	benchServe(b, respondOK{})
}

type respondOK struct{}

func (respondOK) ServeHTTP(w http.ResponseWriter, _ *http.Request, _ caddyhttp.Handler) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(200)
	_, err := w.Write([]byte(`{"status":"ok"}`))
	return err
}

// BenchmarkComposeOTP decodes and validates the request and renders the
// text and HTML templates.
func BenchmarkComposeOTP(b *testing.B) {
	h := benchHandler(b)
	ep := endpoints["/send/otp"]
	b.ReportAllocs()
	for b.Loop() {
		if _, _, aerr := h.prepare(ep, []byte(benchOTP)); aerr != nil {
			b.Fatal(aerr)
		}
	}
}

// BenchmarkBuildEnvelope builds the MIME message of a rendered OTP.
func BenchmarkBuildEnvelope(b *testing.B) {
	h := benchHandler(b)
	msgs, _, aerr := h.prepare(endpoints["/send/otp"], []byte(benchOTP))
	if aerr != nil {
		b.Fatal(aerr)
	}
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := h.buildEnvelope(msgs[0], now); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkServeOTPDryRun is the whole handler without the outbox:
// authentication, decoding, templates, MIME, the answer.
func BenchmarkServeOTPDryRun(b *testing.B) {
	benchServe(b, benchHandler(b), "X-Dry-Run: true")
}

// BenchmarkServeOTPAsync adds the durable write: every request waits for
// the group commit of its batch to the file storage (fsync included), one
// request at a time, so every batch holds one message. Capture mode
// delivers the messages meanwhile.
func BenchmarkServeOTPAsync(b *testing.B) {
	benchServe(b, benchHandler(b), "Prefer: respond-async")
}

// BenchmarkServeOTPAsyncParallel is the same with concurrent requests,
// whose messages share batches.
func BenchmarkServeOTPAsyncParallel(b *testing.B) {
	h := benchHandler(b)
	b.ReportAllocs()
	b.SetParallelism(16)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			benchOnce(b, h, "Prefer: respond-async")
		}
	})
}
