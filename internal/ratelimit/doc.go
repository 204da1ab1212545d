// Package ratelimit counts events per key in sliding windows and shares
// the counts across the instances of a cluster through a Caddy storage.
//
// What is limited is up to the caller: a key is an opaque string, and a
// Spec allows N events per Window. authmail limits the requests of an
// API key's tenant ("k:<tenant>"), the auth flows sent to one recipient
// ("r:<flow>:<hash>") and failed authentication per client
// ("a:<hash>", "a:v:<hash>"). Keys must never hold an address or an IP
// in clear: Hash gives a salted hash of a value for them, and the salt
// is the cluster's (LoadSalt), so every instance hashes alike.
//
// A Limiter keeps, per key, the times of at most the N most recent
// events (N of the last Spec used with the key), in memory. Take and
// TakeAll admit and count an event; Blocked and Record check and count
// separately (failures are counted after the fact). Retry-after times
// are at least a second.
//
// # Cluster
//
// Sync publishes this instance's events and reads every other
// instance's, without locks: the limits are shared approximately (a
// peer's events count from its last published round on), not exactly.
// Under prefix (authmail uses "authmail") the storage holds:
//
//	<prefix>/rl/<instance>  one instance's events, JSON:
//	                        {"instance":"<instance>","updated":"<RFC 3339>",
//	                         "events":{"<key>":[<unix ms>,...],...}}
//	                        written by its instance every round (once more
//	                        when it has no events left, then not until it
//	                        has some); a state older than 7 days, or one
//	                        that names another instance, is not counted;
//	                        Forget deletes it
//	<prefix>/salt           the cluster's hashing salt, 32 random bytes,
//	                        created once by the first LoadSalt, under the
//	                        storage lock "<prefix>_salt"
//
// The layout and the JSON are shared by every version in a cluster:
// they do not change.
//
// # Failure
//
// Storage down: a Sync that cannot publish leaves the others counting
// this instance's last published events; one that cannot list or read
// keeps the peers' events of the last round that could (they leave
// their windows as time passes). Either way every instance keeps
// enforcing its own events in full: at worst a limit holds per instance
// instead of for the cluster (N events on each), never looser, and it
// is shared again from the first round that succeeds. Sync returns the
// error; Take and the others never wait on the storage.
// A LoadSalt that fails leaves the caller to hash with NewRandomSalt:
// its limits then match no peer's (and its hashes no one else's) until
// a later LoadSalt succeeds; the events hashed meanwhile leave with
// their windows.
package ratelimit
