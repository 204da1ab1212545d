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
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-authmail/authmail/internal/mailer"
	"github.com/caddy-authmail/authmail/internal/outbox"
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

// sourceFiles parses the package's Go files, tests left out.
func sourceFiles(t *testing.T) (*token.FileSet, []*ast.File) {
	t.Helper()
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, ".", func(fi os.FileInfo) bool { return !strings.HasSuffix(fi.Name(), "_test.go") }, 0)
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, pkg := range pkgs {
		for _, f := range pkg.Files {
			files = append(files, f)
		}
	}
	return fset, files
}

// TestDocsCaddyfileSubdirectives: every subdirective and keyword the
// Caddyfile parser matches (each string a function that reads a
// caddyfile.Dispenser switches on, compares with or looks up in a map
// literal) is written as code in docs/configuration.md.
func TestDocsCaddyfileSubdirectives(t *testing.T) {
	words := map[string]bool{}
	_, files := sourceFiles(t)
	for _, f := range files {
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

// jsonSamples returns the JSON objects a Markdown page writes in code:
// each code span and each line of a fenced block (lines joined while an
// object is open) is scanned for balanced {…}; what parses is a sample.
// A sample abridged with a bare … does not parse and is left out.
func jsonSamples(page string) []map[string]any {
	var texts []string
	inFence := false
	var block strings.Builder
	for line := range strings.SplitSeq(page, "\n") {
		if strings.HasPrefix(line, "```") {
			if inFence {
				texts = append(texts, block.String())
				block.Reset()
			}
			inFence = !inFence
			continue
		}
		if inFence {
			block.WriteString(line + "\n")
			continue
		}
		for i, span := range strings.Split(line, "`") {
			if i%2 == 1 {
				texts = append(texts, span)
			}
		}
	}
	var out []map[string]any
	for _, text := range texts {
		for _, obj := range jsonObjects(text) {
			var m map[string]any
			if json.Unmarshal([]byte(obj), &m) == nil {
				out = append(out, m)
			}
		}
	}
	return out
}

// jsonObjects returns the outermost balanced {…} of text, braces inside
// JSON strings ignored.
func jsonObjects(text string) []string {
	var out []string
	depth, start, inStr, esc := 0, 0, false, false
	for i := 0; i < len(text); i++ {
		c := text[i]
		switch {
		case inStr && esc:
			esc = false
		case inStr && c == '\\':
			esc = true
		case inStr && c == '"':
			inStr = false
		case inStr:
		case c == '"' && depth > 0:
			inStr = true
		case c == '{':
			if depth == 0 {
				start = i
			}
			depth++
		case c == '}' && depth > 0:
			depth--
			if depth == 0 {
				out = append(out, text[start:i+1])
			}
		}
	}
	return out
}

// schemaFits reports whether a sample object has only fields of the
// schema, nested objects and lists of objects included, and a status
// among the schema's states where the schema lists them.
func schemaFits(schemas oaJ, sample map[string]any, s oaJ) bool {
	s = resolveSchema(schemas, s)
	props, _ := s["properties"].(oaJ)
	if props == nil {
		return false
	}
	for k, v := range sample {
		p, ok := props[k].(oaJ)
		if !ok {
			return false
		}
		p = resolveSchema(schemas, p)
		if enum, ok := p["enum"].([]string); ok && k == "status" && !slices.Contains(enum, v.(string)) {
			return false
		}
		switch x := v.(type) {
		case map[string]any:
			if p["properties"] != nil && !schemaFits(schemas, x, p) {
				return false
			}
		case []any:
			items, _ := p["items"].(oaJ)
			for _, e := range x {
				if o, ok := e.(map[string]any); ok && items != nil && !schemaFits(schemas, o, items) {
					return false
				}
			}
		}
	}
	return true
}

func resolveSchema(schemas oaJ, s oaJ) oaJ {
	if ref, ok := s["$ref"].(string); ok {
		r, _ := schemas[strings.TrimPrefix(ref, "#/components/schemas/")].(oaJ)
		return r
	}
	return s
}

// TestDocsSampleFieldsExist: every JSON object the README, docs/api.md
// and docs/issued-codes.md show — requests and answers — fits one schema
// of the OpenAPI document, whose fields come from the structs the
// handler decodes and encodes: no field the API does not have, and a
// status the answer can carry.
func TestDocsSampleFieldsExist(t *testing.T) {
	doc, err := openAPIDocument(defaultPathPrefix)
	if err != nil {
		t.Fatal(err)
	}
	schemas := doc["components"].(oaJ)["schemas"].(oaJ)
	n := 0
	for _, page := range []string{"README.md", "docs/api.md", "docs/issued-codes.md"} {
		for _, sample := range jsonSamples(docPage(t, page)) {
			n++
			fits := false
			for _, name := range slices.Sorted(maps.Keys(schemas)) {
				if schemaFits(schemas, sample, schemas[name].(oaJ)) {
					fits = true
					break
				}
			}
			if !fits {
				t.Errorf("%s: %s fits no request or answer of the OpenAPI document", page, marshalJSON(sample))
			}
		}
	}
	if n < 30 {
		t.Fatalf("found only %d JSON samples", n)
	}
}

// curlSendRE finds a documented send: the endpoint and the -d body of a
// curl command line (continuation lines joined).
var curlSendRE = regexp.MustCompile(`^curl .*?(/send(?:/[a-z-]+)?)\b.*?-d '([^']*)'|^curl .*?-d '([^']*)'.*?(/send(?:/[a-z-]+)?)\b`)

// TestDocsSampleAnswersAreReal: each answer shown as `# {…}` right under
// a curl command of a send, in the README and docs/issued-codes.md, has
// exactly the fields the handler answers to that request (a templated
// flow's answer carries its locale, an issued code's its challenge), the
// same sent, status and locale, and an id of the form ids have now (they
// start with the time, so an id of another era shows a sample written by
// hand).
func TestDocsSampleAnswersAreReal(t *testing.T) {
	h := provisionedHandler(t, withCodes(t), withoutLimits)
	n := 0
	for _, page := range []string{"README.md", "docs/issued-codes.md"} {
		var lines []string
		inFence, cont := false, ""
		for line := range strings.SplitSeq(docPage(t, page), "\n") {
			if strings.HasPrefix(line, "```") {
				inFence = !inFence
				continue
			}
			if !inFence {
				continue
			}
			if s, ok := strings.CutSuffix(line, `\`); ok {
				cont += s
				continue
			}
			lines = append(lines, cont+line)
			cont = ""
		}
		for i := 0; i+1 < len(lines); i++ {
			m := curlSendRE.FindStringSubmatch(strings.Join(strings.Fields(lines[i]), " "))
			answer, ok := strings.CutPrefix(lines[i+1], "# ")
			if m == nil || !ok || !strings.HasPrefix(answer, "{") {
				continue
			}
			path, body := m[1]+m[4], m[2]+m[3]
			objs := jsonObjects(answer)
			var doc map[string]any
			if len(objs) == 0 || json.Unmarshal([]byte(objs[0]), &doc) != nil {
				t.Errorf("%s: the answer to %s is not JSON: %s", page, path, answer)
				continue
			}
			n++
			rec, real := call(t, h, "POST", defaultPathPrefix+path, body)
			if rec.Code/100 != 2 {
				t.Errorf("%s: the documented request to %s fails: %d %s", page, path, rec.Code, rec.Body)
				continue
			}
			if got, want := slices.Sorted(maps.Keys(doc)), slices.Sorted(maps.Keys(real)); !slices.Equal(got, want) {
				t.Errorf("%s: the answer to %s shows the fields %v; the handler answers %v (%s)", page, path, got, want, rec.Body)
			}
			if doc["sent"] != real["sent"] || doc["locale"] != real["locale"] {
				t.Errorf("%s: the answer to %s shows sent %v, locale %v; the handler answers %v, %v", page, path, doc["sent"], doc["locale"], real["sent"], real["locale"])
			}
			// the example runs in capture mode; a page about production
			// shows what an SMTP server's acceptance answers
			if st := doc["status"]; st != real["status"] && !(st == outbox.Sent && real["status"] == "captured") {
				t.Errorf("%s: the answer to %s shows status %v; the handler answers %v", page, path, st, real["status"])
			}
			if id, _ := doc["id"].(string); id != "…" {
				prefix, _, _ := strings.Cut(id, "…")
				if at, ok := idTime(prefix); !ok || at.Before(time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)) || at.After(time.Now().AddDate(1, 0, 0)) {
					t.Errorf("%s: the answer to %s shows the id %q, which no message has now (real: %s…)", page, path, id, real["id"].(string)[:5])
				}
			}
		}
	}
	if n < 2 {
		t.Fatalf("found only %d documented answers", n)
	}
}

// idTime returns the earliest creation time a message id starting with
// prefix can have: ids begin with 48 bits of Unix milliseconds.
func idTime(prefix string) (time.Time, bool) {
	if prefix == "" || len(prefix) > 10 {
		return time.Time{}, false
	}
	b, err := outbox.IDEncoding.DecodeString((prefix + "0000000000")[:10])
	if err != nil || len(b) < 6 {
		return time.Time{}, false
	}
	var ms int64
	for _, c := range b[:6] {
		ms = ms<<8 | int64(c)
	}
	return time.UnixMilli(ms), true
}

// TestDocsStateLists: where docs/api.md lists the states a message can
// be in, it names every state of the engine and no other, and the
// messages metric lists the final ones.
func TestDocsStateLists(t *testing.T) {
	stateWords := func(s string) []string {
		var out []string
		for i, span := range strings.Split(s, "`") {
			if i%2 == 1 && regexp.MustCompile(`^[a-z_]+$`).MatchString(span) {
				out = append(out, span)
			}
		}
		slices.Sort(out)
		return out
	}
	all := slices.Sorted(slices.Values(outbox.AllStates))
	n := 0
	for line := range strings.SplitSeq(docPage(t, "docs/api.md"), "\n") {
		var list string
		if rest, ok := strings.CutPrefix(line, "`status` is "); ok {
			list, _, _ = strings.Cut(rest, " (")
			list, _, _ = strings.Cut(list, ". ")
		} else if rest, ok := strings.CutPrefix(line, "| `status` | "); ok {
			list, _, _ = strings.Cut(rest, " |")
		} else {
			continue
		}
		n++
		if got := stateWords(list); !slices.Equal(got, all) {
			t.Errorf("docs/api.md lists the states %v, the engine has %v:\n%s", got, all, line)
		}
	}
	if n < 2 {
		t.Fatalf("found %d state lists in docs/api.md", n)
	}
	var final []string
	for _, s := range outbox.AllStates {
		if outbox.IsFinal(s) {
			final = append(final, s)
		}
	}
	slices.Sort(final)
	for line := range strings.SplitSeq(docPage(t, "docs/operations.md"), "\n") {
		if strings.HasPrefix(line, "| `caddy_authmail_messages_total` |") {
			_, outcomes, _ := strings.Cut(line, "final state:")
			if got := stateWords(outcomes); !slices.Equal(got, final) {
				t.Errorf("docs/operations.md lists the outcomes %v, the final states are %v", got, final)
			}
			return
		}
	}
	t.Error("docs/operations.md has no row for caddy_authmail_messages_total")
}
