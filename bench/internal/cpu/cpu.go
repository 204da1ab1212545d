// Package cpu reports the CPU time the current process has used, so the
// benchmark tools can print their own cost per message next to Caddy's
// and smtp-sink's (which the script reads from /proc).
package cpu

import "syscall"

// Seconds returns the user plus system CPU time of this process so far.
func Seconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}
