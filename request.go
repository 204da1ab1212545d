package authmail

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/mail"
	"net/netip"
	"net/url"
	"reflect"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// Input limits. They keep every value within what SMTP and mail clients
// handle and bound the work one request can cause.
const (
	maxAddressesPerField = 100
	maxSubjectRunes      = 998
	maxUserNameRunes     = 200
	maxCodeRunes         = 64
	maxTokenBytes        = 2048
	maxURLBytes          = 2048
	maxUserAgentRunes    = 512
	maxLocationRunes     = 200
	maxExpiresMinutes    = 43200 // 30 days
	maxAddressBytes      = 998
)

// apiError is an error answer of the HTTP API.
type apiError struct {
	Status  int
	Code    string
	Message string
	Field   string
	// Allow is sent as the Allow header with 405 answers.
	Allow string
}

func (e *apiError) Error() string { return e.Code + ": " + e.Message }

func invalid(field, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusUnprocessableEntity, Code: "invalid_request", Field: field,
		Message: field + " " + fmt.Sprintf(format, args...)}
}

func linkNotAllowed(field, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusUnprocessableEntity, Code: "link_not_allowed", Field: field,
		Message: fmt.Sprintf(format, args...)}
}

// addressList is a JSON field that holds one address (a string) or several
// (an array of strings).
type addressList []string

func (l *addressList) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	switch {
	case bytes.Equal(b, []byte("null")):
		*l = nil
		return nil
	case len(b) > 0 && b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*l = addressList{s}
		return nil
	case len(b) > 0 && b[0] == '[':
		var ss []string
		if err := json.Unmarshal(b, &ss); err != nil {
			var ute *json.UnmarshalTypeError
			if errors.As(err, &ute) {
				return &json.UnmarshalTypeError{Value: ute.Value, Type: reflect.TypeFor[addressList]()}
			}
			return err
		}
		*l = ss
		return nil
	}
	return &json.UnmarshalTypeError{Value: jsonKind(b), Type: reflect.TypeFor[addressList]()}
}

func jsonKind(b []byte) string {
	if len(b) == 0 {
		return "empty"
	}
	switch b[0] {
	case '{':
		return "object"
	case 't', 'f':
		return "bool"
	case 'n':
		return "null"
	default:
		return "number"
	}
}

// decodeJSON decodes body strictly into v: valid UTF-8, one JSON object,
// no unknown fields, no trailing data.
func decodeJSON(body []byte, v any) *apiError {
	if !utf8.Valid(body) {
		// encoding/json would silently replace the bad bytes with U+FFFD
		if field := invalidUTF8Field(body); field != "" {
			return invalid(field, "must be valid UTF-8")
		}
		return &apiError{Status: http.StatusBadRequest, Code: "invalid_json", Message: "the request body is not valid UTF-8"}
	}
	// a top-level null would decode into the zero value without an error
	if t := bytes.TrimLeft(body, " \t\r\n"); len(t) > 0 && t[0] != '{' {
		return &apiError{Status: http.StatusBadRequest, Code: "invalid_json",
			Message: "the request body must be a JSON object"}
	}
	if err := ambiguousKey(body, v); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return &apiError{Status: http.StatusBadRequest, Code: "invalid_json",
			Message: "the request body holds data after the JSON object"}
	}
	return nil
}

// ambiguousKey refuses what encoding/json would silently resolve: a key
// given twice in one object (at any depth; encoding/json keeps the last,
// so a checked "to" could be followed by another), and a top-level key
// that names a field of v only case-insensitively ("TO", "ſubject"),
// which encoding/json would accept as that field. A body that is not
// well-formed JSON passes here and is reported by the decoder.
func ambiguousKey(body []byte, v any) *apiError {
	known := jsonFieldNames(reflect.TypeOf(v))
	dec := json.NewDecoder(bytes.NewReader(body))
	type object struct{ keys map[string]bool }
	var stack []*object // nil entries are arrays
	expectKey := false
	for {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		top := (*object)(nil)
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{':
				stack = append(stack, &object{keys: map[string]bool{}})
				expectKey = true
				continue
			case '[':
				stack = append(stack, nil)
			case '}', ']':
				stack = stack[:len(stack)-1]
				if len(stack) == 0 {
					return nil
				}
			}
			// after a closed value (or an opened array) a key follows
			// only in an object
			expectKey = len(stack) > 0 && stack[len(stack)-1] != nil
			continue
		case string:
			if top != nil && expectKey {
				if top.keys[t] {
					return &apiError{Status: http.StatusBadRequest, Code: "invalid_json", Field: t,
						Message: fmt.Sprintf("duplicate field %q: each field may appear only once", t)}
				}
				top.keys[t] = true
				if len(stack) == 1 && !known[t] {
					for name := range known {
						if strings.EqualFold(name, t) {
							return &apiError{Status: http.StatusBadRequest, Code: "invalid_json", Field: t,
								Message: fmt.Sprintf("field %q must be written %q: field names are case-sensitive", t, name)}
						}
					}
				}
				expectKey = false
				continue
			}
		}
		expectKey = top != nil
	}
}

// jsonFieldNames returns the JSON names of the fields of the struct t
// points to, those of embedded structs included.
func jsonFieldNames(t reflect.Type) map[string]bool {
	names := map[string]bool{}
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return names
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case tag == "-":
		case f.Anonymous && tag == "":
			for n := range jsonFieldNames(f.Type) {
				names[n] = true
			}
		case tag != "":
			names[tag] = true
		case f.IsExported():
			names[f.Name] = true
		}
	}
	return names
}

// invalidUTF8Field returns the top-level field whose key or value holds
// invalid UTF-8, or "" when it cannot tell.
func invalidUTF8Field(body []byte) string {
	dec := json.NewDecoder(bytes.NewReader(body))
	var stack []byte // '{' or '['
	expectKey := false
	key := ""
	prev := int64(0)
	for {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		off := dec.InputOffset()
		span := body[min(prev, off):off]
		prev = off
		inObject := len(stack) > 0 && stack[len(stack)-1] == '{'
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{', '[':
				stack = append(stack, byte(t))
				expectKey = t == '{'
			case '}', ']':
				stack = stack[:len(stack)-1]
				expectKey = len(stack) > 0 && stack[len(stack)-1] == '{'
			}
		case string:
			if inObject && expectKey {
				if len(stack) == 1 {
					key = t
				}
				if !utf8.Valid(span) {
					return key
				}
				expectKey = false
				continue
			}
			if !utf8.Valid(span) {
				return key
			}
			expectKey = inObject
		default:
			expectKey = inObject
		}
	}
}

func jsonError(err error) *apiError {
	bad := func(msg string) *apiError {
		return &apiError{Status: http.StatusBadRequest, Code: "invalid_json", Message: msg}
	}
	var syn *json.SyntaxError
	var ute *json.UnmarshalTypeError
	switch {
	case errors.Is(err, io.EOF):
		return bad("the request body is empty; expected a JSON object")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return bad("the JSON document is incomplete")
	case errors.As(err, &syn):
		return bad(fmt.Sprintf("malformed JSON at byte %d: %s", syn.Offset, strings.TrimPrefix(syn.Error(), "json: ")))
	case errors.As(err, &ute):
		if ute.Field == "" {
			return bad("the request body must be a JSON object")
		}
		return invalid(ute.Field, "must be %s, not %s", typeName(ute.Type), ute.Value)
	}
	if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		name := strings.Trim(f, `"`)
		if name == "" {
			name = `""`
		}
		return &apiError{Status: http.StatusUnprocessableEntity, Code: "invalid_request", Field: name,
			Message: fmt.Sprintf("unknown field %q", name)}
	}
	return bad("invalid JSON: " + strings.TrimPrefix(err.Error(), "json: "))
}

func typeName(t reflect.Type) string {
	if t == nil {
		return "of another type"
	}
	if t == reflect.TypeFor[addressList]() {
		return "an email address or a list of email addresses"
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Int, reflect.Int64, reflect.Int32:
		return "an integer"
	case reflect.Bool:
		return "a boolean"
	case reflect.Slice:
		return "a list"
	case reflect.Pointer:
		return typeName(t.Elem())
	}
	return "of another type"
}

// mailAddr is a validated address. Addr has an ASCII (punycode) domain
// and is what goes into the envelope and the headers.
type mailAddr struct {
	Name string
	Addr string
}

func (a mailAddr) mail() *mail.Address { return &mail.Address{Name: a.Name, Address: a.Addr} }

// domain returns the (ASCII) domain of the address.
func (a mailAddr) domain() string {
	_, d, _ := strings.Cut(a.Addr, "@")
	return d
}

// headerProblem reports why v cannot go into a mail header, or "".
func headerProblem(v string) string {
	for _, r := range v {
		if r == '\r' || r == '\n' {
			return "must not contain line breaks (CR or LF)"
		}
		if unicode.IsControl(r) && r != '\t' {
			return "must not contain control characters"
		}
		if r == '\u2028' || r == '\u2029' {
			// mail clients and the JavaScript that shows mail may break
			// lines at them
			return "must not contain line or paragraph separators (U+2028, U+2029)"
		}
	}
	return ""
}

// encodedWordPattern finds RFC 2047 encoded words (=?charset?b|q?text?=)
// anywhere in a value: mail clients decode them leniently, also inside
// quoted strings, glued to other text, or with missing base64 padding.
var encodedWordPattern = regexp.MustCompile(`=\?([^?\s]*)\?([bBqQ])\?([^?\s]*)\?=`)

// encodedWordProblem reports why v, bound for a mail header, cannot go
// there because of an encoded word in it, or "". authmail encodes
// caller text itself; an encoded word in it is decoded by the
// recipient's client, so it is refused when its decoded text holds a
// line break or control character (it would show as, or be re-serialised
// as, an injected header line), when it does not decode (a lenient client
// may still decode it), or when its charset is not UTF-8, US-ASCII or
// ISO-8859-1 (authmail cannot tell what other charsets hide: UTF-7 writes
// CR LF as "+AA0ACg-"). The problem string completes "<field> …".
func encodedWordProblem(v string) string {
	for _, m := range encodedWordPattern.FindAllStringSubmatch(v, -1) {
		charset, _, _ := strings.Cut(strings.ToLower(m[1]), "*") // RFC 2231 language suffix
		var raw []byte
		var err error
		if m[2] == "b" || m[2] == "B" {
			raw, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(m[3], "="))
		} else {
			raw, err = qDecode(m[3])
		}
		if err != nil {
			return "has an encoded word (=?…?=) that does not decode; send the text as plain UTF-8"
		}
		var text string
		switch charset {
		case "utf-8", "utf8", "us-ascii":
			if !utf8.Valid(raw) {
				return "has an encoded word (=?…?=) that is not valid UTF-8"
			}
			text = string(raw)
		case "iso-8859-1", "latin1":
			rs := make([]rune, len(raw))
			for i, b := range raw {
				rs[i] = rune(b)
			}
			text = string(rs)
		default:
			return fmt.Sprintf("has an encoded word (=?…?=) in charset %q, which authmail does not accept; send the text as plain UTF-8", m[1])
		}
		if headerProblem(text) != "" {
			return "has an encoded word (=?…?=) that decodes to line breaks or control characters"
		}
		// the decoded text is shorter than the word: this ends
		if p := encodedWordProblem(text); p != "" {
			return p
		}
	}
	return ""
}

// qDecode decodes the text of a Q-encoded word: "_" is a space, "=XX"
// a byte in hex (either case).
func qDecode(s string) ([]byte, error) {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '_':
			out = append(out, ' ')
		case '=':
			if i+3 > len(s) {
				return nil, errors.New("truncated escape")
			}
			b, err := hex.DecodeString(s[i+1 : i+3])
			if err != nil {
				return nil, err
			}
			out = append(out, b[0])
			i += 2
		default:
			out = append(out, c)
		}
	}
	return out, nil
}

// displayNameProblem reports why name cannot be a display name in an
// address header, or "". Go's net/mail, which renders address headers,
// writes a non-ASCII name that contains a backslash as a Q-encoded word
// with the backslash left raw, which RFC 2047 forbids in a display name
// and which net/mail itself then fails to parse.
func displayNameProblem(name string) string {
	if !utf8.ValidString(name) {
		return "is not valid UTF-8"
	}
	if strings.ContainsRune(name, '\\') && !isASCII(name) {
		return "has a backslash together with non-ASCII characters, which cannot be encoded in a mail header"
	}
	return ""
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// bodyProblem reports why v cannot be a message body, or "".
func bodyProblem(v string) string {
	for _, r := range v {
		if unicode.IsControl(r) && r != '\t' && r != '\n' && r != '\r' && r != '\f' {
			return "must not contain control characters other than tab and line breaks"
		}
	}
	return ""
}

// parseAddress validates one RFC 5322 address ("a@example.com" or
// "Name <a@example.com>"). The problem string completes "<field> …".
func parseAddress(s string) (mailAddr, string) {
	if p := headerProblem(s); p != "" {
		return mailAddr{}, p
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return mailAddr{}, "must not be empty"
	}
	if len(s) > maxAddressBytes {
		return mailAddr{}, "is too long"
	}
	a, err := mail.ParseAddress(s)
	if err != nil {
		if list, lerr := mail.ParseAddressList(s); lerr == nil && len(list) > 1 {
			return mailAddr{}, "must hold exactly one address; use a JSON list for several recipients"
		}
		return mailAddr{}, "is not a valid email address"
	}
	// encoded words (=?utf-8?b?…?=) in the name are decoded by ParseAddress
	// and may hide line breaks or control characters
	if headerProblem(a.Name) != "" {
		return mailAddr{}, "has a display name with line breaks or control characters"
	}
	if p := displayNameProblem(a.Name); p != "" {
		return mailAddr{}, "has a display name that " + p
	}
	// net/mail leaves quoted and malformed encoded words as they are, and
	// a decoded name may hold another; clients decode them all
	if p := encodedWordProblem(s); p != "" {
		return mailAddr{}, p
	}
	if p := encodedWordProblem(a.Name); p != "" {
		return mailAddr{}, "has a display name that " + p
	}
	local, dom, ok := cutLast(a.Address, "@")
	if !ok || local == "" || dom == "" {
		return mailAddr{}, "is not a valid email address"
	}
	if !isASCII(local) {
		return mailAddr{}, "has non-ASCII characters before the @, which authmail does not send (SMTPUTF8)"
	}
	if !dotAtom(local) {
		// net/mail unquotes "a b"@x to a b@x; such a local part would
		// need quoting again in RCPT TO, which few servers accept
		return mailAddr{}, "has a local part that needs quoting (spaces, quotes, consecutive dots or other special characters), which authmail does not send"
	}
	if len(local) > 64 {
		return mailAddr{}, "has a local part longer than 64 characters"
	}
	if literal, isLiteral := strings.CutPrefix(dom, "["); isLiteral {
		inner, closed := strings.CutSuffix(literal, "]")
		if _, perr := netip.ParseAddr(strings.TrimPrefix(inner, "IPv6:")); !closed || perr != nil {
			return mailAddr{}, "has an invalid domain literal"
		}
	} else {
		ascii, derr := idna.Lookup.ToASCII(dom)
		if derr != nil || ascii == "" || strings.HasSuffix(ascii, ".") {
			return mailAddr{}, "has an invalid domain"
		}
		dom = strings.ToLower(ascii)
	}
	addr := local + "@" + dom
	if len(addr) > 254 {
		return mailAddr{}, "is longer than 254 characters"
	}
	return mailAddr{Name: a.Name, Addr: addr}, ""
}

// dotAtom reports whether a local part is an RFC 5322 dot-atom: atext
// characters in dot-separated, non-empty runs.
func dotAtom(s string) bool {
	if s == "" || s[0] == '.' || s[len(s)-1] == '.' || strings.Contains(s, "..") {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || strings.IndexByte("!#$%&'*+-/=?^_`{|}~", c) >= 0 {
			continue
		}
		return false
	}
	return true
}

func cutLast(s, sep string) (before, after string, found bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}

// addresses validates a list field.
func (l addressList) addresses(field string, required bool) ([]mailAddr, *apiError) {
	if len(l) == 0 {
		if required {
			return nil, invalid(field, "is required")
		}
		return nil, nil
	}
	if len(l) > maxAddressesPerField {
		return nil, invalid(field, "has %d addresses; at most %d are allowed", len(l), maxAddressesPerField)
	}
	out := make([]mailAddr, 0, len(l))
	for i, s := range l {
		a, p := parseAddress(s)
		if p != "" {
			if len(l) == 1 {
				return nil, invalid(field, "%s", p)
			}
			return nil, invalid(field, "entry %d %s", i+1, p)
		}
		out = append(out, a)
	}
	return out, nil
}

// single validates a field that must hold exactly one address.
func (l addressList) single(field string) (mailAddr, *apiError) {
	if len(l) > 1 {
		return mailAddr{}, invalid(field, "must be a single address")
	}
	as, err := l.addresses(field, true)
	if err != nil {
		return mailAddr{}, err
	}
	return as[0], nil
}

// localRecipientProblem reports why a recipient is not an address on the
// internet's mail system, or "". The SMTP relay delivers a domain literal
// (user@[127.0.0.1]) to that address, a single-label domain
// (user@localhost, user@intranet) to whatever the relay's resolver makes
// of it, and an IP address written as a domain (user@127.0.0.1) through
// resolvers that accept it as an address: each can make the relay
// connect to internal hosts. The problem string completes "<field> …".
func localRecipientProblem(a mailAddr) string {
	const how = ", which authmail refuses unless allow_local_recipients is on"
	d := a.domain()
	if strings.HasPrefix(d, "[") {
		return "is at a domain literal (an IP address in brackets)" + how
	}
	i := strings.LastIndexByte(d, '.')
	if i < 0 {
		return "has a single-label domain such as localhost" + how
	}
	// top-level domains start with a letter (RFC 1123 2.1); "127.0.0.1",
	// "127.1" and "0x7f.1" are addresses to getaddrinfo
	if tld := d[i+1:]; tld == "" || tld[0] < 'a' || tld[0] > 'z' {
		return "has a domain whose last label does not start with a letter (an IP address written without brackets)" + how
	}
	return ""
}

// checkText validates an optional header-safe text value.
func checkText(field, v string, maxRunes int) *apiError {
	if p := headerProblem(v); p != "" {
		return invalid(field, "%s", p)
	}
	if n := utf8.RuneCountInString(v); n > maxRunes {
		return invalid(field, "is %d characters long; at most %d are allowed", n, maxRunes)
	}
	return nil
}

// checkHeaderText validates an optional text value that goes into a
// mail header (a subject, a display name): checkText, and no encoded
// word that decodes to what the header must not hold.
func checkHeaderText(field, v string, maxRunes int) *apiError {
	if err := checkText(field, v, maxRunes); err != nil {
		return err
	}
	if p := encodedWordProblem(v); p != "" {
		return invalid(field, "%s", p)
	}
	return nil
}

// checkExpiry returns the expiry in minutes, or the default.
func checkExpiry(v *int, def int) (int, *apiError) {
	if v == nil {
		return def, nil
	}
	if *v < 1 || *v > maxExpiresMinutes {
		return 0, invalid("expires_in_minutes", "must be between 1 and %d", maxExpiresMinutes)
	}
	return *v, nil
}

// checkCode validates an OTP code: 1–64 printable characters.
func checkCode(code string) *apiError {
	n := utf8.RuneCountInString(code)
	if n == 0 {
		return invalid("code", "is required")
	}
	if n > maxCodeRunes {
		return invalid("code", "is %d characters long; at most %d are allowed", n, maxCodeRunes)
	}
	for _, r := range code {
		if !unicode.IsPrint(r) {
			return invalid("code", "must consist of printable characters")
		}
	}
	if strings.TrimSpace(code) != code {
		return invalid("code", "must not start or end with a space")
	}
	return nil
}

// checkToken validates a link token.
func checkToken(token string) *apiError {
	if len(token) > maxTokenBytes {
		return invalid("token", "is longer than %d bytes", maxTokenBytes)
	}
	for _, r := range token {
		if !unicode.IsPrint(r) {
			return invalid("token", "must consist of printable characters")
		}
	}
	return nil
}

// parseHTTPURL parses an absolute http(s) URL without user info.
func parseHTTPURL(s string) (*url.URL, string) {
	if len(s) > maxURLBytes {
		return nil, fmt.Sprintf("is longer than %d bytes", maxURLBytes)
	}
	if p := headerProblem(s); p != "" {
		return nil, p
	}
	u, err := url.Parse(s)
	if err != nil || !u.IsAbs() || u.Host == "" || u.Opaque != "" {
		return nil, "must be an absolute http or https URL"
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, "must be an http or https URL"
	}
	if u.User != nil {
		return nil, "must not contain user information"
	}
	if strings.ContainsAny(s, " \t\\") {
		return nil, "must not contain spaces or backslashes"
	}
	if p := urlCharProblem(s, u); p != "" {
		return nil, p
	}
	return u, ""
}

// urlCharProblem reports a character that a URL cannot carry raw, or "".
// Such a URL is refused, not percent-encoded: a mail client (and the
// link scanner of link_policy) ends a link at a Unicode space, separator,
// control or format character and at the ASCII characters a URL may not
// hold raw, so "https://app.example/x\u2028https://evil.example/" passes
// the origin check as one URL on app.example yet shows the reader a second
// link to evil.example. Letters and symbols beyond ASCII (an IDN host, a
// path in another script) stay allowed. The message names the character
// by its code point only: the URL itself may hold a secret token.
func urlCharProblem(s string, u *url.URL) string {
	for _, r := range s {
		bad := false
		switch {
		case r < utf8.RuneSelf:
			bad = strings.ContainsRune("\"<>^`{|}'", r)
		default:
			bad = unicode.IsSpace(r) || unicode.In(r, unicode.Z, unicode.C) || r == utf8.RuneError
		}
		if bad {
			return fmt.Sprintf("must not contain %U (a space, separator, control, format or other character that a URL cannot carry raw); percent-encode it", r)
		}
	}
	// square brackets belong around an IPv6 host, nowhere else
	if n := strings.Count(s, "[") + strings.Count(s, "]"); n > strings.Count(u.Host, "[")+strings.Count(u.Host, "]") {
		return "must not contain [ or ] outside an IPv6 host; percent-encode them"
	}
	return ""
}

// origin returns scheme://host[:port] in canonical form: lowercase, IDN
// hosts in punycode, and the default port omitted.
func origin(u *url.URL) string {
	scheme := strings.ToLower(u.Scheme)
	host := strings.ToLower(u.Hostname())
	if a, err := idna.Lookup.ToASCII(host); err == nil {
		host = a
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	port := u.Port()
	if (scheme == "https" && port == "443") || (scheme == "http" && port == "80") {
		port = ""
	}
	if port != "" {
		return scheme + "://" + host + ":" + port
	}
	return scheme + "://" + host
}
