package outbox

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	storageredis "github.com/pberkel/caddy-storage-redis"
	"github.com/redis/go-redis/v9"
)

// Fencing tokens: the writes that matter after a takeover (a batch's
// state record, the ownership markers, an accepted batch, the dot
// records) carry the fencing epoch of every instance whose work they
// touch, and a storage that can refuses them when an epoch moved on.
//
// Each instance has an epoch (authmail/fence/<instance>, 0 when
// missing). An adopter raises it before it reads anything of the
// instance's work, and so does the instance itself when it
// re-establishes its ownership after a lapse (and at every start). A
// write made under epoch n of an instance is applied only while that
// instance's epoch is still n: once another instance adopted the work,
// or the instance itself started over, a write still in flight from
// before (held by a stalled connection, delivered after the heal) is
// refused. A write also carries a deadline (the end of its writer's
// lease, by the wall clock): a storage that has a clock of its own
// refuses it when it arrives later.
//
// How much of that a storage gives:
//   - Redis (caddy-storage-redis, without its encryption and
//     compression): full. One Lua script checks the epochs and the
//     deadline (Redis's TIME) and makes the writes, atomically; values
//     are encoded as the module encodes them, its directory index
//     included, so the module reads them back.
//   - every other storage, and Redis with encryption or compression:
//     the storage's lock (authmail_fence_<instance>) is held while the
//     epoch is read and the writes are made, and the deadline is checked
//     by the writer's clock before each write. A write that the storage
//     acknowledges only after the writer's lock expired (the Redis lock
//     after 5 s, the file lock after certmagic's staleness, a pause of
//     the whole process that long) can still land after an adoption.

// errFenced is the error of a write that the storage refused because an
// epoch it carried is no longer current, or it arrived past its
// deadline.
var errFenced = errors.New("the write was refused: the ownership it was made under has ended (another instance adopted the work, or the instance re-established its own)")

// fenceCond is an instance's epoch that a write requires.
type fenceCond struct {
	instance string
	epoch    uint64
}

// fenceOp is one write of a fenced group: a Store, or a Delete.
type fenceOp struct {
	key   string
	value []byte
	del   bool
}

// fencer is a storage's way to make fenced writes.
type fencer interface {
	// bump raises an instance's epoch by one and returns the new one;
	// with ifHeartbeat, only if the instance's heartbeat still holds
	// exactly that (an adopter's decision), else errFenced.
	bump(ctx context.Context, instance string, ifHeartbeat []byte) (uint64, error)
	// epoch returns an instance's current epoch.
	epoch(ctx context.Context, instance string) (uint64, error)
	// apply makes every op, in order, if every cond holds and the
	// deadline (zero: none) has not passed; else it returns errFenced.
	apply(ctx context.Context, conds []fenceCond, deadline time.Time, ops []fenceOp) error
	// forget deletes an instance's epoch (the instance is forgotten).
	forget(ctx context.Context, instance string) error
}

// KeyFence is the folder of the instances' epochs on storages other than
// Redis.
const KeyFence = "authmail/fence/"

// KeyEpoch is the folder of the instances' epochs on Redis, as raw keys.
const KeyEpoch = "authmail/epoch/"

// fencerFor returns the fencer of the storage value in use now.
func fencerFor(s certmagic.Storage) fencer {
	if l, ok := s.(*LiveStorage); ok {
		s = l.get()
	}
	if rs, ok := s.(*storageredis.RedisStorage); ok && rs.EncryptionKey == "" && rs.Compression == storageredis.CompressionNone {
		if c, ok := rs.GetClient().(redis.UniversalClient); ok && c != nil {
			return redisFencer{rs: rs, c: c}
		}
	}
	return lockFencer{s: s}
}

// --- Redis -----------------------------------------------------------------

type redisFencer struct {
	rs *storageredis.RedisStorage
	c  redis.UniversalClient
}

func (f redisFencer) key(k string) string { return path.Join(f.rs.KeyPrefix, k) }

// fenceKey is an instance's epoch on Redis: a raw integer beside the
// module's values (under its key prefix, not in its directory index), so
// that INCR and the script can read it; authmail/epoch/, not
// authmail/fence/, so that it never meets a module value of the lock
// path's.
func (f redisFencer) fenceKey(instance string) string { return f.key(KeyEpoch + instance) }

// bumpScript raises an epoch (KEYS[1]), if ARGV[1] is "1" only while
// the heartbeat (KEYS[2], a value of the module) holds ARGV[2].
var bumpScript = redis.NewScript(`
if ARGV[1] == '1' then
  local raw = redis.call('GET', KEYS[2])
  if not raw then return -1 end
  local ok, sd = pcall(cjson.decode, raw)
  if not ok or sd.value ~= ARGV[2] then return -1 end
end
return redis.call('INCR', KEYS[1])
`)

func (f redisFencer) bump(ctx context.Context, instance string, ifHeartbeat []byte) (uint64, error) {
	check, want := "0", ""
	if ifHeartbeat != nil {
		// the module stores the value as JSON []byte: standard base64
		check, want = "1", base64.StdEncoding.EncodeToString(ifHeartbeat)
	}
	n, err := bumpScript.Run(ctx, f.c, []string{f.fenceKey(instance), f.key(KeyInst + instance)}, check, want).Int64()
	if err != nil {
		return 0, err
	}
	if n < 0 {
		return 0, errFenced
	}
	return uint64(n), nil
}

func (f redisFencer) epoch(ctx context.Context, instance string) (uint64, error) {
	n, err := f.c.Get(ctx, f.fenceKey(instance)).Uint64()
	if errors.Is(err, redis.Nil) {
		return 0, nil
	}
	return n, err
}

func (f redisFencer) forget(ctx context.Context, instance string) error {
	return f.c.Del(ctx, f.fenceKey(instance)).Err()
}

// fenceScript checks the epochs and the deadline, then makes the
// writes the way caddy-storage-redis's Store and Delete do (the
// directory index: one sorted set per directory, members "name" or
// "dir/", scored by the Unix time).
//
// KEYS: the epochs' keys, then one key per write. ARGV: the deadline in
// Unix milliseconds (0: none), the number of epochs, the epochs, then
// per write "s" and the value and the score, or "d".
var fenceScript = redis.NewScript(`
local deadline = tonumber(ARGV[1])
if deadline > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now > deadline then return -1 end
end
local nc = tonumber(ARGV[2])
for i = 1, nc do
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  if cur ~= tonumber(ARGV[2 + i]) then return 0 end
end
local function split(key)
  local i = key:match('.*()/')
  if not i then return nil, key end
  return key:sub(1, i - 1), key:sub(i + 1)
end
local a = 3 + nc
for k = nc + 1, #KEYS do
  local key = KEYS[k]
  local op = ARGV[a]
  if op == 's' then
    local value, score = ARGV[a + 1], ARGV[a + 2]
    a = a + 3
    local cur, isdir = key, false
    while true do
      local dir, base = split(cur)
      if not dir or dir == '' then break end
      if isdir then base = base .. '/' end
      if redis.call('ZADD', dir, score, base) == 0 then break end
      cur, isdir = dir, true
    end
    redis.call('SET', key, value)
  else
    a = a + 1
    local cur, isdir = key, false
    while true do
      local dir, base = split(cur)
      if not dir or dir == '' then break end
      if isdir then base = base .. '/' end
      redis.call('ZREM', dir, base)
      if redis.call('EXISTS', dir) == 1 then break end
      cur, isdir = dir, true
    end
    redis.call('DEL', key)
  end
end
return 1
`)

func (f redisFencer) apply(ctx context.Context, conds []fenceCond, deadline time.Time, ops []fenceOp) error {
	keys := make([]string, 0, len(conds)+len(ops))
	args := make([]any, 0, 2+len(conds)+3*len(ops))
	var dl int64
	if !deadline.IsZero() {
		dl = max(deadline.UnixMilli(), 1)
	}
	args = append(args, dl, len(conds))
	for _, c := range conds {
		keys = append(keys, f.fenceKey(c.instance))
		args = append(args, strconv.FormatUint(c.epoch, 10))
	}
	now := time.Now()
	for _, op := range ops {
		keys = append(keys, f.key(op.key))
		if op.del {
			args = append(args, "d")
			continue
		}
		// what the module's Store writes, without compression or
		// encryption (fencerFor checked)
		v, err := json.Marshal(&storageredis.StorageData{Value: op.value, Modified: now, Size: int64(len(op.value))})
		if err != nil {
			return err
		}
		args = append(args, "s", v, strconv.FormatInt(now.Unix(), 10))
	}
	res, err := fenceScript.Run(ctx, f.c, keys, args...).Int()
	if err != nil {
		return err
	}
	switch res {
	case 1:
		return nil
	case -1:
		return fmt.Errorf("%w (it reached Redis after its deadline)", errFenced)
	default:
		return errFenced
	}
}

// --- every other storage: under the storage's lock ----------------------

type lockFencer struct {
	s certmagic.Storage
}

// fenceLocks shares a storage lock among a process's own fenced writes
// of one instance: the first takes the storage's lock, the others join it
// while it is held, the last releases it. The lock excludes other
// processes (an adopter's raise of the epoch); a process's own writes do
// not wait for each other (a stalled write must not hold back a dot
// mark), and a contended storage lock is polled only once a second.
var fenceLocks sync.Map // storage and instance → *sharedLock

type sharedLock struct {
	mu        sync.Mutex
	n         int           // holders
	acquiring chan struct{} // closed when a Lock in progress ends
}

func (f lockFencer) lock(ctx context.Context, instance string) (func(), error) {
	v, _ := fenceLocks.LoadOrStore(StorageIdentity(f.s)+"\x00"+instance, new(sharedLock))
	sl := v.(*sharedLock)
	name := "authmail_fence_" + instance
	release := func() {
		sl.mu.Lock()
		defer sl.mu.Unlock()
		sl.n--
		if sl.n == 0 {
			_ = f.s.Unlock(context.Background(), name)
		}
	}
	for {
		sl.mu.Lock()
		if sl.n > 0 {
			sl.n++
			sl.mu.Unlock()
			return release, nil
		}
		if ch := sl.acquiring; ch != nil {
			sl.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		ch := make(chan struct{})
		sl.acquiring = ch
		sl.mu.Unlock()
		err := f.s.Lock(ctx, name)
		sl.mu.Lock()
		sl.acquiring = nil
		close(ch)
		if err == nil {
			sl.n++
		}
		sl.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return release, nil
	}
}

func (f lockFencer) epoch(ctx context.Context, instance string) (uint64, error) {
	b, err := f.s.Load(ctx, KeyFence+instance)
	if IsNotExist(err) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

func (f lockFencer) bump(ctx context.Context, instance string, ifHeartbeat []byte) (uint64, error) {
	unlock, err := f.lock(ctx, instance)
	if err != nil {
		return 0, err
	}
	defer unlock()
	if ifHeartbeat != nil {
		// the instance's own heartbeat write takes no lock: this narrows
		// the race with it, it does not close it
		hb, err := f.s.Load(ctx, KeyInst+instance)
		if err != nil || !bytes.Equal(hb, ifHeartbeat) {
			return 0, errFenced
		}
	}
	n, err := f.epoch(ctx, instance)
	if err != nil {
		return 0, err
	}
	n++
	return n, f.s.Store(ctx, KeyFence+instance, []byte(strconv.FormatUint(n, 10)))
}

func (f lockFencer) forget(ctx context.Context, instance string) error {
	err := f.s.Delete(ctx, KeyFence+instance)
	if IsNotExist(err) {
		return nil
	}
	return err
}

func (f lockFencer) apply(ctx context.Context, conds []fenceCond, deadline time.Time, ops []fenceOp) error {
	conds = slices.Clone(conds)
	slices.SortFunc(conds, func(a, b fenceCond) int { return strings.Compare(a.instance, b.instance) })
	for _, c := range conds {
		unlock, err := f.lock(ctx, c.instance)
		if err != nil {
			return err
		}
		defer unlock()
		cur, err := f.epoch(ctx, c.instance)
		if err != nil {
			return err
		}
		if cur != c.epoch {
			return errFenced
		}
	}
	for _, op := range ops {
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			return fmt.Errorf("%w (its deadline passed before it was written)", errFenced)
		}
		var err error
		if op.del {
			if err = f.s.Delete(ctx, op.key); IsNotExist(err) {
				err = nil
			}
		} else {
			err = f.s.Store(ctx, op.key, op.value)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
