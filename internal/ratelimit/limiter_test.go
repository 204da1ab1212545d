package ratelimit

import (
	"testing"
	"time"
)

func TestParseSpec(t *testing.T) {
	good := map[string]Spec{
		"600/1m": {600, time.Minute}, "5/15m": {5, 15 * time.Minute}, "10/1h30m": {10, 90 * time.Minute},
		"3/1d": {3, 24 * time.Hour}, "1000000/7d": {1_000_000, 7 * 24 * time.Hour}, "1/1s": {1, time.Second}, "off": {},
	}
	for in, want := range good {
		got, err := ParseSpec(in)
		if err != nil || got != want {
			t.Errorf("ParseSpec(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "600", "600/", "/1m", "0/1m", "-1/1m", "x/1m", "1000001/1m", "5/0s", "5/500ms", "5/8d", "5/forever", "on", "Off"} {
		if _, err := ParseSpec(bad); err == nil {
			t.Errorf("ParseSpec(%q) accepted", bad)
		}
	}
	for spec, want := range map[Spec]string{
		{600, time.Minute}: "600/1m", {5, 15 * time.Minute}: "5/15m", {10, 90 * time.Minute}: "10/1h30m",
		{3, 24 * time.Hour}: "3/24h", {2, 2 * time.Hour}: "2/2h", {1, time.Second}: "1/1s", {}: "off",
	} {
		if s := spec.String(); s != want {
			t.Errorf("%#v.String() = %q, want %q", spec, s, want)
		}
		if back, err := ParseSpec(spec.String()); err != nil || back != spec {
			t.Errorf("ParseSpec(%q) = %v, %v; want %v", spec.String(), back, err, spec)
		}
	}
	// the messages are the configuration's: they name the setting's value
	if _, err := ParseSpec("5/8d"); err == nil || err.Error() != "rate '5/8d': the window must be a duration from 1s to 7d" {
		t.Errorf("error %v", err)
	}
}

func TestLimiterSlidingWindow(t *testing.T) {
	l := New()
	spec := Spec{3, time.Minute}
	t0 := time.Unix(1_800_000_000, 0)
	for i := range 3 {
		if ok, _ := l.Take("k", spec, t0.Add(time.Duration(i)*time.Second)); !ok {
			t.Fatalf("event %d refused", i)
		}
	}
	ok, wait := l.Take("k", spec, t0.Add(10*time.Second))
	if ok || wait != 50*time.Second {
		t.Fatalf("4th: %v %v, want refused with 50s", ok, wait)
	}
	// the oldest event leaves the window after 60s
	if ok, _ := l.Take("k", spec, t0.Add(60*time.Second+time.Millisecond)); !ok {
		t.Fatal("refused after the window moved")
	}
	// other keys are independent; "off" never limits
	if ok, _ := l.Take("other", spec, t0.Add(10*time.Second)); !ok {
		t.Fatal("another key was limited")
	}
	for range 100 {
		if ok, _ := l.Take("k", Spec{}, t0); !ok {
			t.Fatal("off limited")
		}
	}
	// Blocked/Record (auth failures)
	for i := range 3 {
		if b, _ := l.Blocked("ip", spec, t0); b {
			t.Fatalf("blocked after %d failures", i)
		}
		l.Record("ip", spec, t0)
	}
	if b, w := l.Blocked("ip", spec, t0.Add(5*time.Second)); !b || w != 55*time.Second {
		t.Fatalf("not blocked after 3 failures: %v %v", b, w)
	}
	// a wait is at least a second
	if b, w := l.Blocked("ip", spec, t0.Add(59*time.Second+900*time.Millisecond)); !b || w != time.Second {
		t.Fatalf("just before the window ends: %v %v, want blocked for 1s", b, w)
	}
	// memory: at most n events per key, and none after the window
	for range 1000 {
		l.Record("busy", spec, t0)
	}
	if n := len(l.local["busy"].times); n != 3 {
		t.Fatalf("kept %d events, want 3", n)
	}
	l.Sweep(t0.Add(3 * time.Minute))
	if len(l.local) != 0 {
		t.Fatalf("Sweep kept %d keys", len(l.local))
	}
}

// TestTakeAllIsAllOrNothing: over the limit for one key, TakeAll counts
// the event for none.
func TestTakeAllIsAllOrNothing(t *testing.T) {
	l := New()
	spec := Spec{2, time.Minute}
	t0 := time.Unix(1_800_000_000, 0)
	l.Record("b", spec, t0)
	l.Record("b", spec, t0.Add(time.Second))
	if i, w := l.TakeAll([]string{"a", "b", "c"}, spec, t0.Add(2*time.Second)); i != 1 || w != 58*time.Second {
		t.Fatalf("TakeAll = %d, %v; want 1, 58s", i, w)
	}
	if l.local["a"] != nil || l.local["c"] != nil {
		t.Fatal("a refused TakeAll counted events")
	}
	if i, _ := l.TakeAll([]string{"a", "c"}, spec, t0.Add(2*time.Second)); i != -1 || len(l.local["a"].times) != 1 || len(l.local["c"].times) != 1 {
		t.Fatalf("TakeAll = %d", i)
	}
}

// TestHashIsStable: hashes are stored (recipients in status records)
// and published (limiter keys): for a salt they never change.
func TestHashIsStable(t *testing.T) {
	l := New()
	if h := l.Hash("jane@example.org"); h != "072a423cbcbd801a75e490e1" {
		t.Errorf("Hash without a salt = %s", h)
	}
	salt := make([]byte, 32)
	for i := range salt {
		salt[i] = byte(i)
	}
	l.SetSalt(salt)
	salt[0] = 0xff // SetSalt keeps its own copy
	if h := l.Hash("jane@example.org"); h != "888dfb956b59084499ea4219" {
		t.Errorf("Hash = %s", h)
	}
	a, b := NewRandomSalt(), NewRandomSalt()
	if len(a) != 32 || string(a) == string(b) {
		t.Errorf("NewRandomSalt: %x %x", a, b)
	}
}
