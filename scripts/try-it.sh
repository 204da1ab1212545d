#!/usr/bin/env bash
# Sends one message of every kind through a running authmail gateway,
# by default the one started from examples/Caddyfile:
#
#   go run ./cmd/caddy run --config examples/Caddyfile   # in one terminal
#   ./scripts/try-it.sh                                   # in another
#
# then look at the .eml files in ./captured-mail.
set -euo pipefail

base=${AUTHMAIL_URL:-http://localhost:8080/authmail}
key=${AUTHMAIL_KEY:-dev-key-change-me-0123456789}
origin=${base%/authmail*} # links must be on the gateway's base_url origin

send() {
	printf '%-22s ' "$1"
	curl -sS -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d "$2" "$base$1"
}

printf '%-22s ' /health
curl -sS "$base/health"
send /send/otp '{"to":"jane@example.com","user_name":"Jane","code":"482913"}'
send /send/magic-link '{"to":"jane@example.com","token":"magic-token-123"}'
send /send/password-reset '{"to":"jane@example.com","token":"reset-token-456"}'
send /send/verify-email '{"to":"jane@example.com","link":"'"$origin"'/verify?code=789"}'
send /send/email-change '{"to":"jane.new@example.com","old_email":"jane@example.com","token":"change-token-abc"}'
send /send/security-alert '{"to":"jane@example.com","event":"new_login","ip":"203.0.113.7","user_agent":"Firefox on Linux","location":"Berlin, DE"}'
send /send '{"to":"jane@example.com","subject":"Your receipt","html_body":"<h1>Thanks!</h1><p>Order <b>#1042</b> is paid.</p>"}'
