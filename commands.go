package authmail

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// The `caddy authmail` commands, registered with Caddy's command
// framework so that every Caddy binary built with the module has them.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "authmail",
		Usage: "test|hash-key",
		Short: "Commands of the authmail email gateway",
		Long: `
Commands of the authmail handler (http.handlers.authmail):

  caddy authmail test --config <file> [--adapter <name>] --to <address>
      Sends a test message with the SMTP settings (or capture directory)
      of the config's authmail handler, built and DKIM-signed as the API
      builds and signs its mail, without starting a server or touching
      the outbox, and prints what the SMTP server answered. Exits 0 when
      the message was accepted, 1 with the error code.

  caddy authmail hash-key
      Reads an API key secret on stdin and prints its sha256: form, to
      write in the config instead of the secret.

Two more commands of the module have names of their own (Caddy cannot
add a subcommand to a command registered elsewhere):

  caddy authmail-preview --config <file> --flow <flow> [--locale <locale>] [--out <dir>]
      Writes a flow rendered with sample data as .eml, .html and .txt.

  caddy authmail-dkim-record --config <file> [--adapter <name>]
      Prints the DNS TXT record to publish for the configured DKIM key.
`,
		CobraFunc: func(cmd *cobra.Command) {
			test := &cobra.Command{
				Use:   "test --config <file> [--adapter <name>] --to <address> [--path-prefix <path>] [--site <host>]",
				Short: "Sends a test message through the configured SMTP server",
				Long: `
Loads the config, finds its authmail handler and sends a short test
message to --to with that handler's SMTP settings (or writes it into its
capture directory), without starting a server or touching the outbox.
The message is the one POST /test sends, with the headers every message
of the handler has and, with dkim configured, its DKIM signature; the
output says whether it was signed, and with which selector.
{env.*} and {file.*} placeholders are read from this command's
environment, as the running Caddy would read them from its own.

If the config has several authmail handlers, pick one with --path-prefix
(its path_prefix, default /authmail) and/or --site (a host its site
matches).

Prints the SMTP server's answer and exits 0, or prints the error code and
exits 1. Secrets are never printed.
`,
				Args: cobra.NoArgs,
				RunE: caddycmd.WrapCommandFuncForCobra(cmdAuthmailTest),
			}
			test.Flags().StringP("config", "c", "", "Configuration file (default: ./Caddyfile)")
			test.Flags().StringP("adapter", "a", "", "Name of config adapter to apply")
			test.Flags().String("to", "", "Recipient of the test message (required)")
			test.Flags().String("path-prefix", "", "Pick the authmail handler with this path_prefix")
			test.Flags().String("site", "", "Pick the authmail handler of the site that matches this host")
			hashKey := &cobra.Command{
				Use:   "hash-key",
				Short: "Prints the sha256: form of an API key secret read on stdin",
				Long: `
Reads one API key secret from stdin (a trailing newline is ignored) and
prints sha256:<hex>, which a key line accepts instead of the secret:

    openssl rand -hex 32 | tee key.txt | caddy authmail hash-key
`,
				Args: cobra.NoArgs,
				RunE: caddycmd.WrapCommandFuncForCobra(func(caddycmd.Flags) (int, error) {
					return cmdAuthmailHashKey(os.Stdin, os.Stdout)
				}),
			}
			cmd.AddCommand(test, hashKey)
		},
	})
}

// cmdAuthmailHashKey prints the sha256: form of the secret on in.
func cmdAuthmailHashKey(in io.Reader, out io.Writer) (int, error) {
	line, err := bufio.NewReader(io.LimitReader(in, 64<<10)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return 1, fmt.Errorf("reading the secret from stdin: %v", err)
	}
	secret := strings.TrimRight(line, "\r\n")
	if len(secret) < minSecretLength {
		return 1, fmt.Errorf("the secret on stdin is shorter than %d characters", minSecretLength)
	}
	sum := sha256.Sum256([]byte(secret))
	fmt.Fprintln(out, "sha256:"+hex.EncodeToString(sum[:]))
	return 0, nil
}

// foundHandler is an authmail handler found in a JSON config.
type foundHandler struct {
	raw   map[string]any
	hosts []string // the host matchers of its site, if any
}

func (f foundHandler) prefix() string {
	if p, _ := f.raw["path_prefix"].(string); p != "" {
		return p
	}
	return defaultPathPrefix
}

func (f foundHandler) String() string {
	site := "any host"
	if len(f.hosts) > 0 {
		site = strings.Join(f.hosts, " ")
	}
	return fmt.Sprintf("path_prefix %s on %s", f.prefix(), site)
}

// findHandlers walks a JSON config for authmail handlers, noting the
// host matchers of the routes that enclose each.
func findHandlers(v any, hosts []string, out *[]foundHandler) {
	switch x := v.(type) {
	case map[string]any:
		if sets, ok := x["match"].([]any); ok {
			var hs []string
			for _, s := range sets {
				if m, ok := s.(map[string]any); ok {
					for _, h := range asStrings(m["host"]) {
						hs = append(hs, h)
					}
				}
			}
			if len(hs) > 0 {
				hosts = hs
			}
		}
		if x["handler"] == "authmail" {
			*out = append(*out, foundHandler{raw: x, hosts: hosts})
			return
		}
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		slices.Sort(keys) // a stable order for the candidates list
		for _, k := range keys {
			findHandlers(x[k], hosts, out)
		}
	case []any:
		for _, e := range x {
			findHandlers(e, hosts, out)
		}
	}
}

func asStrings(v any) []string {
	l, _ := v.([]any)
	out := make([]string, 0, len(l))
	for _, e := range l {
		if s, ok := e.(string); ok {
			out = append(out, s)
		}
	}
	return out
}

// pickHandler returns the one handler that the flags select.
func pickHandler(all []foundHandler, prefix, site string) (foundHandler, error) {
	var picked []foundHandler
	for _, f := range all {
		if prefix != "" && strings.TrimSuffix(f.prefix(), "/") != strings.TrimSuffix(prefix, "/") {
			continue
		}
		if site != "" && !slices.ContainsFunc(f.hosts, func(h string) bool { return strings.EqualFold(h, site) }) {
			continue
		}
		picked = append(picked, f)
	}
	names := func(fs []foundHandler) string {
		s := make([]string, len(fs))
		for i, f := range fs {
			s[i] = f.String()
		}
		return strings.Join(s, "; ")
	}
	switch {
	case len(all) == 0:
		return foundHandler{}, errors.New("the config has no authmail handler")
	case len(picked) == 0:
		return foundHandler{}, fmt.Errorf("no authmail handler matches --path-prefix/--site; the config has: %s", names(all))
	case len(picked) > 1:
		return foundHandler{}, fmt.Errorf("the config has %d authmail handlers (%s); pick one with --path-prefix and/or --site", len(picked), names(picked))
	}
	return picked[0], nil
}

// cmdAuthmailTest implements caddy authmail test.
func cmdAuthmailTest(fl caddycmd.Flags) (int, error) {
	to := fl.String("to")
	if to == "" {
		return caddy.ExitCodeFailedStartup, errors.New("--to <address> is required")
	}
	cfgJSON, _, _, err := caddycmd.LoadConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if len(cfgJSON) == 0 {
		return caddy.ExitCodeFailedStartup, errors.New("no config: give --config <file> (or run where a Caddyfile is)")
	}
	var cfg any
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("decoding the config: %v", err)
	}
	var all []foundHandler
	findHandlers(cfg, nil, &all)
	f, err := pickHandler(all, fl.String("path-prefix"), fl.String("site"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	raw, _ := json.Marshal(f.raw)
	h := new(Handler)
	if err := json.Unmarshal(raw, h); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("authmail handler (%s): %v", f, err)
	}
	res, err := h.sendTestMessage(context.Background(), to)
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("authmail handler (%s): %v", f, err)
	}
	fmt.Printf("handler:       %s\n", f)
	fmt.Printf("transport:     %s\n", res.transport)
	fmt.Printf("dkim:          %s\n", res.dkim)
	fmt.Printf("message_id:    %s\n", res.MessageID)
	fmt.Printf("status:        %s\n", res.Status)
	if res.SMTPResponse != "" {
		fmt.Printf("smtp_response: %s\n", res.SMTPResponse)
	}
	fmt.Printf("duration_ms:   %d\n", res.DurationMS)
	if res.ErrorCode != "" {
		fmt.Printf("error_code:    %s\n", res.ErrorCode)
		fmt.Printf("message:       %s\n", res.Message)
		return 1, errors.New(res.ErrorCode)
	}
	return 0, nil
}

// cliTestResult is the outcome of sendTestMessage.
type cliTestResult struct {
	testResponse
	transport string
	dkim      string // whether and how the message was signed
}

// sendTestMessage sends the /test message to one address with the
// handler's configuration, as checked by Provision, but without a
// server, storage, outbox or engine. The message is POST /test's, built
// by the same code from the same provisioned settings (addresses,
// templates and locale, the DKIM key), so it carries what every message
// of the running handler carries, its DKIM signature included: a check
// that left the signature out would pass a key the receivers reject. The
// SMTP senders are its own (not the pooled ones a running Caddy uses)
// and closed afterwards. An error is a configuration or address
// problem; a delivery failure is in the result.
func (h *Handler) sendTestMessage(ctx context.Context, addr string) (cliTestResult, error) {
	if err := h.checkConfig(); err != nil {
		return cliTestResult{}, err
	}
	h.logger = zap.NewNop()
	h.provisionAddresses()
	repl := caddy.NewReplacer()
	if err := h.provisionMessages(repl); err != nil {
		return cliTestResult{}, err
	}
	res := cliTestResult{dkim: "not signed: dkim is not configured"}
	if k := h.dkim; k != nil {
		res.dkim = fmt.Sprintf("signed with selector %s for %s (%s; receivers look up %s)", k.selector, k.domain, k.algorithm(), k.recordName())
	}
	to, p := parseAddress(addr)
	if p != "" {
		return cliTestResult{}, fmt.Errorf("--to '%s' %s", addr, p)
	}
	if aerr := h.checkRecipients("to", []mailAddr{to}); aerr != nil {
		return cliTestResult{}, fmt.Errorf("--to: %s", aerr.Message)
	}
	switch {
	case h.Capture != "":
		dir := h.Capture
		if abs, err := filepath.Abs(dir); err == nil {
			dir = abs
		}
		h.transport = &mailer.Capture{Dir: h.Capture}
		res.transport = "capture " + dir
	case len(h.SMTPServers) > 0:
		// a failover list, tried in order as the running handler tries it
		var senders []*mailer.Sender
		var names []string
		for i := range h.SMTPServers {
			settings, err := h.SMTPServers[i].resolve(repl, h.logger)
			if err != nil {
				return cliTestResult{}, fmt.Errorf("smtp_servers[%d]: %w", i, err)
			}
			s := mailer.NewSender(settings)
			defer s.Destruct()
			senders = append(senders, s)
			names = append(names, fmt.Sprintf("%s:%d (%s)", settings.Host, settings.Port, settings.TLSMode))
		}
		f := mailer.NewFailover(senders)
		defer f.Destruct()
		h.transport = f
		res.transport = "smtp failover " + strings.Join(names, ", ")
	default:
		settings, err := h.SMTP.resolve(repl, h.logger)
		if err != nil {
			return cliTestResult{}, err
		}
		s := mailer.NewSender(settings)
		defer s.Destruct()
		h.transport = s
		res.transport = fmt.Sprintf("smtp %s:%d (%s)", settings.Host, settings.Port, settings.TLSMode)
	}
	env, err := h.buildEnvelope(h.testMessage(to), time.Now())
	if err != nil {
		return cliTestResult{}, fmt.Errorf("rendering the test message: %v", err)
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	d, serr := h.transport.Send(ctx, env)
	res.MessageID, res.DurationMS = env.MessageID, time.Since(start).Milliseconds()
	if serr == nil {
		res.Sent, res.Status, res.SMTPResponse = true, d.Status, d.Response
		return res, nil
	}
	de, _ := serr.(*mailer.Error)
	if de == nil {
		de = &mailer.Error{Code: mailer.CodeSMTPConnection, Phase: mailer.PhaseConnect, Err: serr}
	}
	res.Status, res.ErrorCode, res.Message = "failed", de.Code, de.Error()
	if de.Reply != nil {
		res.SMTPResponse = de.Reply.String()
	}
	return res, nil
}
