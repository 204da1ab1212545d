package ratelimit

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Spec allows N events per Window; N == 0 disables the limit.
type Spec struct {
	N      int
	Window time.Duration
}

// String returns the spec as ParseSpec reads it: "600/1m", or "off".
func (s Spec) String() string {
	if s.N == 0 {
		return "off"
	}
	return fmt.Sprintf("%d/%s", s.N, shortDuration(s.Window))
}

func shortDuration(d time.Duration) string {
	s := d.String()
	s = strings.TrimSuffix(s, "0s")
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// ParseSpec parses "<n>/<duration>" (e.g. "600/1m", "3/1d") or "off".
// The count is from 1 to 1000000, the window from 1s to 7d.
func ParseSpec(s string) (Spec, error) {
	if s == "off" {
		return Spec{}, nil
	}
	num, win, ok := strings.Cut(s, "/")
	if !ok {
		return Spec{}, fmt.Errorf("rate '%s' must look like <n>/<duration>, e.g. 600/1m, or be off", s)
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 1 || n > 1_000_000 {
		return Spec{}, fmt.Errorf("rate '%s': the count must be a number from 1 to 1000000", s)
	}
	d, err := time.ParseDuration(win)
	if err != nil {
		// allow "1d" like Caddy durations
		if days, ok := strings.CutSuffix(win, "d"); ok {
			if k, kerr := strconv.Atoi(days); kerr == nil {
				d, err = time.Duration(k)*24*time.Hour, nil
			}
		}
	}
	if err != nil || d < time.Second || d > 7*24*time.Hour {
		return Spec{}, fmt.Errorf("rate '%s': the window must be a duration from 1s to 7d", s)
	}
	return Spec{N: n, Window: d}, nil
}
