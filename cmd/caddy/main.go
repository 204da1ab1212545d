// Command caddy is Caddy with its standard modules plus authmail, for
// local builds: go build -o caddy ./cmd/caddy
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// plug in Caddy's standard modules
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	// plug in authmail
	_ "github.com/caddy-authmail/authmail"

	// Redis storage (caddy.storage.redis), so that the repository's own
	// binary can run a cluster on Redis, as the integration tests do
	_ "github.com/pberkel/caddy-storage-redis"
)

func main() {
	caddycmd.Main()
}
