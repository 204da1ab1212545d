package authmail

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"

	"github.com/caddy-authmail/authmail/internal/outbox"
)

// The tenant boundary. Every message belongs to the tenant of the key
// that sent it (tenantOf: a hash of the key's secret). What a key may
// see and act on — GET /messages/{id}, GET /messages, retry, the preview
// page's outbox tab and dev mailbox — is decided here, in one place:
//
//   - any key: its own tenant's messages;
//   - a key with `allow admin`: also the messages of every tenant of its
//     site (the keys of the same authmail block), or with admin_scope
//     storage, every tenant's on the storage.
//
// Sites that share a storage share one outbox, so "admin" must not mean
// "everything in the storage": another site's admin key would read and
// re-send this site's codes and resets.
const (
	adminScopeSite    = "site"
	adminScopeStorage = "storage"
)

// sees reports whether key may see and act on the message.
func (h *Handler) sees(key *apiKey, m outbox.State) bool {
	if m.OwnedBy(key.id, key.tenant) {
		return true
	}
	if !key.allow["admin"] {
		return false
	}
	if h.AdminScope == adminScopeStorage {
		return true
	}
	// a record of the layout before tenants names only a key id, which
	// does not tell sites apart: outside every site's admin scope
	return m.Tenant != "" && h.siteTenant[m.Tenant]
}

// The /messages cursor is sealed for the key that listed: AES-256-GCM
// under a key derived from the API key's secret hash, over the position
// to continue below. The position can be a message id the key may not
// see (the last batch the list's read budget reached), so a readable
// cursor would let a key page through every tenant's ids and creation
// times; a sealed one shows nothing, cannot be forged or edited, and
// opens only for the key it was made for. It needs no state and works on
// every instance and across reloads, since the secret's hash is the same
// everywhere.
const cursorLabel = "authmail cursor v1"

func cursorAEAD(key *apiKey) cipher.AEAD {
	mac := hmac.New(sha256.New, key.hash[:])
	mac.Write([]byte(cursorLabel))
	block, err := aes.NewCipher(mac.Sum(nil))
	if err != nil {
		panic(err) // a 32-byte key always makes a cipher
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return aead
}

// sealCursor makes the opaque cursor of a list position.
func sealCursor(key *apiKey, pos string) string {
	aead := cursorAEAD(key)
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(pos)+aead.Overhead())
	_, _ = rand.Read(nonce)
	return base64.RawURLEncoding.EncodeToString(aead.Seal(nonce, nonce, []byte(pos), []byte(key.tenant)))
}

var errBadCursor = errors.New("not a cursor of this key")

// openCursor returns the list position of a cursor sealed for key.
func openCursor(key *apiKey, c string) (string, error) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil {
		return "", errBadCursor
	}
	aead := cursorAEAD(key)
	if len(b) < aead.NonceSize()+aead.Overhead() {
		return "", errBadCursor
	}
	pos, err := aead.Open(nil, b[:aead.NonceSize()], b[aead.NonceSize():], []byte(key.tenant))
	if err != nil || outbox.BatchOf(string(pos)) == "" {
		return "", errBadCursor
	}
	return string(pos), nil
}
