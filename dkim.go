package authmail

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/emersion/go-msgauth/dkim"
	"go.uber.org/zap"
)

// DKIM configures DKIM signing (RFC 6376) of every message authmail
// sends, templated flows and /send alike, with relaxed/relaxed
// canonicalization over the whole body.
type DKIM struct {
	// Domain is the signing domain (d=). For DMARC it should be the From
	// address's domain or a parent of it. Required.
	Domain string `json:"domain,omitempty"`

	// Selector names the key in DNS: the public key is published as a
	// TXT record at <selector>._domainkey.<domain>. Required.
	Selector string `json:"selector,omitempty"`

	// Key is the private key: the path of a PEM file (PKCS#1 "RSA PRIVATE
	// KEY" or PKCS#8 "PRIVATE KEY"), or a {file.*} or {env.*} placeholder
	// whose value is the PEM text. RSA keys need at least 2048 bits;
	// Ed25519 keys are accepted too (RFC 8463; not every receiver checks
	// them, so RSA is the safer choice). It is read and checked when the
	// config loads. Required.
	Key string `json:"key,omitempty"`

	// Headers replaces the list of signed header fields; it must contain
	// From. Listed fields a message lacks are signed as absent, and From,
	// To, Cc, Reply-To, Subject, Date, Message-ID and the List-Unsubscribe
	// fields among them are signed once more than they occur
	// (oversigned), so that nobody can add a second one. Default: From,
	// To, Cc, Reply-To, Subject, Date, Message-ID, MIME-Version,
	// Content-Type, Content-Transfer-Encoding, List-Unsubscribe and
	// List-Unsubscribe-Post.
	Headers []string `json:"headers,omitempty"`
}

// defaultDKIMHeaders are the signed header fields.
var defaultDKIMHeaders = []string{
	"From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID",
	"MIME-Version", "Content-Type", "Content-Transfer-Encoding",
	"List-Unsubscribe", "List-Unsubscribe-Post",
}

// dkimOversigned are signed one more time than they occur: a verifier
// then fails a message to which someone added another instance (a second
// From or Subject shown instead of the signed one).
var dkimOversigned = []string{"From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post"}

// minDKIMRSABits is the smallest RSA key accepted; RFC 8301 requires
// verifiers to refuse keys below 1024 bits and signers to use 2048.
const minDKIMRSABits = 2048

var (
	dkimSelectorPattern = regexp.MustCompile(`^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)
	dkimHeaderPattern   = regexp.MustCompile(`^[!-9;-~]+$`)
)

// dkimKey is a resolved DKIM configuration: the parsed key, never its
// PEM text.
type dkimKey struct {
	domain, selector string
	key              crypto.Signer
	headers          []string
	oversign         []string
}

// check validates the DKIM settings without I/O.
func (d *DKIM) check() error {
	if d.Domain == "" {
		return errors.New("dkim: domain is required")
	}
	if !dkimSelectorPattern.MatchString(d.Domain) || !strings.Contains(d.Domain, ".") {
		return fmt.Errorf("dkim: invalid domain '%s'", d.Domain)
	}
	if d.Selector == "" {
		return errors.New("dkim: selector is required")
	}
	if !dkimSelectorPattern.MatchString(d.Selector) {
		return fmt.Errorf("dkim: invalid selector '%s' (letters, digits, '-' and '.')", d.Selector)
	}
	if d.Key == "" {
		return errors.New("dkim: key is required")
	}
	if keyText(d.Key) {
		// a PEM pasted into a heredoc or the JSON config: refused before
		// anything tries it as a path, and never quoted
		return errors.New("dkim: key holds the key's text; give the path of its PEM file or a {file.*} or {env.*} placeholder (the value is not shown)")
	}
	if len(d.Headers) > 0 {
		from := false
		for _, h := range d.Headers {
			if !dkimHeaderPattern.MatchString(h) {
				return fmt.Errorf("dkim: invalid header field name '%s'", h)
			}
			if strings.EqualFold(h, "From") {
				from = true
			}
			if strings.EqualFold(h, "DKIM-Signature") {
				return errors.New("dkim: headers must not list DKIM-Signature")
			}
		}
		if !from {
			return errors.New("dkim: headers must include From")
		}
	}
	return nil
}

// dkimKeySource names where a key comes from in errors: the file path
// or the placeholder, never the key's text. A value that does not look
// like a path (a base64 blob without PEM lines) may be the key itself,
// pasted where its path belongs: it is not shown either.
func (d *DKIM) keySource() string {
	if hasPlaceholder(d.Key) {
		return strings.Join(placeholderPattern.FindAllString(d.Key, -1), ", ")
	}
	if !plausiblePath(d.Key) {
		return "(the value is not shown: it does not look like a file path)"
	}
	return d.Key
}

// keyText reports whether a dkim key value holds key material: PEM
// armour, or a line break, which no path has.
func keyText(v string) bool {
	return strings.Contains(v, "-----") || strings.Contains(v, "PRIVATE KEY") || strings.ContainsAny(v, "\r\n")
}

// plausiblePath reports whether v may be a file path rather than a key
// pasted in its place: no key text, no control character, at most
// PATH_MAX bytes, no name longer than NAME_MAX, and not, as a whole, 40
// or more characters of the base64 alphabet mixing upper case, lower
// case and digits: that is a DER key in base64, while a key file's path
// has a dot, a dash or an underscore somewhere, or lacks capitals or
// digits.
func plausiblePath(v string) bool {
	if len(v) > 4096 || keyText(v) || strings.IndexFunc(v, unicode.IsControl) >= 0 {
		return false
	}
	for _, name := range strings.FieldsFunc(v, func(r rune) bool { return r == '/' || r == '\\' }) {
		if len(name) > 255 {
			return false
		}
	}
	return len(v) < 40 || !base64Like(v)
}

// base64Like reports whether s is made of the standard base64 alphabet
// only and mixes upper case, lower case and digits.
func base64Like(s string) bool {
	var upper, lower, digit bool
	for _, c := range s {
		switch {
		case c >= 'A' && c <= 'Z':
			upper = true
		case c >= 'a' && c <= 'z':
			lower = true
		case c >= '0' && c <= '9':
			digit = true
		case c != '+' && c != '/' && c != '=':
			return false
		}
	}
	return upper && lower && digit
}

// resolve reads and checks the key. Errors name the file or placeholder
// and what is wrong, never the key material.
func (d *DKIM) resolve(repl *caddy.Replacer, logger *zap.Logger, fromDomain string) (*dkimKey, error) {
	if d == nil {
		return nil, nil
	}
	if err := d.check(); err != nil {
		return nil, err
	}
	var pemText []byte
	if hasPlaceholder(d.Key) {
		v, err := expandSecret(repl, "dkim key", d.Key)
		if err != nil {
			return nil, err
		}
		pemText = []byte(v)
	} else {
		b, err := os.ReadFile(d.Key)
		if err != nil {
			var pe *os.PathError
			if errors.As(err, &pe) {
				err = pe.Err
			}
			return nil, fmt.Errorf("dkim: reading key %s: %v", d.keySource(), err)
		}
		pemText = b
	}
	key, err := parseDKIMKey(pemText)
	if err != nil {
		return nil, fmt.Errorf("dkim: key %s: %v", d.keySource(), err)
	}
	k := &dkimKey{domain: strings.ToLower(d.Domain), selector: d.Selector, key: key, headers: defaultDKIMHeaders}
	if len(d.Headers) > 0 {
		k.headers = d.Headers
	}
	for _, h := range k.headers {
		if slices.ContainsFunc(dkimOversigned, func(o string) bool { return strings.EqualFold(o, h) }) {
			k.oversign = append(k.oversign, h)
		}
	}
	fd := strings.ToLower(fromDomain)
	if fd != k.domain && !strings.HasSuffix(fd, "."+k.domain) && logger != nil {
		logger.Warn("dkim domain is not the from address's domain or a parent of it, so the signature does not align for DMARC",
			zap.String("dkim_domain", k.domain), zap.String("from_domain", fd))
	}
	return k, nil
}

// parseDKIMKey parses a PEM private key usable for DKIM: RSA of at
// least 2048 bits or Ed25519.
func parseDKIMKey(pemText []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(pemText)
	if block == nil {
		return nil, errors.New("holds no PEM block")
	}
	var parsed any
	var err error
	switch block.Type {
	case "RSA PRIVATE KEY":
		parsed, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		parsed, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("has a PEM block of type %q; expected \"RSA PRIVATE KEY\" or \"PRIVATE KEY\" (RSA or Ed25519)", block.Type)
	}
	if err != nil {
		return nil, errors.New("is not a valid private key")
	}
	switch k := parsed.(type) {
	case *rsa.PrivateKey:
		if bits := k.N.BitLen(); bits < minDKIMRSABits {
			return nil, fmt.Errorf("is a %d-bit RSA key; DKIM needs at least %d bits", bits, minDKIMRSABits)
		}
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	default:
		return nil, fmt.Errorf("is a %s key; DKIM signs with RSA or Ed25519 only", keyTypeName(parsed))
	}
}

func keyTypeName(k any) string {
	switch fmt.Sprintf("%T", k) {
	case "*ecdsa.PrivateKey":
		return "ECDSA"
	case "*ecdh.PrivateKey":
		return "ECDH"
	}
	return "an unsupported"
}

// sign returns the DKIM-Signature field (with its CRLF) for the
// rendered message. go-msgauth signs, not go-mail's built-in signer:
// go-mail v0.8.1 folds the h= tag inside a field name once the list is
// longer than a line ("Con\r\n tent-Type"), which relaxed header
// canonicalization keeps as a space, so its signatures over this list
// never verify.
func (k *dkimKey) sign(msg []byte) (string, error) {
	s, err := dkim.NewSigner(&dkim.SignOptions{
		Domain: k.domain, Selector: k.selector, Signer: k.key, Hash: crypto.SHA256,
		HeaderCanonicalization: dkim.CanonicalizationRelaxed, BodyCanonicalization: dkim.CanonicalizationRelaxed,
		HeaderKeys: slices.Concat(k.headers, k.oversign),
	})
	if err != nil {
		return "", err
	}
	if _, err := s.Write(msg); err != nil {
		_ = s.Close()
		return "", err
	}
	if err := s.Close(); err != nil {
		return "", err
	}
	return s.Signature(), nil
}

// recordName is the DNS name of the key's TXT record.
func (k *dkimKey) recordName() string {
	return k.selector + "._domainkey." + k.domain
}

// recordValue is the TXT record's text (RFC 6376 3.6.1, RFC 8463).
func (k *dkimKey) recordValue() string {
	switch pub := k.key.Public().(type) {
	case ed25519.PublicKey:
		return "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(pub)
	default:
		der, _ := x509.MarshalPKIXPublicKey(pub)
		return "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der)
	}
}

// zoneRecord is the record as a zone-file line: the value split into
// quoted strings of at most 255 characters, as one TXT record may hold
// several (RFC 7208 3.3 and every DNS provider's UI).
func (k *dkimKey) zoneRecord() string {
	v := k.recordValue()
	var parts []string
	for len(v) > 255 {
		parts = append(parts, `"`+v[:255]+`"`)
		v = v[255:]
	}
	parts = append(parts, `"`+v+`"`)
	return k.recordName() + ". IN TXT ( " + strings.Join(parts, " ") + " )"
}

// algorithm is the signature algorithm (a=) of the key.
func (k *dkimKey) algorithm() string {
	if _, ok := k.key.(ed25519.PrivateKey); ok {
		return "ed25519-sha256"
	}
	return "rsa-sha256"
}

// unmarshalDKIM parses `dkim { domain …; selector …; key …; headers … }`.
func unmarshalDKIM(d *caddyfile.Dispenser) (*DKIM, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	k := &DKIM{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return nil, d.Errf("dkim %s already specified", sub)
		}
		seen[sub] = true
		args := d.RemainingArgs()
		if sub == "headers" {
			if len(args) == 0 {
				return nil, d.Errf("dkim headers: expected at least one header field name")
			}
			k.Headers = args
			continue
		}
		if len(args) != 1 {
			// never quotes a token: key may be a placeholder's text
			return nil, d.Errf("dkim %s: wrong argument count; expected one value", sub)
		}
		switch sub {
		case "domain":
			k.Domain = args[0]
		case "selector":
			k.Selector = args[0]
		case "key":
			k.Key = args[0]
		default:
			return nil, d.Errf("unrecognized dkim subdirective '%s'", sub)
		}
	}
	if err := k.check(); err != nil {
		return nil, d.WrapErr(err)
	}
	return k, nil
}
