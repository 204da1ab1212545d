package redistest

import (
	"context"
	"testing"
)

// A value the server acknowledged survives a kill and restart on the same
// port and directory (append-only file, fsync always), and the storage's
// client reconnects by itself.
func TestStoreSurvivesRestart(t *testing.T) {
	srv := Start(t)
	st := srv.Storage(t, Prefix(t))
	ctx := context.Background()
	if err := st.Store(ctx, "a/b", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	if _, err := st.Load(ctx, "a/b"); err == nil {
		t.Fatal("Load succeeded while the server was down")
	}
	srv.Start()
	got, err := st.Load(ctx, "a/b")
	if err != nil || string(got) != "v1" {
		t.Fatalf("after restart: %q, %v; want v1", got, err)
	}
	keys, err := st.List(ctx, "a", false)
	if err != nil || len(keys) != 1 || keys[0] != "a/b" {
		t.Fatalf("List(a) = %q, %v; want [a/b]", keys, err)
	}
}
