// Package storagex holds what every user of a certmagic.Storage in
// authmail needs to read listings right: certmagic's FileStorage shows
// writes in progress and concurrent deletes in its listings.
package storagex

import (
	"context"
	"errors"
	"io/fs"

	"github.com/caddyserver/certmagic"
)

// NotExist reports whether err says a key does not exist.
func NotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }

// List lists the keys directly below dir. File storage walks the
// directory, and a key deleted during the walk fails the listing with
// "not exist" although the directory exists: such a listing is retried,
// and "not exist" means empty only when the directory itself is absent.
func List(ctx context.Context, st certmagic.Storage, dir string) ([]string, error) {
	var err error
	for range 8 {
		var keys []string
		if keys, err = st.List(ctx, dir, false); err == nil {
			return keys, nil
		}
		if !NotExist(err) || ctx.Err() != nil {
			return nil, err
		}
		if !st.Exists(ctx, dir) {
			return nil, nil
		}
	}
	return nil, err
}

// TempName reports whether a listed name is a file storage's write in
// progress rather than a key: certmagic's FileStorage writes a key to a
// temporary file named with digits only (os.CreateTemp with an empty
// pattern) in the key's directory, then renames it, so a listing can
// catch it. authmail never names a key with digits only.
func TempName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] < '0' || name[i] > '9' {
			return false
		}
	}
	return true
}
