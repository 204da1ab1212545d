package authmail

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// `caddy authmail-preview` writes a flow rendered with the preview's
// sample data as .eml, .html and .txt files, from a config file, without
// starting a server or touching the outbox storage. It is its own
// command rather than `caddy authmail preview`: Caddy's command registry
// has no way to add a subcommand to a command registered elsewhere.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "authmail-preview",
		Usage: "--config <file> --flow <flow> [--locale <locale>] [--out <dir>]",
		Short: "Writes a flow of the authmail handler rendered with sample data as .eml, .html and .txt",
		Long: `Loads the config (a Caddyfile, or JSON when the name ends in .json),
takes its first authmail handler, renders the flow's templates (custom
ones included) with the preview page's sample data, and writes
<flow>.eml, <flow>.html and <flow>.txt into --out (default: the current
directory). No server is started and no storage is touched.`,
		CobraFunc: previewFlags,
	})
}

// previewFlags sets up the command's flags and run function.
func previewFlags(cmd *cobra.Command) {
	cmd.Flags().StringP("config", "c", "", "Configuration file (required)")
	cmd.Flags().StringP("adapter", "a", "", "Name of config adapter (default: caddyfile, or none for .json)")
	cmd.Flags().String("flow", "", "Flow to render: "+strings.Join(templateFlows, ", ")+" (required)")
	cmd.Flags().String("locale", "", "Locale of the templates, e.g. ko or de-AT (default: the config's)")
	cmd.Flags().StringP("out", "o", ".", "Directory to write the files into")
	cmd.RunE = caddycmd.WrapCommandFuncForCobra(func(fl caddycmd.Flags) (int, error) {
		files, err := previewToDir(fl.String("config"), fl.String("adapter"), fl.String("flow"), fl.String("locale"), fl.String("out"))
		if err != nil {
			return 1, err
		}
		for _, f := range files {
			fmt.Println(f)
		}
		return 0, nil
	})
}

// previewSubcommand is the same command as a subcommand, for a `caddy
// authmail` command group to add with cmd.AddCommand(previewSubcommand()).
func previewSubcommand() *cobra.Command {
	cmd := &cobra.Command{Use: "preview --config <file> --flow <flow> [--locale <locale>] [--out <dir>]",
		Short: "Writes a flow rendered with sample data as .eml, .html and .txt"}
	previewFlags(cmd)
	return cmd
}

// previewToDir renders flow from the config file and writes its files.
func previewToDir(configFile, adapter, flow, locale, out string) ([]string, error) {
	if configFile == "" {
		return nil, errors.New("--config is required")
	}
	if !slices.Contains(templateFlows, flow) {
		return nil, fmt.Errorf("--flow must be one of %s", strings.Join(templateFlows, ", "))
	}
	h, err := handlerFromConfig(configFile, adapter)
	if err != nil {
		return nil, err
	}
	if err := h.provisionTemplatesOnly(); err != nil {
		return nil, err
	}
	q := url.Values{}
	if locale != "" {
		q.Set("locale", locale)
	}
	s, _, aerr := parsePreviewQuery(q)
	if aerr != nil {
		return nil, errors.New(aerr.Message)
	}
	pe, data := h.previewFlow(flow, s)
	if data == nil {
		return nil, fmt.Errorf("flow %s: %s", flow, pe.Error)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	var files []string
	for ext, b := range map[string][]byte{".eml": data, ".html": []byte(pe.HTML), ".txt": []byte(pe.Text)} {
		p := filepath.Join(out, flow+ext)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return nil, err
		}
		files = append(files, p)
	}
	slices.Sort(files)
	return files, nil
}

// handlerFromConfig reads the config file, adapts it to JSON and decodes
// its first authmail handler.
func handlerFromConfig(configFile, adapter string) (*Handler, error) {
	body, err := os.ReadFile(configFile)
	if err != nil {
		return nil, err
	}
	if adapter == "" && !strings.HasSuffix(configFile, ".json") {
		adapter = "caddyfile"
	}
	if adapter != "" {
		a := caddyconfig.GetAdapter(adapter)
		if a == nil {
			return nil, fmt.Errorf("unrecognized config adapter: %s", adapter)
		}
		if body, _, err = a.Adapt(body, map[string]any{"filename": configFile}); err != nil {
			return nil, fmt.Errorf("adapting %s: %w", configFile, err)
		}
	}
	var cfg any
	if err := json.Unmarshal(body, &cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", configFile, err)
	}
	raw := findAuthmail(cfg)
	if raw == nil {
		return nil, fmt.Errorf("%s has no authmail handler", configFile)
	}
	b, _ := json.Marshal(raw)
	var h Handler
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("the authmail handler of %s: %w", configFile, err)
	}
	return &h, nil
}

// findAuthmail returns the first JSON object with "handler": "authmail".
func findAuthmail(v any) map[string]any {
	switch x := v.(type) {
	case map[string]any:
		if x["handler"] == "authmail" {
			return x
		}
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if m := findAuthmail(x[k]); m != nil {
				return m
			}
		}
	case []any:
		for _, e := range x {
			if m := findAuthmail(e); m != nil {
				return m
			}
		}
	}
	return nil
}

// provisionTemplatesOnly sets up what rendering needs (the parts of
// Provision that read no secret, open no connection and no storage):
// the config checks, addresses, app name, links and templates.
func (h *Handler) provisionTemplatesOnly() error {
	if err := h.checkConfig(); err != nil {
		return err
	}
	h.prefix = strings.TrimSuffix(firstNonEmpty(h.PathPrefix, defaultPathPrefix), "/")
	h.provisionAddresses()
	if h.baseOrigin != "" {
		h.origins = []string{h.baseOrigin}
	}
	var err error
	h.tmpl, err = loadTemplates(h.Templates)
	return err
}
