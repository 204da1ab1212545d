// Package redact removes secrets from text that authmail did not write:
// an SMTP server's reply, an OAuth2 token endpoint's error code and
// description, the text of an error from the network or the OS. Such
// text ends up in last_error and smtp_response (readable by any app key
// through GET /messages/{id} and GET /messages), in log fields, in the
// answer of a test send and in webhooks, and a server may echo what it
// was sent: the request form of a refresh, the base64 of an AUTH
// exchange.
//
// The promise: given the secrets in play, the output of Line holds none
// of them in any of these encodings, alone or mixed in one text:
//
//   - raw;
//   - URL, query or form encoded: %XX in upper or lower case, + for a
//     space, unreserved characters escaped or not;
//   - base64, standard or URL alphabet, padded or not, on its own or
//     inside a longer base64 text at any of the three byte alignments
//     (what a server shows when it echoes a whole AUTH PLAIN or XOAUTH2
//     exchange), and base64 of one of the other encodings (a base64'd
//     request form);
//   - JSON-escaped: \/, \uXXXX in either case, surrogate pairs;
//   - quoted-printable, soft line breaks included;
//   - one of these inside another (URL encoding of a JSON-escaped text,
//     JSON or URL encoding of base64, base64 of a URL-encoded form).
//
// Besides the known secrets, the value of a key=value or "key":"value"
// pair whose key names a secret (client_secret, refresh_token,
// access_token, password, assertion, code, token, api_key, …) is removed
// whatever it is, in any of the encodings above: a rotated token or
// another client's secret is not in the set, and the name gives it away.
// What is removed becomes [redacted]; the names stay, so that
// "client_secret=[redacted]" still says what the server complained
// about.
//
// The output is one line without control or format characters (no
// terminal escapes, no bidirectional overrides), valid UTF-8, at most
// max bytes. It is checked again after the cleaning: should a secret
// still show (a text built so that the marker or the removal of a
// control character completes one), the text is redacted again, and
// withheld as a whole if that does not help. Secrets shorter than
// MinSecret bytes are not looked for: they would match ordinary words.
//
// Code vets an error code a server supplies: it is kept only when it is
// a plain token ([a-z0-9_]{1,64}) that holds no secret.
package redact
