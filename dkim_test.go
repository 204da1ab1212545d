package authmail

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/certmagic"
)

func pemFile(t *testing.T, typ string, der []byte) (path, text string) {
	t.Helper()
	text = string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
	path = filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, text
}

// provisionErr provisions a capture handler with dkim and returns the error.
func provisionErr(t *testing.T, d *DKIM) (*Handler, error) {
	t.Helper()
	t.Setenv("AUTHMAIL_UNIT_KEY", "0123456789abcdef0123")
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	h := &Handler{Capture: t.TempDir(), From: "no-reply@mail.example.com", Keys: []Key{{ID: "app", Secret: "{env.AUTHMAIL_UNIT_KEY}"}},
		DKIM: d, storageOverride: &certmagic.FileStorage{Path: t.TempDir()}}
	storage := `{"module":"file_system","root":` + mustJSONString(t.TempDir()) + `}`
	ctx, err := caddy.ProvisionContext(&caddy.Config{StorageRaw: json.RawMessage(storage)})
	if err != nil {
		t.Fatal(err)
	}
	err = h.Provision(ctx)
	t.Cleanup(func() { _ = h.Cleanup() })
	return h, err
}

func mustJSONString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// TestDKIMKeyErrorsNameTheFileNeverTheKey: every unusable key fails the
// load with the file (or placeholder) and the reason, and no part of the
// key's text.
func TestDKIMKeyErrorsNameTheFileNeverTheKey(t *testing.T) {
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalPKCS8PrivateKey(ec)
	ecSEC, _ := x509.MarshalECPrivateKey(ec)

	smallPath, smallText := pemFile(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(small))
	ecPath, ecText := pemFile(t, "PRIVATE KEY", ecDER)
	secPath, secText := pemFile(t, "EC PRIVATE KEY", ecSEC)
	garbled := strings.Replace(smallText, "\n", "\nAAAA", 2)
	garbledPath := filepath.Join(t.TempDir(), "garbled.pem")
	_ = os.WriteFile(garbledPath, []byte(garbled), 0o600)
	notPEM := filepath.Join(t.TempDir(), "notpem.txt")
	_ = os.WriteFile(notPEM, []byte("p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"), 0o600)
	unreadable := filepath.Join(t.TempDir(), "missing.pem")
	t.Setenv("AUTHMAIL_UNIT_DKIM_EC", ecText)

	for _, tc := range []struct {
		key, want, text string
	}{
		{smallPath, "dkim: key " + smallPath + ": is a 1024-bit RSA key; DKIM needs at least 2048 bits", smallText},
		{ecPath, "dkim: key " + ecPath + ": is a ECDSA key; DKIM signs with RSA or Ed25519 only", ecText},
		{secPath, "dkim: key " + secPath + ": has a PEM block of type \"EC PRIVATE KEY\"; expected \"RSA PRIVATE KEY\" or \"PRIVATE KEY\" (RSA or Ed25519)", secText},
		{garbledPath, "dkim: key " + garbledPath + ": is not a valid private key", garbled},
		{notPEM, "dkim: key " + notPEM + ": holds no PEM block", "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"},
		{unreadable, "dkim: reading key " + unreadable + ": no such file or directory", ""},
		{"{env.AUTHMAIL_UNIT_DKIM_EC}", "dkim: key {env.AUTHMAIL_UNIT_DKIM_EC}: is a ECDSA key; DKIM signs with RSA or Ed25519 only", ecText},
		{"{env.AUTHMAIL_UNIT_DKIM_UNSET}", "dkim key: {env.AUTHMAIL_UNIT_DKIM_UNSET} is empty or cannot be read", ""},
	} {
		_, err := provisionErr(t, &DKIM{Domain: "example.com", Selector: "s1", Key: tc.key})
		if err == nil || err.Error() != tc.want {
			t.Errorf("key %s: got %v\nwant %s", tc.key, err, tc.want)
			continue
		}
		for _, line := range strings.Split(tc.text, "\n") {
			if len(line) > 8 && strings.Contains(err.Error(), line) {
				t.Errorf("error shows key text %q", line)
			}
		}
	}
}

func TestDKIMCheck(t *testing.T) {
	for _, tc := range []struct {
		d    DKIM
		want string
	}{
		{DKIM{Selector: "s", Key: "k"}, "dkim: domain is required"},
		{DKIM{Domain: "example", Selector: "s", Key: "k"}, "dkim: invalid domain 'example'"},
		{DKIM{Domain: "example.com", Key: "k"}, "dkim: selector is required"},
		{DKIM{Domain: "example.com", Selector: "s_1", Key: "k"}, "dkim: invalid selector 's_1' (letters, digits, '-' and '.')"},
		{DKIM{Domain: "example.com", Selector: "s1"}, "dkim: key is required"},
		{DKIM{Domain: "example.com", Selector: "s1", Key: "k", Headers: []string{"To", "Subject"}}, "dkim: headers must include From"},
		{DKIM{Domain: "example.com", Selector: "s1", Key: "k", Headers: []string{"From", "X Y"}}, "dkim: invalid header field name 'X Y'"},
		{DKIM{Domain: "example.com", Selector: "s1", Key: "k", Headers: []string{"From", "dkim-signature"}}, "dkim: headers must not list DKIM-Signature"},
	} {
		if err := tc.d.check(); err == nil || err.Error() != tc.want {
			t.Errorf("%+v: got %v, want %s", tc.d, err, tc.want)
		}
	}
}

// TestDKIMRecord: the TXT record of an RSA key is split into strings of
// at most 255 characters; an Ed25519 key's is the raw 32-byte key.
func TestDKIMRecord(t *testing.T) {
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	path, _ := pemFile(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rk))
	h, err := provisionErr(t, &DKIM{Domain: "Example.com", Selector: "mail2026", Key: path})
	if err != nil {
		t.Fatal(err)
	}
	k := h.dkim
	der, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	want := "v=DKIM1; k=rsa; p=" + b64(der)
	if k.recordName() != "mail2026._domainkey.example.com" || k.recordValue() != want {
		t.Fatalf("record %s %s", k.recordName(), k.recordValue())
	}
	z := k.zoneRecord()
	if !strings.HasPrefix(z, `mail2026._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=`) || !strings.HasSuffix(z, `" )`) {
		t.Fatalf("zone record %s", z)
	}
	inner := strings.TrimSuffix(strings.TrimPrefix(z, "mail2026._domainkey.example.com. IN TXT ( "), " )")
	parts := strings.Split(inner, `" "`)
	if len(parts) != 2 || len(strings.Trim(parts[0], `"`)) != 255 || strings.Trim(strings.Join(parts, ""), `"`) != want {
		t.Fatalf("zone record strings %q", parts)
	}

	_, ek, _ := ed25519.GenerateKey(rand.Reader)
	eder, _ := x509.MarshalPKCS8PrivateKey(ek)
	epath, _ := pemFile(t, "PRIVATE KEY", eder)
	h, err = provisionErr(t, &DKIM{Domain: "example.com", Selector: "ed", Key: epath})
	if err != nil {
		t.Fatal(err)
	}
	if got := h.dkim.recordValue(); got != "v=DKIM1; k=ed25519; p="+b64(ek.Public().(ed25519.PublicKey)) {
		t.Fatalf("ed25519 record %s", got)
	}
	if got := h.dkim.zoneRecord(); got != `ed._domainkey.example.com. IN TXT ( "`+h.dkim.recordValue()+`" )` {
		t.Fatalf("ed25519 zone record %s", got)
	}
}

func TestDKIMCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`authmail {` + minimalBlock + `
		dkim {
			domain example.com
			selector s1
			key {file./run/secrets/dkim.pem}
			headers From To Subject Date
		}
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	want := &DKIM{Domain: "example.com", Selector: "s1", Key: "{file./run/secrets/dkim.pem}", Headers: []string{"From", "To", "Subject", "Date"}}
	if b, w := mustJSONString2(h.DKIM), mustJSONString2(want); b != w {
		t.Fatalf("got %s want %s", b, w)
	}
	for input, want := range map[string]string{
		"dkim {\n domain example.com\n selector s1\n}":                     "dkim: key is required",
		"dkim {\n domain example.com\n selector s1 s2\n}":                  "dkim selector: wrong argument count; expected one value",
		"dkim {\n domain example.com\n color blue\n}":                      "unrecognized dkim subdirective 'color'",
		"dkim {\n domain example.com\n domain example.org\n}":              "dkim domain already specified",
		"dkim {\n domain example.com\n selector s\n key k\n headers To\n}": "dkim: headers must include From",
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("authmail {" + minimalBlock + "\n" + input + "\n}"))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want %s", input, err, want)
		}
	}
}

func mustJSONString2(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// TestDKIMRecordCommand adapts a Caddyfile as `caddy authmail-dkim-record
// --config` does and prints the record of its key: the public key only.
func TestDKIMRecordCommand(t *testing.T) {
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	path, text := pemFile(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rk))
	cf := filepath.Join(t.TempDir(), "Caddyfile")
	_ = os.WriteFile(cf, []byte(`example.com {
	authmail {
		from no-reply@example.com
		key app 0123456789abcdef0123
		capture /tmp/mail
		dkim {
			domain example.com
			selector s1
			key `+path+`
		}
	}
}
`), 0o600)
	body, _, _, err := caddycmd.LoadConfig(cf, "")
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	n, err := printDKIMRecords(&out, body)
	if err != nil || n != 1 {
		t.Fatalf("%d records, %v", n, err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	want := "v=DKIM1; k=rsa; p=" + b64(der)
	want = `s1._domainkey.example.com. IN TXT ( "` + want[:255] + `" "` + want[255:] + `" )` + "\n"
	if out.String() != want {
		t.Fatalf("got %s\nwant %s", out.String(), want)
	}
	if strings.Contains(out.String(), strings.Split(text, "\n")[1]) {
		t.Fatal("printed the private key")
	}
}

// TestDKIMInlineKeyIsNeverShown: a key pasted where its path belongs —
// a PEM in a Caddyfile heredoc or in the JSON config the admin API's
// /load takes, valid or not, and a DER key in base64 without its PEM
// lines — fails `caddy adapt`, `caddy validate` and the provisioning
// with an error that names the dkim key setting and holds no line and
// no 12 characters of the key.
func TestDKIMInlineKeyIsNeverShown(t *testing.T) {
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	_, ek, _ := ed25519.GenerateKey(rand.Reader)
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	edDER, _ := x509.MarshalPKCS8PrivateKey(ek)
	valid := string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: edDER}))
	weak := string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(small)}))
	keys := map[string]string{
		"valid ed25519 PEM":        valid,
		"1024-bit RSA PEM":         weak,
		"truncated PEM":            weak[:len(weak)/2],
		"base64 without PEM lines": b64(x509.MarshalPKCS1PrivateKey(small)),
	}
	shows := func(t *testing.T, where string, err error, key string) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", where)
		}
		msg := err.Error()
		if !strings.Contains(msg, "dkim") || !strings.Contains(msg, "key") {
			t.Errorf("%s: the error does not name the dkim key: %s", where, msg)
		}
		for _, line := range strings.Split(key, "\n") {
			if len(line) >= 8 && strings.Contains(msg, line) {
				t.Fatalf("%s: the error shows the key's line %q: %s", where, line, msg)
			}
		}
		body := strings.Join(strings.Fields(strings.NewReplacer("-----BEGIN", " ", "-----END", " ").Replace(key)), "")
		for i := 0; i+12 <= len(body); i++ {
			if strings.Contains(msg, body[i:i+12]) {
				t.Fatalf("%s: the error shows %q of the key: %s", where, body[i:i+12], msg)
			}
		}
	}
	for name, key := range keys {
		t.Run(name, func(t *testing.T) {
			value := key
			if strings.Contains(key, "\n") {
				value = "<<PEM\n" + strings.TrimSuffix(key, "\n") + "\nPEM"
			}
			src := ":8080 {\n\tauthmail {\n\t\tfrom no-reply@example.com\n\t\tkey app 0123456789abcdef0123\n\t\tcapture " + t.TempDir() +
				"\n\t\tdkim {\n\t\t\tdomain example.com\n\t\t\tselector s1\n\t\t\tkey " + value + "\n\t\t}\n\t}\n}\n"
			adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), nil)
			if err == nil {
				// caddy validate: adapted, then provisioned
				var cfg caddy.Config
				if err := json.Unmarshal(adapted, &cfg); err != nil {
					t.Fatal(err)
				}
				shows(t, "caddy validate", caddy.Validate(&cfg), key)
			} else {
				shows(t, "caddy adapt", err, key)
			}
			// a JSON config, as /load and caddy validate provision it
			_, err = provisionErr(t, &DKIM{Domain: "example.com", Selector: "s1", Key: key})
			shows(t, "provision", err, key)
		})
	}
	// a path is still named
	missing := filepath.Join(t.TempDir(), "dkim-2026.pem")
	if _, err := provisionErr(t, &DKIM{Domain: "example.com", Selector: "s1", Key: missing}); err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("%v does not name %s", err, missing)
	}
}
