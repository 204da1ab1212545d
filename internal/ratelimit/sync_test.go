package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/caddy-authmail/authmail/internal/redistest"
)

// faulty is a storage whose writes, listings and reads can be made to
// fail, as when the storage cannot be reached.
type faulty struct {
	certmagic.Storage
	store, list, load atomic.Bool
}

var errDown = errors.New("storage unreachable")

func (f *faulty) Store(ctx context.Context, key string, value []byte) error {
	if f.store.Load() {
		return errDown
	}
	return f.Storage.Store(ctx, key, value)
}

func (f *faulty) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	if f.list.Load() {
		return nil, errDown
	}
	return f.Storage.List(ctx, dir, recursive)
}

func (f *faulty) Load(ctx context.Context, key string) ([]byte, error) {
	if f.load.Load() {
		return nil, errDown
	}
	return f.Storage.Load(ctx, key)
}

var t0 = time.Unix(1_800_000_000, 0).UTC() // 2027-01-15T08:00:00Z

func mustSync(t *testing.T, l *Limiter, st certmagic.Storage, instance string, opts SyncOptions) {
	t.Helper()
	if err := l.Sync(context.Background(), st, "authmail", instance, opts); err != nil {
		t.Fatalf("Sync %s: %v", instance, err)
	}
}

func load(t *testing.T, st certmagic.Storage, key string) string {
	t.Helper()
	b, err := st.Load(context.Background(), key)
	if err != nil {
		t.Fatalf("%s: %v", key, err)
	}
	return string(b)
}

// TestStorageLayout pins the keys, the lock and the JSON that instances
// of every version in a cluster share.
func TestStorageLayout(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		ctx := context.Background()
		st := open()
		salt, err := LoadSalt(ctx, st, "authmail")
		if err != nil || len(salt) != 32 {
			t.Fatalf("LoadSalt: %x %v", salt, err)
		}
		if got := load(t, st, "authmail/salt"); got != string(salt) {
			t.Fatalf("authmail/salt holds %x, LoadSalt returned %x", got, salt)
		}
		l := New()
		spec := Spec{3, time.Minute}
		l.Record("k:app", spec, t0)
		l.Record("r:otp:abc", spec, t0.Add(1500*time.Millisecond))
		l.Record("r:otp:abc", spec, t0.Add(1600*time.Millisecond))
		mustSync(t, l, st, "inst-a", SyncOptions{Now: t0.Add(2 * time.Second)})
		want := `{"instance":"inst-a","updated":"2027-01-15T08:00:02Z","events":{"k:app":[1800000000000],"r:otp:abc":[1800000001500,1800000001600]}}`
		if got := load(t, st, "authmail/rl/inst-a"); got != want {
			t.Errorf("authmail/rl/inst-a =\n%s\nwant\n%s", got, want)
		}
		keys, err := st.List(ctx, "authmail/rl", false)
		if err != nil || !slices.Equal(keys, []string{"authmail/rl/inst-a"}) {
			t.Errorf("authmail/rl lists %q, %v", keys, err)
		}

		// a state written by another version, in its own time zone, counts
		peer := `{"instance":"5f0c4a52-2b8e-4d7c-9a51-0c1f3b7e2d44","updated":"2027-01-15T09:00:01+01:00","events":{"k:app":[1800000000500,1800000001000]}}`
		if err := st.Store(ctx, "authmail/rl/5f0c4a52-2b8e-4d7c-9a51-0c1f3b7e2d44", []byte(peer)); err != nil {
			t.Fatal(err)
		}
		mustSync(t, l, st, "inst-a", SyncOptions{Now: t0.Add(2 * time.Second)})
		if ok, w := l.Take("k:app", spec, t0.Add(2*time.Second)); ok || w != 58*time.Second {
			t.Errorf("with the peer's 2 events and 1 of its own: Take = %v %v, want refused for 58s", ok, w)
		}
	})
}

// TestSaltLockIsShared: LoadSalt creates the salt under the storage lock
// "authmail_salt", so an instance of any version holding that lock
// decides the salt, and no two instances create one each.
func TestSaltLockIsShared(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		ctx := context.Background()
		other := open()
		if err := other.Lock(ctx, "authmail_salt"); err != nil {
			t.Fatal(err)
		}
		type result struct {
			salt []byte
			err  error
		}
		done := make(chan result, 1)
		go func() {
			s, err := LoadSalt(ctx, open(), "authmail")
			done <- result{s, err}
		}()
		select {
		case r := <-done:
			t.Fatalf("LoadSalt returned while another instance held the lock: %x %v", r.salt, r.err)
		case <-time.After(300 * time.Millisecond):
		}
		theirs := []byte("0123456789abcdef0123456789abcdef")
		if err := other.Store(ctx, "authmail/salt", theirs); err != nil {
			t.Fatal(err)
		}
		if err := other.Unlock(ctx, "authmail_salt"); err != nil {
			t.Fatal(err)
		}
		r := <-done
		if r.err != nil || string(r.salt) != string(theirs) {
			t.Fatalf("LoadSalt = %q, %v; want the salt the lock holder stored", r.salt, r.err)
		}
		// once there, every instance reads it
		for range 3 {
			if s, err := LoadSalt(ctx, open(), "authmail"); err != nil || string(s) != string(theirs) {
				t.Fatalf("LoadSalt = %q, %v", s, err)
			}
		}
	})
}

func TestLoadSaltFails(t *testing.T) {
	ctx := context.Background()
	st := &faulty{Storage: &certmagic.FileStorage{Path: t.TempDir()}}
	st.load.Store(true)
	if s, err := LoadSalt(ctx, st, "authmail"); !errors.Is(err, errDown) || s != nil {
		t.Errorf("storage down: LoadSalt = %x, %v", s, err)
	}
	st.load.Store(false)
	if err := st.Store(ctx, "authmail/salt", []byte("short salt")); err != nil {
		t.Fatal(err)
	}
	if s, err := LoadSalt(ctx, st, "authmail"); err == nil || err.Error() != "authmail/salt is too short" {
		t.Errorf("short salt: LoadSalt = %x, %v", s, err)
	}
	if got := load(t, st, "authmail/salt"); got != "short salt" {
		t.Errorf("LoadSalt replaced a salt it could not use: %q", got)
	}
}

// TestSyncSharesLimits: two instances on one storage count each other's
// events from the round after they happened.
func TestSyncSharesLimits(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		ctx := context.Background()
		sa, sb := open(), open()
		a, b := New(), New()
		for _, m := range []struct {
			l  *Limiter
			st certmagic.Storage
		}{{a, sa}, {b, sb}} {
			salt, err := LoadSalt(ctx, m.st, "authmail")
			if err != nil {
				t.Fatal(err)
			}
			m.l.SetSalt(salt)
		}
		if a.Hash("shared@example.org") != b.Hash("shared@example.org") {
			t.Fatal("instances on one storage hash differently")
		}
		key := "r:otp:" + a.Hash("shared@example.org")
		spec := Spec{3, time.Minute}
		for i := range 2 {
			if ok, _ := a.Take(key, spec, t0.Add(time.Duration(i)*time.Second)); !ok {
				t.Fatalf("a: event %d refused", i)
			}
		}
		if ok, _ := b.Take(key, spec, t0.Add(2*time.Second)); !ok {
			t.Fatal("b refused its first event before any round")
		}
		if ok, _ := b.Take(key, spec, t0.Add(2*time.Second)); !ok {
			t.Fatal("b counted a's events before any round")
		}
		b.local[key].times = b.local[key].times[:1] // back to one event of its own
		mustSync(t, a, sa, "a", SyncOptions{Now: t0.Add(2 * time.Second)})
		mustSync(t, b, sb, "b", SyncOptions{Now: t0.Add(2 * time.Second)})
		if ok, w := b.Take(key, spec, t0.Add(3*time.Second)); ok || w != 57*time.Second {
			t.Fatalf("b after a round: Take = %v %v, want refused for 57s", ok, w)
		}
		mustSync(t, a, sa, "a", SyncOptions{Now: t0.Add(3 * time.Second)})
		if blocked, _ := a.Blocked(key, spec, t0.Add(3*time.Second)); !blocked {
			t.Fatal("a does not count b's event")
		}
		// the published state holds hashes, never the address
		if raw := load(t, sa, "authmail/rl/a"); strings.Contains(raw, "shared@example.org") || !strings.Contains(raw, key) {
			t.Fatalf("published %s", raw)
		}
		// a's first event leaves the window: one slot again
		if ok, _ := b.Take(key, spec, t0.Add(60*time.Second+time.Millisecond)); !ok {
			t.Fatal("b refused after the window moved")
		}
	})
}

// TestSyncIgnoresWhatIsNotAPeer: a file storage's write in progress (a
// name of digits), a state stored under a name that is not its own (it
// would count an instance twice), a state older than 7 days, one that
// does not parse, and this instance's own state are not peers.
func TestSyncIgnoresWhatIsNotAPeer(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		ctx := context.Background()
		st := open()
		now := t0
		event := fmt.Sprintf(`"events":{"k:app":[%d]}}`, now.UnixMilli())
		put := func(name, updated, instance string) {
			t.Helper()
			b := fmt.Sprintf(`{"instance":%q,"updated":%q,%s`, instance, updated, event)
			if err := st.Store(ctx, "authmail/rl/"+name, []byte(b)); err != nil {
				t.Fatal(err)
			}
		}
		fresh := now.Add(-time.Minute).Format(time.RFC3339)
		put("peer", fresh, "peer")
		put("2318229907", fresh, "peer")
		put("renamed-copy", fresh, "peer")
		put("old", now.Add(-7*24*time.Hour-time.Second).Format(time.RFC3339), "old")
		put("me", fresh, "me")
		if err := st.Store(ctx, "authmail/rl/broken", []byte(`{"instance":"broken","upd`)); err != nil {
			t.Fatal(err)
		}
		l := New()
		mustSync(t, l, st, "me", SyncOptions{Now: now})
		if got := slices.Sorted(maps.Keys(l.peers)); !slices.Equal(got, []string{"peer"}) {
			t.Fatalf("peers %q, want only the instance stored under its own id", got)
		}
		spec := Spec{2, time.Minute}
		if blocked, _ := l.Blocked("k:app", spec, now); blocked {
			t.Fatal("one peer event counted as two")
		}
		l.Record("k:app", spec, now)
		if blocked, _ := l.Blocked("k:app", spec, now); !blocked {
			t.Fatal("the peer's event was not counted")
		}
	})
}

// TestSyncPublishesEmptyOnce: an instance without events writes nothing;
// once its events left their windows it writes one empty state, so the
// others stop counting them, then nothing until it has events again.
func TestSyncPublishesEmptyOnce(t *testing.T) {
	ctx := context.Background()
	st := &certmagic.FileStorage{Path: t.TempDir()}
	l := New()
	mustSync(t, l, st, "a", SyncOptions{Now: t0})
	if st.Exists(ctx, "authmail/rl/a") {
		t.Fatal("published a state without events")
	}
	l.Record("k:app", Spec{1, time.Minute}, t0)
	mustSync(t, l, st, "a", SyncOptions{Now: t0})
	mustSync(t, l, st, "a", SyncOptions{Now: t0.Add(2 * time.Minute)})
	if got, want := load(t, st, "authmail/rl/a"), `{"instance":"a","updated":"2027-01-15T08:02:00Z","events":{}}`; got != want {
		t.Fatalf("after the window: %s, want %s", got, want)
	}
	if err := st.Delete(ctx, "authmail/rl/a"); err != nil {
		t.Fatal(err)
	}
	mustSync(t, l, st, "a", SyncOptions{Now: t0.Add(3 * time.Minute)})
	if st.Exists(ctx, "authmail/rl/a") {
		t.Fatal("published an empty state twice")
	}
}

// TestSyncCapsUnboundedKeys: of the keys under CapPrefix only the Cap
// with the most events are published; every other key in full.
func TestSyncCapsUnboundedKeys(t *testing.T) {
	st := &certmagic.FileStorage{Path: t.TempDir()}
	l := New()
	spec := Spec{10, time.Minute}
	for i, n := range []int{1, 5, 2, 4, 3} {
		for j := range n {
			l.Record(fmt.Sprintf("a:%d", i), spec, t0.Add(time.Duration(j)*time.Millisecond))
		}
	}
	for i := range 5 {
		l.Record(fmt.Sprintf("k:%d", i), spec, t0)
	}
	mustSync(t, l, st, "a", SyncOptions{Now: t0, CapPrefix: "a:", Cap: 3})
	st2 := New()
	mustSync(t, st2, st, "b", SyncOptions{Now: t0})
	var got []string
	for k, times := range st2.peers["a"] {
		got = append(got, fmt.Sprintf("%s=%d", k, len(times)))
	}
	slices.Sort(got)
	if want := []string{"a:1=5", "a:3=4", "a:4=3", "k:0=1", "k:1=1", "k:2=1", "k:3=1", "k:4=1"}; !slices.Equal(got, want) {
		t.Errorf("published %q, want %q", got, want)
	}
	// and locally every key still counts
	if len(l.local) != 10 {
		t.Errorf("the cap dropped local keys: %d", len(l.local))
	}
}

// TestSyncWithStorageDown: a round that cannot publish still reads the
// others; one that cannot read keeps the last peers, whose events leave
// their windows with time; the limiter keeps working throughout.
func TestSyncWithStorageDown(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		sa := open()
		sb := &faulty{Storage: open()}
		a, b := New(), New()
		spec := Spec{2, time.Minute}
		a.Record("k:app", spec, t0)
		a.Record("k:app", spec, t0)
		mustSync(t, a, sa, "a", SyncOptions{Now: t0})
		b.Record("k:own", spec, t0)

		sb.store.Store(true)
		err := b.Sync(context.Background(), sb, "authmail", "b", SyncOptions{Now: t0})
		if !errors.Is(err, errDown) || err.Error() != "publishing rate limit state: storage unreachable" {
			t.Fatalf("Sync with writes failing: %v", err)
		}
		if blocked, _ := b.Blocked("k:app", spec, t0); !blocked {
			t.Fatal("a round that could not publish did not read the peers")
		}

		sb.list.Store(true)
		err = b.Sync(context.Background(), sb, "authmail", "b", SyncOptions{Now: t0.Add(time.Second)})
		if err == nil || err.Error() != "publishing rate limit state: storage unreachable\nreading rate limit state: storage unreachable" {
			t.Fatalf("Sync with the storage down: %v", err)
		}
		if blocked, w := b.Blocked("k:app", spec, t0.Add(time.Second)); !blocked || w != 59*time.Second {
			t.Fatalf("the last peers were dropped: %v %v", blocked, w)
		}
		if ok, _ := b.Take("k:own", spec, t0.Add(time.Second)); !ok {
			t.Fatal("b's own limit refused its second event")
		}
		if ok, _ := b.Take("k:own", spec, t0.Add(time.Second)); ok {
			t.Fatal("b's own limit is not enforced with the storage down")
		}
		if blocked, _ := b.Blocked("k:app", spec, t0.Add(time.Minute+time.Millisecond)); blocked {
			t.Fatal("a peer's events outlived their window")
		}

		sb.store.Store(false)
		sb.list.Store(false)
		mustSync(t, b, sb, "b", SyncOptions{Now: t0.Add(2 * time.Second)})
		mustSync(t, a, sa, "a", SyncOptions{Now: t0.Add(2 * time.Second)})
		if blocked, _ := a.Blocked("k:own", spec, t0.Add(2*time.Second)); !blocked {
			t.Fatal("b's events did not reach a once the storage answered")
		}
	})
}

func TestForget(t *testing.T) {
	redistest.ForEachStorage(t, func(t *testing.T, open func() certmagic.Storage) {
		ctx := context.Background()
		st := open()
		l := New()
		l.Record("k:app", Spec{1, time.Minute}, t0)
		mustSync(t, l, st, "gone", SyncOptions{Now: t0})
		mustSync(t, New(), st, "kept", SyncOptions{Now: t0})
		if err := Forget(ctx, st, "authmail", "gone"); err != nil {
			t.Fatal(err)
		}
		if st.Exists(ctx, "authmail/rl/gone") {
			t.Fatal("Forget left the state")
		}
		if err := Forget(ctx, st, "authmail", "gone"); err != nil {
			t.Fatalf("Forget of a state that is not there: %v", err)
		}
	})
}

// TestNamesRefused: prefixes and instance names that would put a key
// anywhere else are refused before the storage is touched.
func TestNamesRefused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st := &certmagic.FileStorage{Path: dir}
	l := New()
	l.Record("k", Spec{1, time.Minute}, t0)
	for _, inst := range []string{"", ".", "..", "a/b", `a\b`, "a\x00"} {
		if err := l.Sync(ctx, st, "authmail", inst, SyncOptions{Now: t0}); err == nil {
			t.Errorf("Sync as %q accepted", inst)
		}
		if err := Forget(ctx, st, "authmail", inst); err == nil {
			t.Errorf("Forget %q accepted", inst)
		}
	}
	for _, prefix := range []string{"", "/authmail", "authmail/", "a//b", "a/../b", "..", "../x", "."} {
		if err := l.Sync(ctx, st, prefix, "a", SyncOptions{Now: t0}); err == nil {
			t.Errorf("Sync under %q accepted", prefix)
		}
		if _, err := LoadSalt(ctx, st, prefix); err == nil {
			t.Errorf("LoadSalt under %q accepted", prefix)
		}
	}
	if keys, err := st.List(ctx, "", true); len(keys) != 0 {
		t.Errorf("refused calls wrote %q (%v)", keys, err)
	}
}
