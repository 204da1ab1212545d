// Package pace keeps the mail to one SMTP server within what the server
// accepts.
//
// Classify reads a server's reply and tells whether it means "slow
// down": the sending rate (Rate), the number of connections
// (Connections), a used-up daily quota (Quota), or one recipient's
// mailbox receiving too fast (Recipient, which leaves the server's rate
// alone). The table behind it comes from the replies Amazon SES,
// Microsoft 365, Gmail and Google Workspace, Yahoo and Postfix document;
// greylisting and replies that only say "try again later" are not rate
// signals.
//
// A Pacer is a token bucket at the configured rate (`rate 14/1s`) with
// an AIMD current rate under it: a throttling reply multiplies the
// current rate by Decrease (once per Hold, and not again for replies to
// messages sent before the decrease), successful sends add Increase per
// second back up to the cap. Without a configured rate the pacer is
// unlimited until the first throttling reply, then starts from the
// measured send rate times Decrease, and is unlimited again after
// Recover without throttling. A Quota reply pauses the server for
// QuotaPause. The pacer never sleeps on its own: Reserve and Next tell
// a scheduler when the next message may leave, Wait blocks one caller
// on one timer. It holds no goroutine and no timer between calls.
//
// A Share divides the configured rate among the instances of a cluster
// through the Caddy storage, by demand, and carries a throttle or quota
// pause seen by one instance to the others. When the storage cannot be
// reached, an instance keeps its last share until the others stop
// counting it, then sends at the least share (see Share).
//
// Failure behaviour in one line each: a pacer with a cap never lets out
// more than the cap plus Burst in any window of that length; a reply
// misread as a throttle costs one decrease, recovered additively; a
// throttle missed (a text the table lacks) leaves the message to the
// engine's retry_backoff, as before pacing.
package pace
