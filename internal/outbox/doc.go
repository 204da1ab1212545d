// Package outbox is authmail's durable outbox: it stores accepted
// messages, delivers each through a mailer.Transport exactly once, keeps
// their states, posts their webhooks, and shares the work of a cluster
// of Caddy instances through a certmagic.Storage (file system, Redis, or
// any other storage module).
//
// The handler uses New, Configure and Release (one registration per
// provisioned handler), Start, Accept (messages in, durable entries out),
// Lookup, States, ListMessages, Requeue, QueueStats and Destruct; it
// never reads the engine's fields. inspect.go holds what tests and
// diagnostics read besides. Each promise below is tested here against a
// fake transport on FileStorage and on a real redis-server
// (crash_test.go, contract_test.go), and end to end by the handler's
// tests and ./integration.
//
// Durable on a 2xx. Accept answers within acceptTimeout (10 s). It
// returns once the batch's segment
// (authmail/seg/<batch>: every message's envelope, body and initial
// state) and then its ownership marker (authmail/own/<instance>/<batch>)
// are stored. A segment without a marker was never acknowledged to its
// request, and the janitor deletes it; a marker always has its segment.
// Requests that arrive together share one such write (appender).
//
// States, in storage (authmail/st/<batch>, or the segment's initial
// states before the first state write):
//   - queued: waiting for an attempt (also after a claim a crash cut
//     short; claims are not written, see claimGroup);
//   - sending: an attempt began and its outcome is not yet written;
//   - sent: the server answered 2xx to the final dot (captured: the file
//     got its name);
//   - failed: a permanent refusal, or retries ran past max_age;
//   - unknown: the final dot may have reached the server and no reply was
//     recorded; never resent automatically (with retry_uncertain it is
//     queued again instead);
//   - expired: a code or link still queued when it expired; never sent.
//
// sent, failed, unknown and expired are final. An outcome nobody waits
// for may wait up to stateLinger to share a write; a crash in that window
// loses the write: the dot record then says the message was accepted when
// a later mark's write carried the answer, and otherwise its mark makes
// it unknown; it is never sent twice.
//
// A crash at each point of an attempt (see dots.go):
//   - claimed, not yet attempted; dialling, in greeting, EHLO, STARTTLS,
//     AUTH, MAIL, RCPT or DATA; answered 4xx or 5xx before the dot:
//     nothing can have been delivered, no dot mark names the attempt, and
//     the next start or the adopting instance attempts it again;
//   - between the durable dot mark and the stored outcome (the dot, and
//     waiting for its reply): unknown, with last_error naming the
//     stopped instance. The server's answer to a dot travels with the
//     next mark's write until the outcome is stored, so that is at most
//     the one message per connection whose dot was in flight, or whose
//     answer no later write carried;
//   - the mark cannot be written: the dot is not sent (the connection
//     closes inside DATA, which the server discards) and the message is
//     retried.
//
// Ownership in a cluster (cluster.go, lease.go, fence.go). Every
// instance heartbeats authmail/inst/<instance> every lease/4.
//
// The fencing invariant: an instance accepts mail, starts an SMTP
// transaction and sends a final dot only while its ownership is valid,
// that is before sent + lease − margin (margin = lease/5) by its
// monotonic clock, where sent is when it sent its last heartbeat write
// that the storage acknowledged. The check runs at each of those points,
// the last one right before the dot, after the dot's mark is durable; a
// timer ends the ownership at that instant whether the storage errs,
// stalls or stays silent, and cancels every attempt's waits. After a
// lapse, the instance re-establishes its ownership before it does any
// work: under its adoption lock it raises its fencing epoch, writes its
// heartbeat, checks that no adopter raised the epoch meanwhile, and drops
// from memory, without writing, every batch whose marker is gone.
//
// An instance whose heartbeat another instance has read unchanged for
// lease + margin, by that reader's monotonic clock since its first read
// of that value, is adopted by it under the adoption lock: it raises the
// stale instance's epoch (only if the heartbeat is still the one it
// watched), then moves each marker to itself together with the batch's
// state, rebuilt by the rules above from the stale instance's dot
// records. The stale instance stopped working 2 × margin before.
//
// Writes that matter after a takeover (a batch's state, the takeover's
// state-and-marker moves, accepted batches, dot records) carry the
// epochs they were made under and a deadline, and are refused by the
// storage when an epoch moved on or the deadline passed: atomically on
// Redis (one Lua script), under the storage's lock elsewhere (fence.go
// says what that leaves open). A write whose outcome is unknown returns
// only once the storage would refuse it, so a record never moves
// backwards. Two live processes never run as one instance: a process that
// reads an instance id whose heartbeat another live process writes takes
// an identity of its own (identity.go).
//
// Fair between keys. Workers take the due messages of the highest lane
// first (codes and links, then /send, then bulk, each lower lane with
// its bulk_share), and inside a lane the keys by turns, so that one
// key's backlog delays another key's message by a message or two
// besides the attempts in progress (lanes.go). max_queued keeps room
// for codes and links, and max_queued_per_key bounds one key's part of
// the queue (quota.go).
//
// The storage layout, every key under authmail/, is listed in
// store.go; an outbox folder written by an earlier version must
// stay readable (the handler's testdata/golden-storage and its test).
package outbox
