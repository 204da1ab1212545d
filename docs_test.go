package authmail

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// The documentation is README.md (what authmail is, the quick start, a
// production example) and the reference pages in docs/. These tests hold
// the reference to the code: every Caddyfile subdirective, JSON field,
// endpoint, error code, metric, placeholder and command the code has is
// named on the page that documents it, and every link between the pages
// resolves, anchors included.

// docPage returns a documentation file, by its path from the repository
// root.
func docPage(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.FromSlash(name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// docPages is every Markdown page of the documentation.
func docPages(t *testing.T) []string {
	t.Helper()
	pages, err := filepath.Glob(filepath.Join("docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range pages {
		pages[i] = filepath.ToSlash(p)
	}
	return append([]string{"README.md", "SECURITY.md"}, pages...)
}

// codeTokens returns the words a Markdown page writes as code: the words
// of every `code span`, and of every line of its fenced code blocks.
func codeTokens(page string) map[string]bool {
	words := map[string]bool{}
	add := func(s string) {
		for _, w := range strings.FieldsFunc(s, func(r rune) bool {
			return r == ' ' || r == '\t' || r == ',' || r == '|' || r == '[' || r == ']' || r == '"' || r == '{' || r == '}' || r == '(' || r == ')' || r == ':'
		}) {
			words[w] = true
		}
	}
	inFence := false
	for line := range strings.SplitSeq(page, "\n") {
		if strings.HasPrefix(line, "```") {
			inFence = !inFence
			continue
		}
		if inFence {
			add(line)
			continue
		}
		for i, span := range strings.Split(line, "`") {
			if i%2 == 1 {
				add(span)
			}
		}
	}
	return words
}

// mdHeadings returns the headings of a page outside code blocks.
func mdHeadings(page string) []string {
	var out []string
	inFence := false
	for line := range strings.SplitSeq(page, "\n") {
		if strings.HasPrefix(line, "```") {
			inFence = !inFence
			continue
		}
		if !inFence && strings.HasPrefix(line, "#") {
			if h, ok := strings.CutPrefix(strings.TrimLeft(line, "#"), " "); ok {
				out = append(out, h)
			}
		}
	}
	return out
}

// slugRE is what GitHub drops from a heading to make its anchor.
var slugRE = regexp.MustCompile(`[^\p{L}\p{N} _-]`)

// anchors returns the anchors GitHub gives a page's headings: lower
// case, punctuation dropped, spaces as hyphens, a repeated one with -1,
// -2 ….
func anchors(page string) map[string]bool {
	out := map[string]bool{}
	seen := map[string]int{}
	for _, h := range mdHeadings(page) {
		a := strings.ReplaceAll(slugRE.ReplaceAllString(strings.ToLower(h), ""), " ", "-")
		if n := seen[a]; n > 0 {
			out[a+"-"+strconv.Itoa(n)] = true
		} else {
			out[a] = true
		}
		seen[a]++
	}
	return out
}

// linkRE finds Markdown links and images: [text](target).
var linkRE = regexp.MustCompile(`\]\(([^()\s]+)\)`)

// TestDocsLinksResolve: every relative link of README.md, SECURITY.md
// and docs/*.md names a file of the repository, and every #anchor a
// heading of the page it points to.
func TestDocsLinksResolve(t *testing.T) {
	n := 0
	for _, name := range docPages(t) {
		page := docPage(t, name)
		inFence := false
		for i, line := range strings.Split(page, "\n") {
			if strings.HasPrefix(line, "```") {
				inFence = !inFence
			}
			if inFence {
				continue
			}
			for _, m := range linkRE.FindAllStringSubmatch(line, -1) {
				target := m[1]
				if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				n++
				file, anchor, _ := strings.Cut(target, "#")
				where := name + ":" + strconv.Itoa(i+1)
				if file == "" {
					file = name
				} else {
					file = filepath.ToSlash(filepath.Join(filepath.Dir(name), file))
				}
				if _, err := os.Stat(filepath.FromSlash(file)); err != nil {
					t.Errorf("%s: link %q: %s does not exist", where, target, file)
					continue
				}
				if anchor == "" {
					continue
				}
				if !strings.HasSuffix(file, ".md") {
					t.Errorf("%s: link %q: an anchor into a file that is not a page", where, target)
					continue
				}
				if !anchors(docPage(t, file))[anchor] {
					t.Errorf("%s: link %q: %s has no heading with the anchor #%s", where, target, file, anchor)
				}
			}
		}
	}
	if n < 50 {
		t.Fatalf("found only %d relative links; is the link pattern broken?", n)
	}
}

// TestReadmeLinksEveryDocsPage: the README's Documentation section links
// every page in docs/.
func TestReadmeLinksEveryDocsPage(t *testing.T) {
	section := docSection(t, "README.md", "\n## Documentation\n", "\n## ")
	pages, _ := filepath.Glob(filepath.Join("docs", "*.md"))
	if len(pages) == 0 {
		t.Fatal("no pages in docs/")
	}
	for _, p := range pages {
		if !strings.Contains(section, "]("+filepath.ToSlash(p)+")") {
			t.Errorf("README.md's Documentation section does not link %s", filepath.ToSlash(p))
		}
	}
	if !strings.Contains(section, "](SECURITY.md)") {
		t.Error("README.md's Documentation section does not link SECURITY.md")
	}
}

// TestDocsCaddyfileSubdirectives: every subdirective and keyword the
// Caddyfile parser matches (each string a function that reads a
// caddyfile.Dispenser switches on, compares with or looks up in a map
// literal) is written as code in docs/configuration.md.
func TestDocsCaddyfileSubdirectives(t *testing.T) {
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, ".", func(fi os.FileInfo) bool { return !strings.HasSuffix(fi.Name(), "_test.go") }, 0)
	if err != nil {
		t.Fatal(err)
	}
	words := map[string]bool{}
	for _, pkg := range pkgs {
		for _, f := range pkg.Files {
			for _, decl := range f.Decls {
				fn, ok := decl.(*ast.FuncDecl)
				if !ok || fn.Body == nil || !readsDispenser(fn) {
					continue
				}
				ast.Inspect(fn.Body, func(n ast.Node) bool {
					var lits []ast.Expr
					switch n := n.(type) {
					case *ast.CaseClause: // case "smtp":
						lits = n.List
					case *ast.BinaryExpr: // if sub == "scopes"
						if n.Op == token.EQL || n.Op == token.NEQ {
							lits = []ast.Expr{n.X, n.Y}
						}
					case *ast.KeyValueExpr: // map[string]func() error{"oauth2": …}
						lits = []ast.Expr{n.Key}
					}
					for _, e := range lits {
						if lit, ok := e.(*ast.BasicLit); ok && lit.Kind == token.STRING {
							if s, err := strconv.Unquote(lit.Value); err == nil && s != "" {
								words[s] = true
							}
						}
					}
					return true
				})
			}
		}
	}
	for _, w := range []string{"path_prefix", "smtp", "username", "delivery", "lease", "dkim", "oauth2", "scopes", "headers", "codes", "issue", "alphabet"} {
		if !words[w] {
			t.Fatalf("the parser's subdirectives %v do not include %q; has parsing moved?", slices.Sorted(maps.Keys(words)), w)
		}
	}
	doc := codeTokens(docPage(t, "docs/configuration.md"))
	for _, w := range slices.Sorted(maps.Keys(words)) {
		if !doc[w] {
			t.Errorf("docs/configuration.md does not document the Caddyfile subdirective %q", w)
		}
	}
}

// readsDispenser reports whether a function takes a *caddyfile.Dispenser.
func readsDispenser(fn *ast.FuncDecl) bool {
	for _, p := range fn.Type.Params.List {
		if star, ok := p.Type.(*ast.StarExpr); ok {
			if sel, ok := star.X.(*ast.SelectorExpr); ok && sel.Sel.Name == "Dispenser" {
				return true
			}
		}
	}
	return false
}

// TestDocsJSONFields: every JSON field of the handler's config, nested
// objects included, is written as code in docs/configuration.md.
func TestDocsJSONFields(t *testing.T) {
	fields := map[string]bool{}
	seen := map[reflect.Type]bool{}
	var walk func(reflect.Type)
	walk = func(typ reflect.Type) {
		for typ.Kind() == reflect.Pointer || typ.Kind() == reflect.Slice || typ.Kind() == reflect.Map {
			typ = typ.Elem()
		}
		if typ.Kind() != reflect.Struct || seen[typ] || typ.PkgPath() != reflect.TypeFor[Handler]().PkgPath() {
			return
		}
		seen[typ] = true
		for f := range typ.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "-" || !f.IsExported() {
				continue
			}
			if name == "" {
				if f.Anonymous {
					walk(f.Type)
					continue
				}
				name = f.Name
			}
			fields[name] = true
			walk(f.Type)
		}
	}
	walk(reflect.TypeFor[Handler]())
	if len(fields) < 40 {
		t.Fatalf("found only %d JSON fields", len(fields))
	}
	doc := codeTokens(docPage(t, "docs/configuration.md"))
	for _, f := range slices.Sorted(maps.Keys(fields)) {
		if !doc[f] {
			t.Errorf("docs/configuration.md does not document the JSON field %q", f)
		}
	}
}

// TestDocsEndpoints: every endpoint the router serves has a heading in
// docs/api.md, or is named with its method there.
func TestDocsEndpoints(t *testing.T) {
	page := docPage(t, "docs/api.md")
	headings := strings.Join(mdHeadings(page), "\n")
	eps := documentedEndpoints()
	if len(eps) < 15 {
		t.Fatalf("only %d endpoints", len(eps))
	}
	for _, e := range eps {
		p := apiPath(e)
		if !strings.Contains(headings, "`"+e.method()+" "+p+"`") && !strings.Contains(headings, "`"+p+"`") &&
			!strings.Contains(page, "`"+e.method()+" "+p+"`") {
			t.Errorf("docs/api.md does not document %s %s", e.method(), p)
		}
	}
}

// TestDocsErrorCodes: every error code the OpenAPI document lists for an
// endpoint is written as code in docs/api.md, and every delivery error
// code has its row in the page's table of them.
func TestDocsErrorCodes(t *testing.T) {
	b, err := openAPIJSON("/authmail")
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	codes := map[string]bool{}
	var walk func(any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if ec, ok := v["error_code"].(map[string]any); ok {
				if enum, ok := ec["enum"].([]any); ok {
					for _, c := range enum {
						codes[c.(string)] = true
					}
				}
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(doc)
	if len(codes) < 15 {
		t.Fatalf("found only %d error codes in the OpenAPI document", len(codes))
	}
	page := docPage(t, "docs/api.md")
	words := codeTokens(page)
	for _, c := range slices.Sorted(maps.Keys(codes)) {
		if !words[c] {
			t.Errorf("docs/api.md does not document the error code %q", c)
		}
	}
	// the delivery outcomes have a row each in the table of delivery
	// error codes
	for _, c := range []string{mailer.CodeSMTPConnection, mailer.CodeSMTPTimeout, mailer.CodeSMTPAuthFailed, mailer.CodeStartTLSUnsupported,
		mailer.CodeRecipientRefused, mailer.CodeSMTPRejected, mailer.CodeSMTPTransient, mailer.CodeUncertain, mailer.CodeCaptureFailed, mailer.CodeOutboxUnavailable} {
		if !strings.Contains(page, "\n| `"+c+"` |") {
			t.Errorf("docs/api.md's table of delivery error codes has no row for %q", c)
		}
	}
}

// TestDocsMetrics: every metric authmail registers is in the table of
// docs/operations.md.
func TestDocsMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg); err != nil {
		t.Fatal(err)
	}
	fqName := regexp.MustCompile(`fqName: "([^"]+)"`)
	descs := make(chan *prometheus.Desc, 100)
	for _, c := range collectors {
		c.Describe(descs)
	}
	close(descs)
	page := docPage(t, "docs/operations.md")
	n := 0
	for d := range descs {
		m := fqName.FindStringSubmatch(d.String())
		if m == nil {
			t.Fatalf("no name in %s", d)
		}
		n++
		if !strings.Contains(page, "| `"+m[1]+"` |") {
			t.Errorf("docs/operations.md does not document the metric %s", m[1])
		}
	}
	if n < 9 {
		t.Fatalf("only %d metrics", n)
	}
}

// TestDocsPlaceholders: every placeholder a request sets is named in
// docs/configuration.md.
func TestDocsPlaceholders(t *testing.T) {
	files, _ := filepath.Glob("*.go")
	set := regexp.MustCompile(`repl\.Set\("(http\.authmail\.[a-z_]+)"`)
	page := docPage(t, "docs/configuration.md")
	n := 0
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range set.FindAllStringSubmatch(string(src), -1) {
			n++
			if !strings.Contains(page, "`{"+m[1]+"}`") {
				t.Errorf("docs/configuration.md does not name the placeholder {%s}", m[1])
			}
		}
	}
	if n < 6 {
		t.Fatalf("found only %d placeholders", n)
	}
}

// TestDocsCommands: every caddy command authmail registers, and every
// subcommand of `caddy authmail`, is named in docs/operations.md.
func TestDocsCommands(t *testing.T) {
	page := docPage(t, "docs/operations.md")
	n := 0
	for name, c := range caddycmd.Commands() {
		if !strings.HasPrefix(name, "authmail") {
			continue
		}
		n++
		if !strings.Contains(page, "caddy "+name) {
			t.Errorf("docs/operations.md does not name the command caddy %s", name)
		}
		if c.CobraFunc == nil {
			continue
		}
		cmd := &cobra.Command{Use: name}
		c.CobraFunc(cmd)
		for _, sub := range cmd.Commands() {
			if !strings.Contains(page, "caddy "+name+" "+sub.Name()) {
				t.Errorf("docs/operations.md does not name the command caddy %s %s", name, sub.Name())
			}
		}
	}
	if n < 3 {
		t.Fatalf("found only %d authmail commands", n)
	}
}

// TestDocsPreviewQuery: every query parameter the preview page takes is
// named in the GET /preview section of docs/api.md.
func TestDocsPreviewQuery(t *testing.T) {
	section := docSection(t, "docs/api.md", "\n### `GET /preview`", "\n#")
	words := codeTokens(section)
	for _, p := range previewParams {
		if !words[p] {
			t.Errorf("docs/api.md's GET /preview section does not name the query parameter %q", p)
		}
	}
}

// docSection is the part of a page after the heading line start, up to
// the next line that begins with end.
func docSection(t *testing.T, name, start, end string) string {
	t.Helper()
	_, section, ok := strings.Cut(docPage(t, name), start)
	if !ok {
		t.Fatalf("%s has no section %q", name, strings.TrimSpace(start))
	}
	section, _, _ = strings.Cut(section, end)
	return section
}
