package authmail

import (
	"context"
	"testing"

	"github.com/caddy-authmail/authmail/internal/outbox"
	"github.com/caddy-authmail/authmail/internal/smtptest"
)

// TestTenantIsTheSecretAcrossInstances: a message belongs to the secret
// of the key that created it, on every instance sharing the storage and
// whatever the key is called there; a key of the same id with another
// secret cannot read it. A record written before tenants existed (no
// tenant) is matched by key id, as it was then.
func TestTenantIsTheSecretAcrossInstances(t *testing.T) {
	srv := authServer(t, smtptest.StartTLS)
	shared := t.TempDir()
	a := newInstance(t, shared).handler(withSMTP(t, srv))
	rec, out := call(t, a, "POST", "/authmail/send/otp", otp("jane@example.org"))
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	id := out["id"].(string)
	waitRetired(t, a, id)
	// the tenant is derived from the secret alone; a change of the
	// derivation would orphan every stored message
	st, ok := storedState(a, id)
	const want = "b20f03b3d8d6988fc54574a199e35844"
	if !ok || st.Tenant != want || st.KeyID != "app" {
		t.Fatalf("stored state %+v, want tenant %s", st, want)
	}

	const otherSecret = "another-secret-of-app-0123"
	in2 := newInstance(t, shared)
	same := in2.handler(withSMTP(t, srv))
	renamed := in2.handler(withSMTP(t, srv), func(h *Handler) { h.Keys[0].ID = "renamed" })
	impostor := in2.handler(withSMTP(t, srv), func(h *Handler) { h.Keys[0].Secret = otherSecret })
	other := in2.handler(withSMTP(t, srv), func(h *Handler) { h.Keys = []Key{{ID: "other", Secret: otherSecret}} })
	get := func(h *Handler, secret string) (int, string) {
		headers := []string{}
		if secret != "" {
			headers = append(headers, "Authorization: Bearer "+secret)
		}
		rec, _ := call(t, h, "GET", "/authmail/messages/"+id, "", headers...)
		return rec.Code, rec.Body.String()
	}
	notFound := `{"error_code":"not_found","message":"no message with this id for this key"}` + "\n"
	if code, body := get(same, ""); code != 200 {
		t.Errorf("the same key on another instance: %d %s", code, body)
	}
	if code, body := get(renamed, ""); code != 200 {
		t.Errorf("the same secret under another key id: %d %s", code, body)
	}
	if code, body := get(impostor, otherSecret); code != 404 || body != notFound {
		t.Errorf("key id app with another secret: %d %s", code, body)
	}

	// a record from before tenants: key id match, as before the upgrade
	ctx := context.Background()
	bs, err := outbox.LoadState(ctx, a.engine.Storage(), outbox.BatchOf(id))
	if err != nil {
		t.Fatal(err)
	}
	for i := range bs.Messages {
		bs.Messages[i].Tenant = ""
	}
	if err := a.shared.st.putJSON(ctx, outbox.KeySt+outbox.BatchOf(id), bs); err != nil {
		t.Fatal(err)
	}
	if code, body := get(impostor, otherSecret); code != 200 {
		t.Errorf("a record without a tenant, key id app: %d %s", code, body)
	}
	if code, body := get(other, otherSecret); code != 404 || body != notFound {
		t.Errorf("a record without a tenant, key id other: %d %s", code, body)
	}
}
