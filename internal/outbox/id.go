package outbox

import (
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"time"
)

// IDEncoding is lowercase Crockford base32 without padding, whose
// alphabet is in ASCII order, so ids sort by time. Ids are safe in paths,
// file names, storage keys and Message-ID local parts.
var IDEncoding = base32.NewEncoding("0123456789abcdefghjkmnpqrstvwxyz").WithPadding(base32.NoPadding)

// NewID returns an opaque, time-ordered message id: 48 bits of
// milliseconds followed by 80 random bits, 26 characters.
func NewID(now time.Time) string {
	var b [16]byte
	var ms [8]byte
	binary.BigEndian.PutUint64(ms[:], uint64(now.UnixMilli()))
	copy(b[:6], ms[2:])
	_, _ = rand.Read(b[6:])
	return IDEncoding.EncodeToString(b[:])
}
