// Package redistest runs a real redis-server for tests, so that the
// outbox can be tested on the Redis storage module
// (github.com/pberkel/caddy-storage-redis) the way clusters run it.
//
// Each server is a child process on a free loopback port with its own
// data directory, append-only file and fsync on every write (the
// durability docs/cluster.md asks operators for), stopped when the test
// ends.
// A machine without redis-server skips the test loudly; with
// AUTHMAIL_REQUIRE_REDIS=1 (CI sets it) the test fails instead, so CI
// cannot pass with the Redis tests silently skipped.
package redistest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	storageredis "github.com/pberkel/caddy-storage-redis"
)

// Server is a running (or stopped) redis-server.
type Server struct {
	t    testing.TB
	Addr string // 127.0.0.1:port, stable across Stop and Start
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
	// loadRDB starts the server with the append-only file off, so that
	// it loads dump.rdb (StartFromRDB)
	loadRDB bool
}

// Binary returns the path of redis-server, or "" when it is not installed.
func Binary() string {
	p, err := exec.LookPath("redis-server")
	if err != nil {
		return ""
	}
	return p
}

// Require skips t when redis-server is missing, or fails it when
// AUTHMAIL_REQUIRE_REDIS=1.
func Require(t testing.TB) string {
	t.Helper()
	bin := Binary()
	if bin != "" {
		return bin
	}
	msg := "redis-server is not installed (Debian package redis-server: apt-get install redis-server); the Redis storage tests need it"
	if os.Getenv("AUTHMAIL_REQUIRE_REDIS") == "1" {
		t.Fatal(msg + ", and AUTHMAIL_REQUIRE_REDIS=1")
	}
	t.Skip("SKIPPING: " + msg)
	return ""
}

// Start starts a redis-server for t and stops it when t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	s := newServer(t)
	s.Start()
	t.Cleanup(func() { s.stop(os.Kill) })
	return s
}

// newServer is a server for t, not started: a free port on loopback and
// a data directory of its own.
func newServer(t testing.TB) *Server {
	t.Helper()
	Require(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return &Server{t: t, Addr: addr, dir: t.TempDir()}
}

// Start (re)starts a stopped server on the same port and data directory:
// what it had acknowledged is read back from its append-only file.
func (s *Server) Start() {
	s.t.Helper()
	if s.cmd != nil {
		s.t.Fatal("redistest: server already running")
	}
	_, port, _ := net.SplitHostPort(s.Addr)
	var lastErr error
	// the port was free when Start picked it; another process can take it
	// in between, and a restart can find it in TIME_WAIT: retry a little
	for attempt := 0; attempt < 5; attempt++ {
		aof := "yes"
		if s.loadRDB {
			aof = "no"
		}
		cmd := exec.Command(Binary(), "--bind", "127.0.0.1", "--port", port,
			"--save", "", "--appendonly", aof, "--appendfsync", "always",
			"--dir", s.dir, "--daemonize", "no", "--protected-mode", "yes")
		out, err := cmd.StdoutPipe()
		if err != nil {
			s.t.Fatal(err)
		}
		cmd.Stderr = cmd.Stdout
		if err := cmd.Start(); err != nil {
			s.t.Fatal(err)
		}
		done := make(chan struct{})
		var log strings.Builder
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if log.Len() < 8192 {
					log.WriteString(sc.Text() + "\n")
				}
			}
			_ = cmd.Wait()
			close(done)
		}()
		if lastErr = s.waitPing(done); lastErr == nil {
			s.cmd, s.done = cmd, done
			return
		}
		_ = cmd.Process.Kill()
		<-done
		lastErr = fmt.Errorf("%v; redis-server said:\n%s", lastErr, log.String())
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("redistest: redis-server on %s did not start: %v", s.Addr, lastErr)
}

// StartFromRDB starts a redis-server for t on a copy of an RDB snapshot
// (what redis-cli --rdb writes, or the dump.rdb of a BGSAVE), restored
// the way docs/production.md tells operators to: loaded with the
// append-only file off (with it on, Redis starts from its append-only
// file and ignores dump.rdb), then switched to appendonly yes, which
// writes the append-only file from the loaded data. Stop and Start then
// read that file, as for the servers of Start.
func StartFromRDB(t testing.TB, rdb string) *Server {
	t.Helper()
	s := newServer(t)
	s.loadRDB = true
	data, err := os.ReadFile(rdb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.dir, "dump.rdb"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	s.Start()
	s.loadRDB = false
	t.Cleanup(func() { s.stop(os.Kill) })
	if r, err := do(s.Addr, "CONFIG", "SET", "appendonly", "yes"); err != nil || r != "OK" {
		t.Fatalf("redistest: CONFIG SET appendonly yes: %q %v", r, err)
	}
	// the append-only file is written by a background rewrite; until it
	// is done, a restart would start empty
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := do(s.Addr, "INFO", "persistence")
		if err == nil && strings.Contains(info, "aof_enabled:1\r\n") && strings.Contains(info, "aof_rewrite_in_progress:0\r\n") &&
			strings.Contains(info, "aof_rewrite_scheduled:0\r\n") && strings.Contains(info, "aof_last_bgrewrite_status:ok\r\n") {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: the append-only file of the restored snapshot was not written: %v\n%s", err, info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// do sends one command to the server at addr and returns its reply: a
// status or bulk string, or an error for an error reply. Enough for
// tests that drive a server as an operator's redis-cli would.
func do(addr string, args ...string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var req strings.Builder
	fmt.Fprintf(&req, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&req, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write([]byte(req.String())); err != nil {
		return "", err
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	switch {
	case strings.HasPrefix(line, "+"), strings.HasPrefix(line, ":"):
		return line[1:], nil
	case strings.HasPrefix(line, "-"):
		return "", fmt.Errorf("redis: %s", line[1:])
	case strings.HasPrefix(line, "$"):
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return "", err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("redistest: unexpected reply %q", line)
}

// waitPing waits until the server answers PING with PONG.
func (s *Server) waitPing(exited chan struct{}) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("redis-server exited")
		default:
		}
		if err := ping(s.Addr); err == nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("no PONG within 10s")
}

func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// Stop kills the server (SIGKILL, no shutdown save: the append-only file
// with fsync on every write is all that survives, as after a crash) and
// waits until it exited and its port refuses connections.
func (s *Server) Stop() { s.stop(os.Kill) }

func (s *Server) stop(sig os.Signal) {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(sig)
	<-s.done
	s.cmd, s.done = nil, nil
}

var prefixSeq atomic.Int64

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9_-]+`)

// Prefix returns a key prefix of its own for t, so that tests sharing a
// server do not see each other's keys.
func Prefix(t testing.TB) string {
	name := unsafeChars.ReplaceAllString(t.Name(), "_")
	if len(name) > 60 {
		name = name[len(name)-60:]
	}
	return "t" + strconv.FormatInt(prefixSeq.Add(1), 10) + "_" + name
}

// Storage provisions a Redis storage module on the server under
// keyPrefix, as Caddy would from `storage redis { address … key_prefix … }`,
// and cleans it up (closes its client) when t ends. Two storages with the
// same prefix share their keys and locks, like two Caddy processes.
func (s *Server) Storage(t testing.TB, keyPrefix string) *storageredis.RedisStorage {
	t.Helper()
	rs := storageredis.New()
	rs.Address = []string{s.Addr}
	rs.KeyPrefix = keyPrefix
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := rs.Provision(ctx); err != nil {
		cancel()
		t.Fatalf("provisioning the Redis storage: %v", err)
	}
	t.Cleanup(func() {
		_ = rs.Cleanup()
		cancel()
	})
	return rs
}

// StorageJSON is the storage module's JSON config for the server under
// keyPrefix.
func (s *Server) StorageJSON(keyPrefix string) string {
	return fmt.Sprintf(`{"module":"redis","address":[%q],"key_prefix":%q}`, s.Addr, keyPrefix)
}

// ForEachStorage runs f as two subtests: on a fresh certmagic
// FileStorage and on a fresh Redis storage (a server of its own, see
// Start). open returns one more handle on the same storage, as another
// process would have.
func ForEachStorage(t *testing.T, f func(t *testing.T, open func() certmagic.Storage)) {
	t.Run("file", func(t *testing.T) {
		dir := t.TempDir()
		f(t, func() certmagic.Storage { return &certmagic.FileStorage{Path: dir} })
	})
	t.Run("redis", func(t *testing.T) {
		srv := Start(t)
		prefix := Prefix(t)
		f(t, func() certmagic.Storage { return srv.Storage(t, prefix) })
	})
}
