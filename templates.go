package authmail

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	htemplate "html/template"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	ttemplate "text/template"
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

// templateFiles lists every file name a templates directory may hold.
func templateFiles() []string {
	names := []string{"layout.html", "partials.html", "layout.txt"}
	for _, f := range templateFlows {
		names = append(names, f+".subject", f+".txt", f+".html")
	}
	return names
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
}

// subjectData is what subject templates see. It deliberately has no code,
// token or link: secrets can never end up in a subject.
type subjectData struct {
	Flow       string
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

// templateSet holds the parsed templates of every flow.
type templateSet struct {
	flows map[string]*flowTemplate
}

// loadTemplates parses the templates, taking each file from dir when it
// exists there and from the built-in set otherwise.
func loadTemplates(dir string) (*templateSet, error) {
	known := templateFiles()
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
			if !slices.Contains(known, e.Name()) {
				return nil, fmt.Errorf("templates directory: unrecognized template file %q (known: %s)",
					e.Name(), strings.Join(known, ", "))
			}
		}
	}
	read := func(name string) (string, error) {
		if dir != "" {
			b, err := os.ReadFile(filepath.Join(dir, name))
			if err == nil {
				if !utf8.Valid(b) {
					return "", fmt.Errorf("template %s is not valid UTF-8", name)
				}
				return string(b), nil
			}
			if !errors.Is(err, fs.ErrNotExist) {
				return "", fmt.Errorf("reading template %s: %w", name, err)
			}
		}
		b, err := defaultTemplates.ReadFile("templates/" + name)
		return string(b), err
	}
	layoutHTML, err := read("layout.html")
	if err != nil {
		return nil, err
	}
	partialsHTML, err := read("partials.html")
	if err != nil {
		return nil, err
	}
	layoutText, err := read("layout.txt")
	if err != nil {
		return nil, err
	}
	set := &templateSet{flows: map[string]*flowTemplate{}}
	for _, flow := range templateFlows {
		ft := &flowTemplate{}
		src, err := read(flow + ".subject")
		if err != nil {
			return nil, err
		}
		if ft.subject, err = ttemplate.New(flow + ".subject").Option("missingkey=error").Parse(src); err != nil {
			return nil, fmt.Errorf("parsing template: %w", err)
		}
		if src, err = read(flow + ".txt"); err != nil {
			return nil, err
		}
		if ft.text, err = ttemplate.New("layout.txt").Option("missingkey=error").Parse(layoutText); err != nil {
			return nil, fmt.Errorf("parsing template: %w", err)
		}
		if _, err = ft.text.New(flow + ".txt").Parse(src); err != nil {
			return nil, fmt.Errorf("parsing template: %w", err)
		}
		if ft.text.Lookup("content") == nil {
			return nil, fmt.Errorf("template %s.txt must define a \"content\" template", flow)
		}
		if src, err = read(flow + ".html"); err != nil {
			return nil, err
		}
		if ft.html, err = htemplate.New("layout.html").Option("missingkey=error").Parse(layoutHTML); err != nil {
			return nil, fmt.Errorf("parsing template: %w", err)
		}
		if _, err = ft.html.New("partials.html").Parse(partialsHTML); err != nil {
			return nil, fmt.Errorf("parsing template: %w", err)
		}
		if _, err = ft.html.New(flow + ".html").Parse(src); err != nil {
			return nil, fmt.Errorf("parsing template: %w", err)
		}
		if ft.html.Lookup("content") == nil {
			return nil, fmt.Errorf("template %s.html must define a \"content\" template", flow)
		}
		set.flows[flow] = ft
	}
	if err := set.selfTest(); err != nil {
		return nil, err
	}
	return set, nil
}

// rendered is the output of a flow's templates.
type rendered struct {
	subject, text, html string
}

// render executes the flow's templates.
func (s *templateSet) render(flow string, d *templateData) (rendered, error) {
	ft := s.flows[flow]
	if ft == nil {
		return rendered{}, fmt.Errorf("no templates for flow %q", flow)
	}
	var out rendered
	var b bytes.Buffer
	sd := subjectData{Flow: d.Flow, AppName: d.AppName, UserName: d.UserName,
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

// selfTest renders every flow against sample data, so that a template
// that fails at runtime, or that loses the code or link, fails the config
// load instead of a user's sign-in.
func (s *templateSet) selfTest() error {
	const (
		sampleCode = "SAMPLE-CODE-93F1"
		sampleLink = "https://example.com/authmail-self-test?token=SAMPLE-TOKEN-93F1"
	)
	for _, flow := range templateFlows {
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
				d.Event, d.EventTitle = ev, securityEvents[ev].title
				d.IP, d.UserAgent, d.Location, d.OccurredAt = "192.0.2.1", "Sample Browser", "Sample City", "2026-01-02 03:04 UTC"
			case "email-change-notice":
			default:
				d.Link = sampleLink
			}
			out, err := s.render(flow, d)
			if err != nil {
				return fmt.Errorf("template self-test: %w", err)
			}
			if out.subject == "" {
				return fmt.Errorf("template self-test: %s.subject renders an empty subject", flow)
			}
			if n := utf8.RuneCountInString(out.subject); n > maxSubjectRunes {
				return fmt.Errorf("template self-test: %s.subject renders %d characters; at most %d are allowed", flow, n, maxSubjectRunes)
			}
			for part, body := range map[string]string{"txt": out.text, "html": out.html} {
				if d.Code != "" && !strings.Contains(body, d.Code) {
					return fmt.Errorf("template self-test: %s.%s does not show the code ({{.Code}})", flow, part)
				}
				if d.Link != "" && !strings.Contains(body, d.Link) {
					return fmt.Errorf("template self-test: %s.%s does not show the link ({{.Link}})", flow, part)
				}
			}
			if flow == "email-change-notice" && strings.Contains(out.text+out.html, sampleLink) {
				return fmt.Errorf("template self-test: %s must not contain a link", flow)
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
