package outbox

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// TestRecoveryRule: which stored states a dot mark puts in doubt. A
// claim is not written before its attempt, so a message whose marked
// attempt was its next one may be stored "queued"; a mark of an attempt
// whose outcome is stored is stale.
func TestRecoveryRule(t *testing.T) {
	marked := dotSet{kept: true, marks: map[string]int{"m": 3}}
	// an answer comes with the mark it answers (from an earlier write of
	// another writer's record, possibly)
	answered := dotSet{kept: true, marks: map[string]int{"m": 3}, accepted: map[string]dotAnswer{"m": {3, time.Now()}}}
	refused := dotSet{kept: true, marks: map[string]int{"m": 3}, refused: map[string]int{"m": 3}}
	cases := []struct {
		name     string
		rule     recoveryRule
		st       State
		want     string
		attempts int
	}{
		{"queued, its next attempt marked", recoveryRule{dots: marked}, State{ID: "m", Status: Queued, Attempts: 2}, Unknown, 3},
		{"sending, this attempt marked", recoveryRule{dots: marked}, State{ID: "m", Status: Sending, Attempts: 3}, Unknown, 3},
		{"queued, the mark is of the attempt it records", recoveryRule{dots: marked}, State{ID: "m", Status: Queued, Attempts: 3}, Queued, 3},
		{"sending, the mark is of an earlier attempt", recoveryRule{dots: marked}, State{ID: "m", Status: Sending, Attempts: 4}, Queued, 4},
		{"sending, no mark", recoveryRule{dots: dotSet{kept: true}}, State{ID: "m", Status: Sending, Attempts: 1}, Queued, 1},
		{"queued, marked, retry_uncertain", recoveryRule{dots: marked, retryUncertain: true}, State{ID: "m", Status: Queued, Attempts: 2}, Queued, 3},
		{"sending, no record at all (an older version)", recoveryRule{}, State{ID: "m", Status: Sending, Attempts: 1}, Unknown, 1},
		{"queued, no record at all", recoveryRule{}, State{ID: "m", Status: Queued, Attempts: 1}, Queued, 1},
		{"sent stays sent", recoveryRule{dots: marked}, State{ID: "m", Status: Sent, Attempts: 3}, Sent, 3},
		{"sending, this attempt accepted", recoveryRule{dots: answered}, State{ID: "m", Status: Sending, Attempts: 3}, Sent, 3},
		{"queued, its next attempt accepted", recoveryRule{dots: answered}, State{ID: "m", Status: Queued, Attempts: 2}, Sent, 3},
		{"sending, accepted, retry_uncertain", recoveryRule{dots: answered, retryUncertain: true}, State{ID: "m", Status: Sending, Attempts: 3}, Sent, 3},
		{"sending, an earlier attempt accepted", recoveryRule{dots: answered}, State{ID: "m", Status: Sending, Attempts: 4}, Queued, 4},
		{"sending, this attempt refused", recoveryRule{dots: refused}, State{ID: "m", Status: Sending, Attempts: 3}, Queued, 3},
		{"sending, a later attempt marked (its claim unwritten)", recoveryRule{dots: marked}, State{ID: "m", Status: Sending, Attempts: 2}, Unknown, 3},
		{"sending, a later attempt accepted", recoveryRule{dots: answered}, State{ID: "m", Status: Sending, Attempts: 1}, Sent, 3},
		{"queued, a later attempt marked", recoveryRule{dots: marked}, State{ID: "m", Status: Queued, Attempts: 1}, Unknown, 3},
		{"sending, refused, then a later attempt marked", recoveryRule{dots: dotSet{kept: true, marks: map[string]int{"m": 4}, refused: map[string]int{"m": 3}}}, State{ID: "m", Status: Sending, Attempts: 3}, Unknown, 4},
		{"failed stays failed", recoveryRule{dots: answered}, State{ID: "m", Status: Failed, Attempts: 3}, Failed, 3},
	}
	for _, c := range cases {
		b, interrupted, _ := rebuildBatch("b", &BatchState{Messages: []State{c.st}}, c.rule, time.Now())
		got := b.entries[0].st
		if got.Status != c.want || got.Attempts != c.attempts {
			t.Errorf("%s: %s with %d attempts, want %s with %d", c.name, got.Status, got.Attempts, c.want, c.attempts)
		}
		if (c.want == Unknown) != (len(interrupted) == 1) {
			t.Errorf("%s: %d interrupted", c.name, len(interrupted))
		}
	}
}

// TestDotRecordIsALog: on file storage the record's file grows by one
// synced line per write and is rewritten as one line past dotLogMax; a
// torn last line leaves the line before it as the record, and a file
// nobody can read makes every message its instance was sending in doubt.
func TestDotRecordIsALog(t *testing.T) {
	dir := t.TempDir()
	fs := &certmagic.FileStorage{Path: dir}
	e := New("test", NewLiveStorage(fs), "inst", nil)
	for i := range 3 {
		if err := e.writeDotRecord(0, DotRecord{Instance: "inst", Marks: map[string]int{fmt.Sprint("m", i): 1}}); err != nil {
			t.Fatal(err)
		}
	}
	path := fs.Filename(DotKey("inst", e.nonce))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n != 3 {
		t.Fatalf("%d lines after 3 writes:\n%s", n, b)
	}
	rec, err := e.OwnDots()
	if err != nil || len(rec.Marks) != 1 || rec.Marks["m2"] != 1 {
		t.Fatalf("record %+v %v, want the last write's", rec, err)
	}
	// a torn append: the line before it is the record
	if err := os.WriteFile(path, append(b, []byte(`{"instance":"inst","marks":{"m9`)...), 0o600); err != nil {
		t.Fatal(err)
	}
	if rec, err := ParseDotRecord(append(b, []byte(`{"instance":"inst","marks":{"m9`)...)); err != nil || rec.Marks["m2"] != 1 {
		t.Fatalf("after a torn line: %+v %v", rec, err)
	}
	// past dotLogMax the file is rewritten as one line
	e.dots.closeLog(0)
	big := map[string]int{}
	for i := range 2000 {
		big[fmt.Sprintf("%028d", i)] = 1
	}
	for range (dotLogMax / 60000) + 2 {
		if err := e.writeDotRecord(0, DotRecord{Instance: "inst", Marks: big}); err != nil {
			t.Fatal(err)
		}
	}
	if info, err := os.Stat(path); err != nil || info.Size() > dotLogMax {
		t.Fatalf("the record file is %d bytes (max %d): %v", info.Size(), dotLogMax, err)
	}
	// unreadable: in doubt like an instance that kept no marks
	if err := os.WriteFile(path, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	other := New("test", NewLiveStorage(fs), "other", nil)
	set, err := other.loadDots(context.Background(), "inst")
	if err != nil || !set.broken {
		t.Fatalf("%+v %v", set, err)
	}
	rule := recoveryRule{dots: set}
	_, sendingInDoubt := rule.doubtful(State{ID: "x", Status: Sending, Attempts: 1})
	_, queuedInDoubt := rule.doubtful(State{ID: "x", Status: Queued})
	if !sendingInDoubt || queuedInDoubt {
		t.Error("a broken record must leave sending messages in doubt and queued ones not")
	}
}
