package redact

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"mime/quotedprintable"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

const (
	// Marker replaces what was removed.
	Marker = "[redacted]"
	// Withheld is the whole output when a text cannot be cleaned with
	// certainty.
	Withheld = "[withheld: the text may hold a secret]"
	// MinSecret is the length of the shortest secret looked for.
	MinSecret = 4
)

const (
	// maxInput bounds the work on one text: no output is that long, and
	// what is cut off is never seen
	maxInput = 16 << 10
	// minNeedle: shorter encodings of a secret are not matched as text;
	// the decoded views find the secret itself
	minNeedle = 6
	// minRun is the shortest base64 run decoded: fewer characters cannot
	// hold MinSecret bytes
	minRun = 6
)

// Line returns text without any of secrets, in any encoding the package
// comment lists, and without the values of secret-named pairs: one line
// of at most max bytes without control characters.
func Line(text string, max int, secrets ...string) string {
	return New(secrets...).Line(text, max)
}

// Code returns code when it is a plain error code, [a-z0-9_]{1,64},
// holding none of secrets; otherwise fallback.
func Code(code, fallback string, secrets ...string) string {
	return New(secrets...).Code(code, fallback)
}

// Line is the package's Line with the set's secrets.
func (r *Set) Line(text string, max int) string {
	if max <= 0 {
		return ""
	}
	s := r.bound(text)
	sp := r.spans(s)
	if out := clean(s, max); len(sp) == 0 && strings.HasPrefix(s, out) {
		// nothing found, and the cleaning only cut: a part of a text
		// without a secret holds none
		return out
	}
	for range 3 {
		s = clean(r.apply(s, sp), max)
		if sp = r.spans(s); len(sp) == 0 {
			return s
		}
	}
	if w := clean(Withheld, max); len(r.spans(w)) == 0 {
		return w
	}
	return ""
}

var codePattern = regexp.MustCompile(`^[a-z0-9_]{1,64}$`)

// Code is the package's Code with the set's secrets. A server's error
// code goes into messages as it is, so anything but a plain code (a
// secret it echoed, a sentence, markup) is not shown at all.
func (r *Set) Code(code, fallback string) string {
	if !codePattern.MatchString(code) || len(r.spans(code)) > 0 {
		return fallback
	}
	return code
}

// Set holds secrets, and the encodings of each that are matched as they
// are, for redacting several texts. It is not changed after New and is
// safe for concurrent use.
type Set struct {
	secrets [][]byte
	needles []needle
	// fold: some needles match regardless of ASCII case
	fold bool
	// marker replaces what is removed: Marker, unless a secret is in it
	marker string
}

// needle is one encoding of a secret. fold: the encoding has hex digits
// a server may write in either case (%2f, \u002f, =2F), so it matches
// regardless of ASCII case (s is then in lower case).
type needle struct {
	s    string
	fold bool
}

// New returns the set of secrets; empty and short ones (MinSecret) are
// left out.
func New(secrets ...string) *Set {
	r := &Set{marker: Marker}
	seen := map[string]bool{}
	for _, s := range secrets {
		if len(s) < MinSecret || seen[s] {
			continue
		}
		seen[s] = true
		r.secrets = append(r.secrets, []byte(s))
		for _, n := range encodings(s) {
			if n.fold {
				n.s = asciiLower(n.s)
			}
			r.needles = append(r.needles, n)
			r.fold = r.fold || n.fold
		}
	}
	// a secret the marker shows (or that shows in it) would come back
	// with every replacement
	for _, m := range []string{Marker, "[hidden]", "***", ""} {
		r.marker = m
		if len(r.spans(m)) == 0 {
			break
		}
	}
	return r
}

// encodings returns the encodings of s matched as text, besides the
// decoded views: the base64 of s inside a longer base64 text is matched
// by its part that depends on s alone (three alignments), even where the
// rest of s is not there; JSON with Go's replacement of invalid UTF-8,
// and with every character escaped; quoted-printable with its soft line
// breaks.
func encodings(s string) []needle {
	var out []needle
	add := func(v string, fold bool) {
		if len(v) >= minNeedle && v != s && !slices.Contains(out, needle{v, fold}) {
			out = append(out, needle{v, fold})
		}
	}
	q := url.QueryEscape(s)
	add(q, true)
	add(strings.ReplaceAll(q, "+", "%20"), true)
	add(url.PathEscape(s), true)
	b := []byte(s)
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		add(enc.EncodeToString(b), false)
	}
	for k := range 3 {
		if n := (len(b) - k) / 3 * 3; n > 0 {
			add(base64.RawStdEncoding.EncodeToString(b[k:k+n]), false)
			add(base64.RawURLEncoding.EncodeToString(b[k:k+n]), false)
		}
	}
	for _, html := range []bool{true, false} {
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(html)
		_ = enc.Encode(s) // a string: it cannot fail
		j := strings.TrimSuffix(strings.TrimSuffix(strings.TrimPrefix(buf.String(), `"`), "\n"), `"`)
		add(j, true)
		add(strings.ReplaceAll(j, "/", `\/`), true)
	}
	if utf8.ValidString(s) {
		// every character \u-escaped: the JSON view misses it behind an
		// escaped backslash ("\\\u0041…" is a backslash and "u0041")
		var all strings.Builder
		for _, c := range s {
			for _, u := range utf16.Encode([]rune{c}) {
				fmt.Fprintf(&all, `\u%04x`, u)
			}
		}
		add(all.String(), true)
	}
	for _, binary := range []bool{false, true} {
		var buf bytes.Buffer
		w := quotedprintable.NewWriter(&buf)
		w.Binary = binary
		_, _ = w.Write(b)
		_ = w.Close()
		add(buf.String(), true)
	}
	return out
}

// bound cuts a text longer than maxInput, and then drops as much again
// as the longest encoding of a secret can take, so that no secret cut in
// two stays half visible.
func (r *Set) bound(s string) string {
	if len(s) <= maxInput {
		return s
	}
	reach := 0
	for _, sec := range r.secrets {
		// \uXXXX for each byte, then base64 of that
		reach = max(reach, 8*len(sec)+16)
	}
	return s[:max(maxInput-reach, 0)]
}

// span is a part of the original text, [lo, hi).
type span struct{ lo, hi int }

// spans returns the parts of s to remove: every secret in every view,
// every needle, every value of a secret-named pair.
func (r *Set) spans(s string) []span {
	var out []span
	for _, v := range views(s) {
		add := func(a, z int) {
			lo, hi := v.span(a, z)
			out = append(out, span{lo, hi})
		}
		for _, sec := range r.secrets {
			for i := 0; ; {
				j := bytes.Index(v.b[i:], sec)
				if j < 0 {
					break
				}
				add(i+j, i+j+len(sec))
				i += j + 1
			}
		}
		r.names(v.b, add)
	}
	var lower string
	if r.fold {
		lower = asciiLower(s)
	}
	for _, n := range r.needles {
		in, ns := s, n.s
		if n.fold {
			in = lower
		}
		for i := 0; ; {
			j := strings.Index(in[i:], ns)
			if j < 0 {
				break
			}
			out = append(out, span{i + j, i + j + len(ns)})
			i += j + 1
		}
	}
	return out
}

// apply replaces the spans of s with the marker, overlapping and
// adjacent ones by one marker.
func (r *Set) apply(s string, sp []span) string {
	if len(sp) == 0 {
		return s
	}
	slices.SortFunc(sp, func(a, b span) int { return a.lo - b.lo })
	var b strings.Builder
	at := 0
	for i := 0; i < len(sp); {
		lo, hi := sp[i].lo, sp[i].hi
		for i++; i < len(sp) && sp[i].lo <= hi; i++ {
			hi = max(hi, sp[i].hi)
		}
		b.WriteString(s[at:lo])
		b.WriteString(r.marker)
		at = hi
	}
	b.WriteString(s[at:])
	return b.String()
}

// clean makes s one line of at most max bytes: control, format (bidi
// overrides, zero-width) and space characters become one space, runs of
// them collapse, the ends are trimmed, invalid UTF-8 becomes U+FFFD, and
// the cut falls between characters.
func clean(s string, max int) string {
	var b strings.Builder
	space := false
	for _, c := range s {
		if unicode.IsControl(c) || unicode.IsSpace(c) || unicode.Is(unicode.Cf, c) {
			space = b.Len() > 0
			continue
		}
		n := utf8.RuneLen(c)
		if space {
			n++
		}
		if b.Len()+n > max {
			break
		}
		if space {
			b.WriteByte(' ')
			space = false
		}
		b.WriteRune(c)
	}
	return b.String()
}

// secretKeys are keys whose value is a secret, whatever it is; a key
// ending in _ and one of secretSuffixes is one too (smtp_password,
// x_api_key). Keys compare in lower case with - as _.
var (
	secretKeys = map[string]bool{
		"client_secret": true, "refresh_token": true, "access_token": true, "id_token": true,
		"token": true, "secret": true, "password": true, "passwd": true, "pass": true, "pwd": true,
		"assertion": true, "client_assertion": true, "code": true, "code_verifier": true,
		"auth_code": true, "authorization_code": true, "device_code": true, "user_code": true,
		"auth": true, "authorization": true, "apikey": true, "credential": true, "credentials": true,
	}
	secretSuffixes = []string{"_token", "_secret", "_password", "_passwd", "_pwd", "_key", "_apikey", "_assertion", "_credential", "_credentials", "_verifier"}
)

func secretKey(k []byte) bool {
	key := strings.ReplaceAll(asciiLower(string(k)), "-", "_")
	if secretKeys[key] {
		return true
	}
	for _, s := range secretSuffixes {
		if strings.HasSuffix(key, s) {
			return true
		}
	}
	return false
}

func isKeyByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// names finds the values of secret-named pairs in b: key=value (spaces
// around = allowed), "key":"value", 'key': 'value', \"key\":\"value\"
// (JSON inside JSON), and key=Bearer <token>. An unquoted key before a
// colon is prose ("access token: the endpoint …"), not a pair. A value
// that is already the marker is left alone.
func (r *Set) names(b []byte, add func(a, z int)) {
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c != '=' && c != ':' {
			continue
		}
		k := i
		for k > 0 && b[k-1] == ' ' {
			k--
		}
		quote := ""
		switch {
		case k >= 2 && b[k-1] == '"' && b[k-2] == '\\':
			quote = `\"`
		case k >= 1 && (b[k-1] == '"' || b[k-1] == '\''):
			quote = string(b[k-1])
		}
		if c == ':' && quote == "" {
			continue
		}
		ke := k - len(quote)
		ks := ke
		for ks > 0 && isKeyByte(b[ks-1]) {
			ks--
		}
		if ks == ke || !secretKey(b[ks:ke]) || !bytes.HasSuffix(b[:ks], []byte(quote)) {
			continue
		}
		v := i + 1
		if c == '=' && v < len(b) && (b[v] == '=' || b[v] == '>') {
			continue
		}
		for v < len(b) && b[v] == ' ' {
			v++
		}
		if v == len(b) {
			continue
		}
		a, z := valueSpan(b, v)
		if z > a && (r.marker == "" || !bytes.HasPrefix(b[a:], []byte(r.marker))) {
			add(a, z)
			// a = or : inside the value is the value's ("code=a=b"); going
			// on after it keeps the scan linear
			i = z - 1
		}
	}
}

// valueSpan returns the value that starts at v: inside its quotes, or up
// to a delimiter; "Bearer <token>" and "Basic <credentials>" are one
// value.
func valueSpan(b []byte, v int) (a, z int) {
	switch {
	case bytes.HasPrefix(b[v:], []byte(`\"`)):
		a = v + 2
		if j := bytes.Index(b[a:], []byte(`\"`)); j >= 0 {
			return a, a + j
		}
		return a, len(b)
	case b[v] == '"':
		a = v + 1
		for z = a; z < len(b) && b[z] != '"'; z++ {
			if b[z] == '\\' {
				z++
			}
		}
		return a, min(z, len(b))
	case b[v] == '\'':
		a = v + 1
		if j := bytes.IndexByte(b[a:], '\''); j >= 0 {
			return a, a + j
		}
		return a, len(b)
	}
	z = unquotedEnd(b, v)
	if w := asciiLower(string(b[v:z])); w == "bearer" || w == "basic" {
		n := z
		for n < len(b) && b[n] == ' ' {
			n++
		}
		if e := unquotedEnd(b, n); e > n {
			z = e
		}
	}
	return v, z
}

func unquotedEnd(b []byte, v int) int {
	for z := v; z < len(b); z++ {
		switch c := b[z]; {
		case c <= ' ' || c == 0x7f, strings.IndexByte(`&,;"'<>()[]{}|\`, c) >= 0:
			return z
		}
	}
	return len(b)
}

func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if c := b[j]; c >= 'A' && c <= 'Z' {
					b[j] = c + 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// view is a decoding of the original text; byte i of b comes from the
// original's [lo[i], hi[i]). The original itself has no lo and hi.
type view struct {
	b      []byte
	lo, hi []int32
}

// span maps [a, z) of the view to the original.
func (v *view) span(a, z int) (int, int) {
	if v.lo == nil {
		return a, z
	}
	return int(v.lo[a]), int(v.hi[z-1])
}

// builder makes the view decoded from a parent view.
type builder struct {
	p *view
	v view
}

func newBuilder(p *view) *builder {
	return &builder{p: p, v: view{b: make([]byte, 0, len(p.b)), lo: make([]int32, 0, len(p.b)), hi: make([]int32, 0, len(p.b))}}
}

// emit appends c, decoded from the parent's [a, z).
func (w *builder) emit(c byte, a, z int) {
	lo, hi := w.p.span(a, z)
	w.v.b = append(w.v.b, c)
	w.v.lo = append(w.v.lo, int32(lo))
	w.v.hi = append(w.v.hi, int32(hi))
}

type decoder func(*view) *view

var textDecoders = []decoder{decodePercent(true), decodePercent(false), decodeJSON, decodeQP}

// views returns the original text and its decodings, two deep: each
// text decoding (percent, JSON, quoted-printable) and base64 at each
// alignment, and each of those decoded once more, except base64 twice.
func views(s string) []*view {
	root := &view{b: []byte(s)}
	out := []*view{root}
	for _, d := range textDecoders {
		v := d(root)
		if v == nil {
			continue
		}
		out = append(out, v)
		for _, d2 := range textDecoders {
			if w := d2(v); w != nil {
				out = append(out, w)
			}
		}
		for a := range 4 {
			if w := decodeBase64(v, a); w != nil {
				out = append(out, w)
			}
		}
	}
	for a := range 4 {
		v := decodeBase64(root, a)
		if v == nil {
			continue
		}
		out = append(out, v)
		for _, d2 := range textDecoders {
			if w := d2(v); w != nil {
				out = append(out, w)
			}
		}
	}
	return out
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// hexByte decodes the two hex digits at b[i:], if there are two.
func hexByte(b []byte, i int) (byte, bool) {
	if i+1 >= len(b) {
		return 0, false
	}
	h, ok1 := unhex(b[i])
	l, ok2 := unhex(b[i+1])
	return h<<4 | l, ok1 && ok2
}

// decodePercent decodes %XX in either case, and + as a space when plus.
func decodePercent(plus bool) decoder { return decodeEscapes('%', plus, false) }

// decodeQP decodes quoted-printable: =XX in either case, soft line
// breaks.
var decodeQP = decodeEscapes('=', false, true)

// decodeEscapes decodes esc followed by two hex digits (either case);
// with plus, + as a space; with soft, esc before a line break (CR LF or
// LF) as nothing, quoted-printable's soft line break.
func decodeEscapes(esc byte, plus, soft bool) decoder {
	return func(p *view) *view {
		if bytes.IndexByte(p.b, esc) < 0 && (!plus || bytes.IndexByte(p.b, '+') < 0) {
			return nil
		}
		w, changed := newBuilder(p), false
		for i := 0; i < len(p.b); {
			if p.b[i] == esc {
				if c, ok := hexByte(p.b, i+1); ok {
					w.emit(c, i, i+3)
					i += 3
					changed = true
					continue
				}
				if rest := p.b[i+1:]; soft && bytes.HasPrefix(rest, []byte("\r\n")) {
					i += 3
					changed = true
					continue
				} else if soft && bytes.HasPrefix(rest, []byte("\n")) {
					i += 2
					changed = true
					continue
				}
			}
			if plus && p.b[i] == '+' {
				w.emit(' ', i, i+1)
				i++
				changed = true
				continue
			}
			w.emit(p.b[i], i, i+1)
			i++
		}
		if !changed {
			return nil
		}
		return &w.v
	}
}

// hex4 decodes the four hex digits at b[i:].
func hex4(b []byte, i int) (rune, bool) {
	if i+4 > len(b) {
		return 0, false
	}
	h, ok1 := hexByte(b, i)
	l, ok2 := hexByte(b, i+2)
	return rune(h)<<8 | rune(l), ok1 && ok2
}

// jsonEscape returns the character a one-letter JSON escape stands for.
func jsonEscape(c byte) (byte, bool) {
	switch c {
	case '"', '\\', '/':
		return c, true
	case 'b':
		return '\b', true
	case 'f':
		return '\f', true
	case 'n':
		return '\n', true
	case 'r':
		return '\r', true
	case 't':
		return '\t', true
	}
	return 0, false
}

// decodeJSON decodes the escapes of a JSON string: \" \\ \/ \b \f \n \r
// \t and \uXXXX, with surrogate pairs.
func decodeJSON(p *view) *view {
	if bytes.IndexByte(p.b, '\\') < 0 {
		return nil
	}
	w, changed := newBuilder(p), false
	b := p.b
	for i := 0; i < len(b); {
		if b[i] != '\\' || i+1 >= len(b) {
			w.emit(b[i], i, i+1)
			i++
			continue
		}
		if c, ok := jsonEscape(b[i+1]); ok {
			w.emit(c, i, i+2)
			i += 2
			changed = true
			continue
		}
		r, ok := hex4(b, i+2)
		if b[i+1] != 'u' || !ok {
			w.emit(b[i], i, i+1)
			i++
			continue
		}
		end := i + 6
		if utf16.IsSurrogate(r) && end+1 < len(b) && b[end] == '\\' && b[end+1] == 'u' {
			if r2, ok := hex4(b, end+2); ok {
				if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
					r, end = d, end+6
				}
			}
		}
		var tmp [utf8.UTFMax]byte
		n := utf8.EncodeRune(tmp[:], r)
		for _, c := range tmp[:n] {
			w.emit(c, i, end)
		}
		i = end
		changed = true
	}
	if !changed {
		return nil
	}
	return &w.v
}

// base64Value maps both alphabets' characters to their value, others to
// -1.
var base64Value = func() (t [256]int8) {
	for i := range t {
		t[i] = -1
	}
	for i, c := range "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" {
		t[c] = int8(i)
	}
	t['+'], t['-'] = 62, 62
	t['/'], t['_'] = 63, 63
	return t
}()

// decodeBase64 decodes every run of base64 characters (either alphabet,
// mixed) of p from its a-th character on, in groups of four; a last
// group of two or three characters gives one or two bytes. The four
// alignments cover base64 text that starts anywhere in a run.
func decodeBase64(p *view, a int) *view {
	w := newBuilder(p)
	b := p.b
	for i := 0; i < len(b); {
		if base64Value[b[i]] < 0 {
			i++
			continue
		}
		j := i
		for j < len(b) && base64Value[b[j]] >= 0 {
			j++
		}
		if j-i-a >= minRun {
			for g := i + a; g+2 <= j; g += 4 {
				n := min(4, j-g)
				var x [4]byte
				for k := range n {
					x[k] = byte(base64Value[b[g+k]])
				}
				w.emit(x[0]<<2|x[1]>>4, g, g+2)
				if n >= 3 {
					w.emit(x[1]<<4|x[2]>>2, g+1, g+3)
				}
				if n == 4 {
					w.emit(x[2]<<6|x[3], g+2, g+4)
				}
			}
			if j < len(b) {
				// runs are apart in the text: a line break keeps a key
				// decoded at the end of one run from taking the next run
				// for its value
				w.emit('\n', j, j+1)
			}
		}
		i = j
	}
	if len(w.v.b) == 0 {
		return nil
	}
	return &w.v
}
