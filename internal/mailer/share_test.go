package mailer

import (
	"context"
	"path"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/pace"
	"github.com/caddy-authmail/authmail/internal/ratelimit"
	"github.com/caddy-authmail/authmail/internal/storagex"
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
	// records lists the share records in st, sorted. FileStorage writes
	// a key through a temporary file with a digits-only name in the
	// key's directory, synced, then renamed over the key, and the share
	// writes its record at once and again every second: a listing can
	// show that file (alone, before the first rename), and the walk
	// fails with "not exist" when the rename lands between reading the
	// directory and looking at the file. So a temporary name is no
	// record, and a failed listing is no answer (ok false): ask again.
	records := func(st certmagic.Storage) (keys []string, ok bool) {
		ctx := context.Background()
		listed, err := st.List(ctx, pace.KeyPrefix, true)
		if err != nil {
			// a storage nothing was ever shared in has no records
			return nil, storagex.NotExist(err) && !st.Exists(ctx, pace.KeyPrefix)
		}
		for _, k := range listed {
			if storagex.TempName(path.Base(k)) {
				continue
			}
			info, err := st.Stat(ctx, k)
			if storagex.NotExist(err) {
				continue // deleted since the listing
			}
			if err != nil {
				return nil, false
			}
			if info.IsTerminal {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		return keys, true
	}
	// answer polls st for a listing, of n records unless n is negative
	answer := func(st certmagic.Storage, n int, what string) []string {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, ok := records(st)
			if ok && (n < 0 || len(got) == n) {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: share records %v (listing answered: %v), want %d", what, got, ok, n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	s.ShareRate(first, "inst", demand, zap.NewNop())
	before := answer(first, 1, "the first storage")
	running := func() *pace.Share {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.share
	}
	share := running()
	s.ShareRate(first, "inst", demand, zap.NewNop())
	if running() != share {
		t.Fatal("asking again on the same storage replaced the running share")
	}
	time.Sleep(100 * time.Millisecond)
	if got := answer(first, -1, "the first storage, asked again"); !slices.Equal(got, before) {
		t.Fatalf("asking again on the same storage changed the share: %v, was %v", got, before)
	}
	s.ShareRate(second, "inst", demand, zap.NewNop())
	answer(second, 1, "the new storage")
	answer(first, 0, "the old storage after the move")
}
