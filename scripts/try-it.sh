#!/usr/bin/env bash
# Walks through what a running authmail gateway does, by default the one
# started from examples/Caddyfile, with that file's development keys:
#
#   go run ./cmd/caddy run --config examples/Caddyfile   # in one terminal
#   ./scripts/try-it.sh                                   # in another
#
# It sends one message of every kind (key app), has authmail issue a code
# and verifies it (key auth), asks the console endpoints (key console):
# /status, /messages, /test, and prints the preview page's address. Then
# look at the .eml files in ./captured-mail.
#
# Run it from the directory the gateway runs in, or set
# AUTHMAIL_CAPTURE_DIR to the gateway's capture directory: the issued code
# is read from the captured mail, as a user reads it from theirs.
set -euo pipefail

base=${AUTHMAIL_URL:-http://localhost:8080/authmail}
key=${AUTHMAIL_KEY:-dev-app-key-change-me-0123}
auth_key=${AUTHMAIL_AUTH_KEY:-dev-auth-key-change-me-0123}
console_key=${AUTHMAIL_CONSOLE_KEY:-dev-console-key-change-me-01}
capture_dir=${AUTHMAIL_CAPTURE_DIR:-./captured-mail}
origin=${base%/authmail*} # links must be on the gateway's base_url origin

send() {
	printf '%-22s ' "$1"
	curl -sS -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d "$2" "$base$1"
}

# call <key> <path> [<JSON body>]: a GET without a body, else a POST
call() {
	local args=(-sS -H "Authorization: Bearer $1")
	if [ $# -gt 2 ]; then
		args+=(-H 'Content-Type: application/json' -d "$3")
	fi
	curl "${args[@]}" "$base$2"
}

# field <name> <JSON>: a string field of a one-line JSON answer
field() {
	printf '%s' "$2" | sed -n 's/.*"'"$1"'":"\([^"]*\)".*/\1/p'
}

printf '%-22s ' /health
curl -sS "$base/health"
echo
echo "One message of every kind, with codes and tokens the app made (key app):"
send /send/otp '{"to":"jane@example.com","user_name":"Jane","code":"482913"}'
send /send/magic-link '{"to":"jane@example.com","token":"magic-token-123"}'
send /send/password-reset '{"to":"jane@example.com","token":"reset-token-456"}'
send /send/verify-email '{"to":"jane@example.com","link":"'"$origin"'/verify?code=789"}'
send /send/email-change '{"to":"jane.new@example.com","old_email":"jane@example.com","token":"change-token-abc"}'
send /send/security-alert '{"to":"jane@example.com","event":"new_login","ip":"203.0.113.7","user_agent":"Firefox on Linux","location":"Berlin, DE"}'
send /send '{"to":"jane@example.com","subject":"Your receipt","html_body":"<h1>Thanks!</h1><p>Order <b>#1042</b> is paid.</p>"}'

echo
echo "A code that authmail issues, and its verification (key auth):"
printf '%-22s ' '/send/otp code:auto'
issued=$(call "$auth_key" /send/otp '{"to":"jane@example.com","code":"auto","purpose":"login"}')
echo "$issued"
id=$(field id "$issued")
challenge=$(field challenge_id "$issued")
# the user reads the code in the mail; here, in its capture file
# (<time>-<message id>.eml), the text part's indented line
mail=$(ls "$capture_dir"/*-"$id".eml 2>/dev/null || true)
if [ -z "$id" ] || [ -z "$challenge" ] || [ -z "$mail" ]; then
	echo "no captured mail for message ${id:-?} in $capture_dir: run this from the directory the gateway runs in, or set AUTHMAIL_CAPTURE_DIR" >&2
	exit 1
fi
code=$(tr -d '\r' <"$mail" | sed -n 's/^    \([^ ]*\)$/\1/p' | head -n 1)
printf '%-22s %s (in %s)\n' 'the code in the mail' "$code" "$mail"
printf '%-22s ' /verify/otp
call "$auth_key" /verify/otp '{"challenge_id":"'"$challenge"'","code":"'"$code"'","ip":"198.51.100.7"}'
printf '%-22s ' "/messages/{id}"
call "$auth_key" "/messages/$id"

echo
echo "The console (key console):"
# /status is the whole effective configuration; show where mail goes and
# the queue (the full answer if its layout ever changes)
printf '%-22s ' /status
call "$console_key" /status | sed 's/.*\("delivery":{[^}]*}\).*\("queue":{[^}]*}[^}]*}\).*/{\1,\2,…}/'
printf '%-22s ' '/messages?limit=3'
call "$console_key" '/messages?limit=3'
printf '%-22s ' /test
call "$console_key" /test '{"to":"jane@example.com"}'

echo
echo "Open the preview page and the dev mailbox (every flow rendered, the outbox, the captured mail) in a browser:"
echo "  $base/preview"
echo "  it asks for a user name and password: any user name, and the console key as the password ($console_key)"
