package authmail

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// The command is its own top-level name: Caddy's command registry has no
// way to add a subcommand to another package's `caddy authmail`.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "authmail-dkim-record",
		Usage: "--config <path> [--adapter <name>]",
		Short: "Prints the DNS TXT records for the DKIM keys of authmail handlers",
		Long: `
Loads the config (a Caddyfile or JSON, like caddy run), reads the DKIM
key of every authmail handler that has a dkim block, and prints the TXT
record to publish for it, in zone-file syntax, with long values split
into strings of at most 255 characters. Only the public key is printed.
{env.*} and {file.*} placeholders in the key are expanded as at load.`,
		Flags: func() *flag.FlagSet {
			fs := flag.NewFlagSet("authmail-dkim-record", flag.ExitOnError)
			fs.String("config", "", "Configuration file (required)")
			fs.String("adapter", "", "Name of config adapter to apply")
			return fs
		}(),
		Func: func(fl caddycmd.Flags) (int, error) {
			cfgFile := fl.String("config")
			if cfgFile == "" {
				return caddy.ExitCodeFailedStartup, errors.New("--config is required")
			}
			body, _, _, err := caddycmd.LoadConfig(cfgFile, fl.String("adapter"))
			if err != nil {
				return caddy.ExitCodeFailedStartup, err
			}
			n, err := printDKIMRecords(os.Stdout, body)
			if err != nil {
				return caddy.ExitCodeFailedStartup, err
			}
			if n == 0 {
				return caddy.ExitCodeFailedStartup, errors.New("no authmail handler in the config has a dkim block")
			}
			return caddy.ExitCodeSuccess, nil
		},
	})
}

// printDKIMRecords writes one TXT record per distinct dkim block of the
// authmail handlers in the JSON config and returns how many it wrote.
func printDKIMRecords(w io.Writer, cfgJSON []byte) (int, error) {
	var root any
	if err := json.Unmarshal(cfgJSON, &root); err != nil {
		return 0, fmt.Errorf("parsing the config: %v", err)
	}
	var blocks []DKIM
	var walk func(v any)
	walk = func(v any) {
		switch t := v.(type) {
		case map[string]any:
			if t["handler"] == "authmail" {
				if raw, ok := t["dkim"]; ok {
					b, _ := json.Marshal(raw)
					var d DKIM
					if json.Unmarshal(b, &d) == nil {
						blocks = append(blocks, d)
					}
				}
			}
			// in key order, so that the output is the same every run
			for _, k := range slices.Sorted(maps.Keys(t)) {
				walk(t[k])
			}
		case []any:
			for _, c := range t {
				walk(c)
			}
		}
	}
	walk(root)
	repl := caddy.NewReplacer()
	seen := map[string]bool{}
	n := 0
	for _, d := range blocks {
		k, err := d.resolve(repl, nil, d.Domain)
		if err != nil {
			return n, err
		}
		line := k.zoneRecord()
		if seen[line] {
			continue
		}
		seen[line] = true
		fmt.Fprintln(w, line)
		n++
	}
	return n, nil
}
