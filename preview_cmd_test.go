package authmail

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-authmail/authmail/internal/mailtest"
)

// TestPreviewCommand renders a flow of examples/Caddyfile into files,
// with custom templates, without a server or storage.
func TestPreviewCommand(t *testing.T) {
	if _, ok := caddycmd.Commands()["authmail-preview"]; !ok {
		t.Fatal("caddy authmail-preview is not registered")
	}
	dir := t.TempDir()
	tpl := filepath.Join(dir, "tpl")
	if err := os.MkdirAll(tpl, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tpl, "otp.subject"), []byte("Custom code for {{.AppName}}"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfg, []byte(`:8080 {
	authmail {
		capture `+filepath.Join(dir, "mail")+`
		from no-reply@example.com "Example App"
		base_url https://app.example.com
		key app {env.AUTHMAIL_PREVIEW_CMD_UNSET_KEY}
		templates `+tpl+`
	}
}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	files, err := previewToDir(cfg, "", "otp", "", out)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 || !strings.HasSuffix(files[0], "otp.eml") {
		t.Fatalf("files %v", files)
	}
	eml, _ := os.ReadFile(filepath.Join(out, "otp.eml"))
	m, err := mailtest.Parse(eml)
	if err != nil || m.Subject != "Custom code for Example App" || !strings.Contains(m.Text, "482913") {
		t.Fatalf("%v %q", err, m.Subject)
	}
	html, _ := os.ReadFile(filepath.Join(out, "otp.html"))
	txt, _ := os.ReadFile(filepath.Join(out, "otp.txt"))
	if !strings.Contains(string(html), "482913") || !strings.Contains(string(txt), "482913") {
		t.Fatal("the .html or .txt lacks the code")
	}
	if _, err := os.Stat(filepath.Join(dir, "mail")); !os.IsNotExist(err) {
		t.Fatal("the command touched the capture directory")
	}
	// --locale renders the flow in that locale (ko is built in)
	koDir := filepath.Join(dir, "ko")
	if _, err := previewToDir(cfg, "", "otp", "ko", koDir); err != nil {
		t.Fatal(err)
	}
	koTxt, _ := os.ReadFile(filepath.Join(koDir, "otp.txt"))
	if !strings.Contains(string(koTxt), "482913") || !strings.Contains(string(koTxt), "분") {
		t.Fatalf("the ko text part is not Korean:\n%s", koTxt)
	}
	for _, c := range []struct{ flow, locale, want string }{
		{"nope", "", "--flow must be one of"}, {"otp", "ko_KR", "locale"}} {
		if _, err := previewToDir(cfg, "", c.flow, c.locale, out); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v", c, err)
		}
	}
	if _, err := previewToDir(filepath.Join(dir, "missing"), "", "otp", "", out); err == nil {
		t.Error("a missing config was accepted")
	}
}

// TestPreviewSubcommand: the subcommand form runs the same code.
func TestPreviewSubcommand(t *testing.T) {
	cmd := previewSubcommand()
	cmd.SetArgs([]string{"--config", filepath.Join(t.TempDir(), "missing"), "--flow", "otp"})
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("%v", err)
	}
}
