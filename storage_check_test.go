package authmail

import (
	"context"
	"errors"
	"io/fs"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

// brokenStorage wraps a working storage and breaks one promise the
// outbox relies on, like storage modules found in the wild.
type brokenStorage struct {
	certmagic.Storage
	name  string
	kind  string
	locks atomic.Int32
	idem  atomic.Int32 // locks of idempotency records
}

func (b *brokenStorage) String() string { return b.name }

func (b *brokenStorage) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	switch b.kind {
	case "list-everything": // techknowlogick/certmagic-s3: the whole bucket
		return b.Storage.List(ctx, "", true)
	case "list-by-string-prefix": // matches names, not directories
		keys, err := b.Storage.List(ctx, strings.TrimSuffix(keyCheck, "/"), true)
		var out []string
		for _, k := range keys {
			if strings.HasPrefix(k, prefix) {
				out = append(out, k)
			}
		}
		return out, err
	case "list-always-recursive":
		return b.Storage.List(ctx, prefix, true)
	}
	return b.Storage.List(ctx, prefix, recursive)
}

func (b *brokenStorage) Lock(ctx context.Context, name string) error {
	b.locks.Add(1)
	if strings.HasPrefix(name, "authmail_idem_") {
		b.idem.Add(1)
	}
	switch b.kind {
	case "lock-noop": // ss098/certmagic-s3
		return nil
	case "lock-fails-when-held": // yroc92/postgres-storage
		if strings.HasPrefix(name, "authmail_check_") && b.locks.Load()%2 == 0 {
			return errors.New("lock is already held")
		}
	}
	return b.Storage.Lock(ctx, name)
}

func (b *brokenStorage) Unlock(ctx context.Context, name string) error {
	if b.kind == "lock-noop" {
		return nil
	}
	return b.Storage.Unlock(ctx, name)
}

func (b *brokenStorage) Load(ctx context.Context, key string) ([]byte, error) {
	if b.kind == "loses-writes" && strings.HasPrefix(key, keyCheck) {
		return nil, fs.ErrNotExist
	}
	return b.Storage.Load(ctx, key)
}

// provisionError provisions h and returns the error.
func provisionError(t *testing.T, h *Handler) error {
	t.Helper()
	ctx, err := caddy.ProvisionContext(&caddy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	err = h.Provision(ctx)
	t.Cleanup(func() { _ = h.Cleanup() })
	return err
}

func TestStorageSelfCheck(t *testing.T) { forEachStorage(t, testStorageSelfCheck) }

func testStorageSelfCheck(t *testing.T) {
	for _, c := range []struct{ kind, problem string }{
		{"list-everything", `List is not prefix-exact: it lists "`},
		{"list-by-string-prefix", `List is not prefix-exact: it lists "authmail/check/`},
		{"list-always-recursive", `List ignores recursive=false: it lists "authmail/check/`},
		{"lock-noop", `Lock is not exclusive: a second Lock of a lock that was held succeeded at once`},
		{"lock-fails-when-held", `a second Lock of a held lock failed instead of waiting: lock is already held`},
		{"loses-writes", `loading the probe key authmail/check/`},
	} {
		t.Run(c.kind, func(t *testing.T) {
			in := newInstance(t, "")
			inner := openStorage(t, in.storageDir)
			// a key of someone else's beside the outbox's
			if err := inner.Store(context.Background(), "certificates/example.com/example.com.crt", []byte("x")); err != nil {
				t.Fatal(err)
			}
			broken := &brokenStorage{Storage: inner, name: "broken-" + c.kind + "-" + in.storageDir, kind: c.kind}
			t.Setenv("XDG_DATA_HOME", in.dataDir)
			h := &Handler{Capture: t.TempDir(), From: "no-reply@example.com", BaseURL: "https://app.example.com",
				Keys: []Key{{ID: "app", Secret: "0123456789abcdef0123"}}, storageOverride: broken}
			err := provisionError(t, h)
			if err == nil {
				t.Fatal("a storage that breaks the outbox's assumptions was accepted")
			}
			want := "storage *authmail.brokenStorage (" + broken.name + ") is not safe for the outbox: "
			if !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), c.problem) {
				t.Fatalf("error %q\nwant it to start %q and say %q", err, want, c.problem)
			}
			// the probes are gone, the other key is untouched
			if keys, err := inner.List(context.Background(), strings.TrimSuffix(keyCheck, "/"), true); err != nil && !errors.Is(err, fs.ErrNotExist) || len(allFiles(t, inner, keys)) != 0 {
				t.Errorf("probe keys left behind: %q %v", keys, err)
			}
			if b, err := inner.Load(context.Background(), "certificates/example.com/example.com.crt"); err != nil || string(b) != "x" {
				t.Errorf("the check touched a key outside its prefix: %q %v", b, err)
			}
		})
	}
	t.Run("correct storage passes once", func(t *testing.T) {
		in := newInstance(t, "")
		counting := &brokenStorage{Storage: openStorage(t, in.storageDir), name: "counting-" + in.storageDir}
		h := in.handler(func(h *Handler) { h.storageOverride = counting })
		if n := counting.locks.Load(); n != 2 {
			t.Fatalf("the check took %d locks, want 2", n)
		}
		// a reload on the same storage does not check it again
		in.handler(func(h *Handler) { h.storageOverride = counting })
		if n := counting.locks.Load(); n != 2 {
			t.Fatalf("the storage was checked again on a reload (%d locks)", n)
		}
		if rec, out := call(t, h, "POST", "/authmail/send/otp", otp("jane@example.org")); rec.Code != 200 {
			t.Fatalf("%d %v", rec.Code, out)
		}
	})
}

// allFiles keeps the keys that are values, not directories.
func allFiles(t *testing.T, s certmagic.Storage, keys []string) []string {
	var out []string
	for _, k := range keys {
		if info, err := s.Stat(context.Background(), k); err == nil && info.IsTerminal {
			out = append(out, k)
		}
	}
	return out
}
