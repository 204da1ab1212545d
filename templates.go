package authmail

import (
	"bytes"
	"embed"
	"fmt"
	htemplate "html/template"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	ttemplate "text/template"
	"time"
	"unicode/utf8"
)

// defaultTemplates are the built-in templates. A `templates <dir>`
// setting overrides them file by file.
//
//go:embed templates/*
var defaultTemplates embed.FS

// templateFlows are the flows that have templates: the auth flows plus
// the notice that email-change sends to the old address.
var templateFlows = func() []string {
	var out []string
	for _, f := range flowTable {
		out = append(out, f.templates...)
	}
	return out
}()

// templateFiles lists every file name a templates directory may hold
// without a locale; each may also be given per locale as
// <name>.<locale>.<ext> (otp.ko.subject, layout.de-AT.html).
func templateFiles() []string {
	names := []string{"layout.html", "partials.html", "layout.txt"}
	for _, f := range templateFlows {
		names = append(names, f+".subject", f+".txt", f+".html")
	}
	return names
}

// splitTemplateName splits a template file name into the name it has
// without a locale and its canonical locale ("" for none and for en).
// ok is false for a name that is no template file.
func splitTemplateName(file string, known []string) (name, loc string, ok bool) {
	if containsString(known, file) {
		return file, "", true
	}
	dot := strings.IndexByte(file, '.')
	ext := filepath.Ext(file)
	if dot < 0 || dot+1 >= len(file)-len(ext) {
		return "", "", false
	}
	name = file[:dot] + ext
	if !containsString(known, name) {
		return "", "", false
	}
	// strict: a misspelt locale in a file name would otherwise never be used
	l, err := parseLocale(file[dot+1:len(file)-len(ext)], true)
	if err != nil || localeParents(l) == nil {
		return "", "", false
	}
	if l == defaultLocale {
		l = ""
	}
	return name, l, true
}

// templateData is what the text and HTML templates see.
type templateData struct {
	// Flow is the flow name, e.g. "password-reset".
	Flow string
	// AppName is the configured app_name.
	AppName string
	// UserName is the user's name from the request, or empty.
	UserName string
	// Email is the recipient's address.
	Email string
	// Code is the one-time code (otp).
	Code string
	// Link is the action link (magic-link, password-reset, verify-email,
	// email-change).
	Link string
	// ExpiresInMinutes and ExpiresIn ("15 minutes", "24 hours") tell how
	// long the code or link is valid.
	ExpiresInMinutes int
	ExpiresIn        string
	// Event, EventTitle and the details below are set for security alerts.
	Event      string
	EventTitle string
	IP         string
	UserAgent  string
	Location   string
	OccurredAt string
	// NewEmail and NewEmailMasked are the requested new address, for the
	// email-change notice sent to the old address.
	NewEmail       string
	NewEmailMasked string
	// Locale is the locale the message is rendered in, e.g. "ko" or "en".
	// ExpiresIn, EventTitle and OccurredAt are in its language for the
	// built-in languages (en, ko) and in English for others.
	Locale string

	// occurredAt is the security event's time, which OccurredAt shows in
	// the locale's format.
	occurredAt time.Time
}

// subjectData is what subject templates see. It deliberately has no code,
// token or link: secrets can never end up in a subject.
type subjectData struct {
	Flow       string
	Locale     string
	AppName    string
	UserName   string
	ExpiresIn  string
	Event      string
	EventTitle string
}

type flowTemplate struct {
	subject *ttemplate.Template
	text    *ttemplate.Template
	html    *htemplate.Template
}

// templateSet holds the parsed templates of every flow, per locale.
type templateSet struct {
	// flows maps a template name and a locale ("" is en) to its parsed
	// templates. A flow has an entry for a locale when that locale has at
	// least one of its own files (subject, txt, html), in the templates
	// directory or built in; en always has one.
	flows map[flowLocale]*flowTemplate
	// locales are the locales any template file is given in, "" first.
	locales []string
}

type flowLocale struct{ flow, locale string }

// loadTemplates parses the templates. Each file is looked up for the
// locale and then its parents (de-AT, de), and last without a locale;
// at each step the templates directory's file wins over the built-in
// one. A flow is available in a locale when that locale has one of the
// flow's own files; the rest come from the lookup.
func loadTemplates(dir string) (*templateSet, error) {
	known := templateFiles()
	// files[locale][name] is a template's source; "" is en
	files := map[string]map[string]string{}
	origin := map[string]map[string]string{} // file names, for conflicts
	put := func(file, src string, custom bool) error {
		name, loc, ok := splitTemplateName(file, known)
		if !ok {
			if custom {
				return fmt.Errorf("templates directory: unrecognized template file %q (known: %s, each also as <name>.<locale>.<ext> with a BCP 47 locale such as ko or de-AT)",
					file, strings.Join(known, ", "))
			}
			return fmt.Errorf("built-in template %q has no known name", file)
		}
		if files[loc] == nil {
			files[loc], origin[loc] = map[string]string{}, map[string]string{}
		}
		if prev, dup := origin[loc][name]; dup && custom && prev != "" {
			return fmt.Errorf("templates directory: %q and %q are the same template; keep one", prev, file)
		}
		files[loc][name] = src
		if custom {
			origin[loc][name] = file
		} else {
			origin[loc][name] = ""
		}
		return nil
	}
	builtin, err := fs.ReadDir(defaultTemplates, "templates")
	if err != nil {
		return nil, err
	}
	for _, e := range builtin {
		b, err := defaultTemplates.ReadFile("templates/" + e.Name())
		if err != nil {
			return nil, err
		}
		if err := put(e.Name(), string(b), false); err != nil {
			return nil, err
		}
	}
	if dir != "" {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return nil, fmt.Errorf("reading templates directory: %w", err)
		}
		for _, e := range entries {
			ext := filepath.Ext(e.Name())
			if ext != ".html" && ext != ".txt" && ext != ".subject" {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				return nil, fmt.Errorf("reading template %s: %w", e.Name(), err)
			}
			if !utf8.Valid(b) {
				return nil, fmt.Errorf("template %s is not valid UTF-8", e.Name())
			}
			if err := put(e.Name(), string(b), true); err != nil {
				return nil, err
			}
		}
	}
	set := &templateSet{flows: map[flowLocale]*flowTemplate{}, locales: []string{""}}
	for loc := range files {
		if loc != "" {
			set.locales = append(set.locales, loc)
		}
	}
	slices.Sort(set.locales[1:])
	for _, loc := range set.locales {
		chain := append(localeParents(loc), "")
		// read returns a template's source and the file it came from, in
		// the locale or the nearest one that has it
		read := func(name string) (string, string, error) {
			for _, l := range chain {
				if src, ok := files[l][name]; ok {
					file := name
					if l != "" {
						file = strings.TrimSuffix(name, filepath.Ext(name)) + "." + l + filepath.Ext(name)
					}
					return src, file, nil
				}
			}
			return "", "", fmt.Errorf("no template %s", name)
		}
		for _, flow := range templateFlows {
			own := func(name string) bool { _, ok := files[loc][name]; return ok }
			if loc != "" && !own(flow+".subject") && !own(flow+".txt") && !own(flow+".html") {
				continue
			}
			ft, err := parseFlow(flow, read)
			if err != nil {
				return nil, err
			}
			set.flows[flowLocale{flow, loc}] = ft
		}
	}
	if err := set.selfTest(); err != nil {
		return nil, err
	}
	return set, nil
}

// parseFlow parses one flow's templates with the layouts; read returns
// a template's source and its file name, for error messages.
func parseFlow(flow string, read func(name string) (string, string, error)) (*flowTemplate, error) {
	layoutHTML, _, err := read("layout.html")
	if err != nil {
		return nil, err
	}
	partialsHTML, _, err := read("partials.html")
	if err != nil {
		return nil, err
	}
	layoutText, _, err := read("layout.txt")
	if err != nil {
		return nil, err
	}
	ft := &flowTemplate{}
	src, file, err := read(flow + ".subject")
	if err != nil {
		return nil, err
	}
	if ft.subject, err = ttemplate.New(file).Option("missingkey=error").Parse(src); err != nil {
		return nil, fmt.Errorf("parsing template: %w", err)
	}
	if src, file, err = read(flow + ".txt"); err != nil {
		return nil, err
	}
	if ft.text, err = ttemplate.New("layout.txt").Option("missingkey=error").Parse(layoutText); err != nil {
		return nil, fmt.Errorf("parsing template: %w", err)
	}
	if _, err = ft.text.New(file).Parse(src); err != nil {
		return nil, fmt.Errorf("parsing template: %w", err)
	}
	if ft.text.Lookup("content") == nil {
		return nil, fmt.Errorf("template %s must define a \"content\" template", file)
	}
	if src, file, err = read(flow + ".html"); err != nil {
		return nil, err
	}
	if ft.html, err = htemplate.New("layout.html").Option("missingkey=error").Parse(layoutHTML); err != nil {
		return nil, fmt.Errorf("parsing template: %w", err)
	}
	if _, err = ft.html.New("partials.html").Parse(partialsHTML); err != nil {
		return nil, fmt.Errorf("parsing template: %w", err)
	}
	if _, err = ft.html.New(file).Parse(src); err != nil {
		return nil, fmt.Errorf("parsing template: %w", err)
	}
	if ft.html.Lookup("content") == nil {
		return nil, fmt.Errorf("template %s must define a \"content\" template", file)
	}
	return ft, nil
}

// rendered is the output of a flow's templates.
type rendered struct {
	subject, text, html string
}

// resolve returns the locale a flow is rendered in for a requested tag
// ("" for none) and the configured default: the first of localeChain
// that has the flow's templates; en has every flow's.
func (s *templateSet) resolve(flow, tag, def string) string {
	for _, l := range localeChain(tag, def) {
		key := l
		if key == defaultLocale {
			key = ""
		}
		if s.flows[flowLocale{flow, key}] != nil {
			return l
		}
	}
	return defaultLocale
}

// hasLocale tells whether any flow has templates in a locale or one of
// its parents.
func (s *templateSet) hasLocale(loc string) bool {
	for _, l := range localeParents(loc) {
		if l == defaultLocale {
			return true
		}
		for k := range s.flows {
			if k.locale == l {
				return true
			}
		}
	}
	return false
}

// localeNames lists the locales any template file is given in, en
// first (the field holds it as "").
func (s *templateSet) localeNames() []string {
	out := []string{defaultLocale}
	for _, l := range s.locales {
		if l != "" && l != defaultLocale {
			out = append(out, l)
		}
	}
	return out
}

// render executes the flow's templates in the default locale (en).
func (s *templateSet) render(flow string, d *templateData) (rendered, error) {
	out, _, err := s.renderIn(flow, "", defaultLocale, d)
	return out, err
}

// renderIn executes the flow's templates in the locale resolved for tag
// and def (see resolve), with d's locale-dependent fields filled for
// that locale (localize; d itself is not changed), and returns the
// locale used.
func (s *templateSet) renderIn(flow, tag, def string, d *templateData) (rendered, string, error) {
	loc := s.resolve(flow, tag, def)
	key := loc
	if key == defaultLocale {
		key = ""
	}
	ft := s.flows[flowLocale{flow, key}]
	if ft == nil {
		return rendered{}, "", fmt.Errorf("no templates for flow %q", flow)
	}
	dd := *d
	localize(&dd, loc)
	out, err := ft.execute(flow, &dd)
	return out, loc, err
}

func (ft *flowTemplate) execute(flow string, d *templateData) (rendered, error) {
	var out rendered
	var b bytes.Buffer
	sd := subjectData{Flow: d.Flow, Locale: d.Locale, AppName: d.AppName, UserName: d.UserName,
		ExpiresIn: d.ExpiresIn, Event: d.Event, EventTitle: d.EventTitle}
	if err := ft.subject.Execute(&b, sd); err != nil {
		return out, fmt.Errorf("rendering %s.subject: %w", flow, err)
	}
	out.subject = strings.Join(strings.Fields(b.String()), " ")
	b.Reset()
	if err := ft.text.ExecuteTemplate(&b, "layout.txt", d); err != nil {
		return out, fmt.Errorf("rendering %s.txt: %w", flow, err)
	}
	out.text = tidyText(b.String())
	b.Reset()
	if err := ft.html.ExecuteTemplate(&b, "layout.html", d); err != nil {
		return out, fmt.Errorf("rendering %s.html: %w", flow, err)
	}
	out.html = b.String()
	return out, nil
}

// selfTest renders every flow in every locale it has against sample
// data, so that a template that fails at runtime, or that loses the code
// or link, fails the config load instead of a user's sign-in.
func (s *templateSet) selfTest() error {
	const (
		sampleCode = "SAMPLE-CODE-93F1"
		sampleLink = "https://example.com/authmail-self-test?token=SAMPLE-TOKEN-93F1"
	)
	for _, loc := range s.locales {
		for _, flow := range templateFlows {
			ft := s.flows[flowLocale{flow, loc}]
			if ft == nil {
				continue
			}
			name := flow
			if loc != "" {
				name = flow + "." + loc
			}
			events := []string{""}
			if flow == "security-alert" {
				events = securityEventNames()
			}
			for _, ev := range events {
				d := &templateData{
					Flow: flow, AppName: "Sample App", UserName: "Sample <User>", Email: "user@example.com",
					ExpiresInMinutes: 15, ExpiresIn: "15 minutes",
					NewEmail: "new@example.com", NewEmailMasked: "n***@example.com",
				}
				switch flow {
				case "otp":
					d.Code = sampleCode
				case "security-alert":
					d.ExpiresInMinutes, d.ExpiresIn = 0, ""
					d.Event = ev
					d.IP, d.UserAgent, d.Location = "192.0.2.1", "Sample Browser", "Sample City"
					d.occurredAt = time.Date(2026, 1, 2, 15, 4, 0, 0, time.UTC)
				case "email-change-notice":
				default:
					d.Link = sampleLink
				}
				localize(d, firstNonEmpty(loc, defaultLocale))
				out, err := ft.execute(name, d)
				if err != nil {
					return fmt.Errorf("template self-test: %w", err)
				}
				if out.subject == "" {
					return fmt.Errorf("template self-test: %s.subject renders an empty subject", name)
				}
				if n := utf8.RuneCountInString(out.subject); n > maxSubjectRunes {
					return fmt.Errorf("template self-test: %s.subject renders %d characters; at most %d are allowed", name, n, maxSubjectRunes)
				}
				for part, body := range map[string]string{"txt": out.text, "html": out.html} {
					if d.Code != "" && !strings.Contains(body, d.Code) {
						return fmt.Errorf("template self-test: %s.%s does not show the code ({{.Code}})", name, part)
					}
					if d.Link != "" && !strings.Contains(body, d.Link) {
						return fmt.Errorf("template self-test: %s.%s does not show the link ({{.Link}})", name, part)
					}
				}
				if flow == "email-change-notice" && strings.Contains(out.text+out.html, sampleLink) {
					return fmt.Errorf("template self-test: %s must not contain a link", name)
				}
			}
		}
	}
	return nil
}

// tidyText trims trailing spaces from every line, collapses runs of blank
// lines to one and trims the text, so templates can be laid out freely.
func tidyText(s string) string {
	s = strings.ReplaceAll(s, "\r\n", "\n")
	lines := strings.Split(s, "\n")
	out := make([]string, 0, len(lines))
	blank := true // drop leading blank lines
	for _, l := range lines {
		l = strings.TrimRight(l, " \t")
		if l == "" {
			if blank {
				continue
			}
			blank = true
		} else {
			blank = false
		}
		out = append(out, l)
	}
	return strings.TrimSpace(strings.Join(out, "\n")) + "\n"
}

// humanMinutes renders a validity period: "10 minutes", "1 hour",
// "24 hours", "3 days".
func humanMinutes(m int) string {
	plural := func(n int, unit string) string {
		if n == 1 {
			return "1 " + unit
		}
		return fmt.Sprintf("%d %ss", n, unit)
	}
	switch {
	case m >= 2880 && m%1440 == 0:
		return plural(m/1440, "day")
	case m >= 60 && m%60 == 0:
		return plural(m/60, "hour")
	default:
		return plural(m, "minute")
	}
}

// maskAddress shows enough of an address to recognise it: j***@example.com.
func maskAddress(addr string) string {
	local, dom, ok := cutLast(addr, "@")
	if !ok || local == "" {
		return "***"
	}
	r, _ := utf8.DecodeRuneInString(local)
	return string(r) + "***@" + dom
}
