package storagex

import (
	"context"
	"slices"
	"testing"

	"github.com/caddyserver/certmagic"
)

func TestTempName(t *testing.T) {
	for name, want := range map[string]bool{"123456789": true, "": false, "06h3vrrz5zq7mve8tzacnrr9b0": false, "1a": false} {
		if got := TempName(name); got != want {
			t.Errorf("TempName(%q) = %v, want %v", name, got, want)
		}
	}
}

// A missing directory lists as empty, not as an error; a present one
// lists its keys.
func TestList(t *testing.T) {
	ctx := context.Background()
	st := &certmagic.FileStorage{Path: t.TempDir()}
	if keys, err := List(ctx, st, "authmail/own/nobody"); err != nil || keys != nil {
		t.Fatalf("missing directory: %v %v", keys, err)
	}
	for _, k := range []string{"authmail/own/a/b1", "authmail/own/a/b2"} {
		if err := st.Store(ctx, k, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := List(ctx, st, "authmail/own/a")
	slices.Sort(keys)
	if err != nil || !slices.Equal(keys, []string{"authmail/own/a/b1", "authmail/own/a/b2"}) {
		t.Fatalf("listing: %v %v", keys, err)
	}
}
