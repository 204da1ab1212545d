package outbox

import (
	"os"
	"os/exec"
	"testing"
)

// TestProcessState: a Heartbeat names a process that this host can
// check only when it is on this host, in this PID namespace, and not
// this process itself.
func TestProcessState(t *testing.T) {
	me := thisProcess()
	if me.Host == "" || me.PIDNS == "" {
		t.Skip("no host name or PID namespace here: heartbeats are watched instead")
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name         string
		proc         hostProcess
		alive, known bool
	}{
		{"live process here", hostProcess{Host: me.Host, PIDNS: me.PIDNS, PID: os.Getppid()}, true, true},
		{"exited process here", hostProcess{Host: me.Host, PIDNS: me.PIDNS, PID: dead.Process.Pid}, false, true},
		{"another host", hostProcess{Host: me.Host + "-other", PIDNS: me.PIDNS, PID: os.Getppid()}, false, false},
		{"another PID namespace", hostProcess{Host: me.Host, PIDNS: "pid:[1]", PID: os.Getppid()}, false, false},
		{"this very PID (another namespace that looks alike)", me, false, false},
		{"an older version: no process recorded", hostProcess{}, false, false},
	}
	for _, c := range cases {
		alive, known := processState(Heartbeat{Proc: c.proc}, me)
		if alive != c.alive || known != c.known {
			t.Errorf("%s: alive %v known %v, want %v %v", c.name, alive, known, c.alive, c.known)
		}
	}
}
