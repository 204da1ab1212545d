package mailer

import (
	"context"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/pace"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
)

// TestShareRateFollowsTheOutboxStorage: a sender outlives reloads, and a
// reload can move the outbox to another storage, whose engine then asks
// the sender to share its rate there. The share moves: its record
// appears in the new storage and leaves the old one (whose client may be
// closed with its config); asking again on the same storage changes
// nothing.
func TestShareRateFollowsTheOutboxStorage(t *testing.T) {
	s := NewSender(SMTPSettings{Host: "mail.example.com", Port: 587, Connections: 1, Rate: ratelimit.Spec{N: 20, Window: time.Second}})
	t.Cleanup(func() { _ = s.Destruct() })
	first := &certmagic.FileStorage{Path: t.TempDir()}
	second := &certmagic.FileStorage{Path: t.TempDir()}
	demand := func() int { return 1 }
	records := func(st certmagic.Storage) []string {
		keys, _ := st.List(context.Background(), pace.KeyPrefix, true)
		var out []string
		for _, k := range keys {
			if info, err := st.Stat(context.Background(), k); err == nil && info.IsTerminal {
				out = append(out, k)
			}
		}
		return out
	}
	waitRecords := func(st certmagic.Storage, n int, what string) []string {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			got := records(st)
			if len(got) == n {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d share records %v, want %d", what, len(got), got, n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	s.ShareRate(first, "inst", demand, zap.NewNop())
	before := waitRecords(first, 1, "the first storage")
	s.ShareRate(first, "inst", demand, zap.NewNop())
	time.Sleep(100 * time.Millisecond)
	if got := records(first); len(got) != 1 || got[0] != before[0] {
		t.Fatalf("asking again on the same storage changed the share: %v, was %v", got, before)
	}
	s.ShareRate(second, "inst", demand, zap.NewNop())
	waitRecords(second, 1, "the new storage")
	waitRecords(first, 0, "the old storage after the move")
}
