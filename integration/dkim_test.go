package integration

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/emersion/go-msgauth/dkim"
)

// dkimKeyFile writes a PKCS#8 PEM key into the test's temp dir and
// returns its path and the TXT record a verifier finds for it, computed
// here from the public key (not by authmail).
func dkimKeyFile(t *testing.T, key any) (path, record string) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	block := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	// the key's base64 must never reach a log
	secret(strings.Split(string(block), "\n")[1])
	path = filepath.Join(t.TempDir(), "dkim.pem")
	if err := os.WriteFile(path, block, 0o600); err != nil {
		t.Fatal(err)
	}
	switch k := key.(type) {
	case *rsa.PrivateKey:
		pub, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
		record = "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(pub)
	case ed25519.PrivateKey:
		record = "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(k.Public().(ed25519.PublicKey))
	}
	return path, record
}

// verifyDKIM checks every signature of raw with go-msgauth against the
// record, published only at s1._domainkey.example.com.
func verifyDKIM(raw []byte, record string) ([]*dkim.Verification, error) {
	return dkim.VerifyWithOptions(bytes.NewReader(raw), &dkim.VerifyOptions{LookupTXT: func(name string) ([]string, error) {
		if name != "s1._domainkey.example.com" {
			return nil, errors.New("no such record: " + name)
		}
		return []string{record}, nil
	}})
}

// dkimpyScript verifies the message on stdin with dkimpy (Debian's
// python3-dkim), a verifier written apart from the signer's library,
// against the record given as its argument; it prints "ok" or "fail".
const dkimpyScript = `
import sys, dkim
record = sys.argv[1].encode()
def dnsfunc(name, timeout=5):
    return record if name == b"s1._domainkey.example.com." else None
msg = sys.stdin.buffer.read()
print("ok" if dkim.verify(msg, dnsfunc=dnsfunc) else "fail")
`

// verifyDKIMpy verifies raw with dkimpy; ok reports whether dkimpy is
// there to ask. CI installs it (AUTHMAIL_REQUIRE_CONFORMANCE=1 makes
// its absence a failure).
func verifyDKIMpy(t *testing.T, raw []byte, record string) (verified, ok bool) {
	t.Helper()
	const py = "/usr/bin/python3"
	if err := exec.Command(py, "-c", "import dkim, nacl").Run(); err != nil {
		if os.Getenv("AUTHMAIL_REQUIRE_CONFORMANCE") == "1" {
			t.Fatalf("dkimpy is missing (apt-get install python3-dkim python3-nacl): %v", err)
		}
		t.Log("SKIPPING the dkimpy check: install the Debian packages python3-dkim and python3-nacl (its Ed25519 keys)")
		return false, false
	}
	cmd := exec.Command(py, "-c", dkimpyScript, record)
	cmd.Stdin = bytes.NewReader(raw)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("dkimpy: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out)) == "ok", true
}

// TestDKIMSignsEveryFlowVerifiably sends a templated flow and a /send
// through a real Caddy with an RSA and an Ed25519 key; an independent
// verifier accepts each delivered message, and the same message with a
// changed body or an added From fails.
func TestDKIMSignsEveryFlowVerifiably(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name, algo string
		key        any
	}{{"rsa", "rsa-sha256", rsaKey}, {"ed25519", "ed25519-sha256", edKey}} {
		t.Run(tc.name, func(t *testing.T) {
			path, record := dkimKeyFile(t, tc.key)
			load(t, config{Keys: `key app {env.AUTHMAIL_IT_KEY} {
			allow send otp status
			rate off
		}`, Extra: `dkim {
			domain example.com
			selector s1
			key ` + path + `
		}`})
			sends := []struct{ path, body string }{
				{"/authmail/send/otp", `{"to":"jane@example.org","code":"492817"}`},
				{"/authmail/send", `{"to":"Jane <jane@example.org>","cc":"bob@example.net","subject":"Your receipt ✓","text_body":"Thanks.\nLine two.\n","html_body":"<p>Thanks.</p>"}`},
			}
			for _, s := range sends {
				m := expectSent(t, post(t, s.path, s.body))
				if n := bytes.Count(m.Data, []byte("\r\nDKIM-Signature:")) + bytes.Count(m.Data[:15], []byte("DKIM-Signature:")); n != 1 {
					t.Fatalf("%s: %d DKIM-Signature fields in\n%s", s.path, n, m.Data)
				}
				vs, err := verifyDKIM(m.Data, record)
				if err != nil || len(vs) != 1 || vs[0].Err != nil {
					t.Fatalf("%s: verification %v %+v\n%s", s.path, err, vs[0], m.Data)
				}
				v := vs[0]
				if v.Domain != "example.com" {
					t.Errorf("d= %q", v.Domain)
				}
				want := "From:To:Cc:Reply-To:Subject:Date:Message-ID:MIME-Version:Content-Type:Content-Transfer-Encoding:List-Unsubscribe:List-Unsubscribe-Post:From:To:Cc:Reply-To:Subject:Date:Message-ID:List-Unsubscribe:List-Unsubscribe-Post"
				if got := strings.Join(v.HeaderKeys, ":"); got != want {
					t.Errorf("h= %s\nwant %s", got, want)
				}
				sig := headerOf(t, m.Data, "DKIM-Signature")
				if !strings.Contains(sig, "a="+tc.algo+";") || !strings.Contains(sig, "c=relaxed/relaxed;") || !strings.Contains(sig, "s=s1;") {
					t.Errorf("signature tags %q", sig)
				}
				if strings.Contains(sig, "l=") {
					t.Errorf("signature covers only part of the body: %q", sig)
				}

				// and so does dkimpy, a verifier of its own
				if verified, ok := verifyDKIMpy(t, m.Data, record); ok && !verified {
					t.Errorf("%s: dkimpy does not verify the signature", s.path)
				}

				// a changed body fails
				end := bytes.LastIndex(m.Data, []byte("\r\n--"))
				if end < 0 {
					end = len(m.Data) - 10
				}
				changed := append(append(append([]byte{}, m.Data[:end]...), []byte("\r\nP.S. wire money")...), m.Data[end:]...)
				if vs, err := verifyDKIM(changed, record); err != nil || len(vs) != 1 || vs[0].Err == nil {
					t.Errorf("%s: a changed body verified: %v %+v", s.path, err, vs)
				}
				if verified, ok := verifyDKIMpy(t, changed, record); ok && verified {
					t.Errorf("%s: dkimpy verified a changed body", s.path)
				}
				// a second From (shown by some clients) fails: From is oversigned
				added := append([]byte("From: Bank <ceo@evil.example>\r\n"), m.Data...)
				if vs, err := verifyDKIM(added, record); err != nil || len(vs) != 1 || vs[0].Err == nil {
					t.Errorf("%s: an added From verified: %v %+v", s.path, err, vs)
				}
			}

			// /status names domain, selector and algorithm, never the key
			st := call(t, http.MethodGet, "/authmail/status", nil, "Authorization: Bearer "+keyApp)
			settings, _ := st.json["settings"].(map[string]any)
			if got, want := mustJSON(settings["dkim"]), `{"algorithm":"`+tc.algo+`","domain":"example.com","record":"s1._domainkey.example.com","selector":"s1"}`; st.status != 200 || got != want {
				t.Errorf("/status dkim %d %s, want %s", st.status, got, want)
			}
			if strings.Contains(st.raw, path) || strings.Contains(st.raw, "PRIVATE") {
				t.Errorf("/status shows the key: %s", st.raw)
			}
		})
	}
}
