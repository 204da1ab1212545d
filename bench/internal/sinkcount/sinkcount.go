// Package sinkcount reads the running counters that postfix's smtp-sink
// prints with -c ("sess=N quit=N mesg=N\r" after every session end, QUIT
// and final dot) from the file its standard output is redirected to.
package sinkcount

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"
)

// Read returns the number of messages smtp-sink has received so far,
// according to the last complete counter record in path. A missing or
// empty file counts as zero.
func Read(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, nil
		}
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	const tail = 256
	off := max(fi.Size()-tail, 0)
	buf := make([]byte, fi.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil && err != io.EOF {
		return 0, err
	}
	return parse(buf)
}

// parse finds the last complete record (every record ends in '\r') and
// returns its mesg counter.
func parse(buf []byte) (int, error) {
	end := bytes.LastIndexByte(buf, '\r')
	if end < 0 {
		return 0, nil
	}
	rec := buf[:end]
	if start := bytes.LastIndexByte(rec, '\r'); start >= 0 {
		rec = rec[start+1:]
	}
	i := bytes.LastIndex(rec, []byte("mesg="))
	if i < 0 {
		return 0, fmt.Errorf("sinkcount: no mesg= counter in %q", rec)
	}
	digits := rec[i+len("mesg="):]
	j := 0
	for j < len(digits) && digits[j] >= '0' && digits[j] <= '9' {
		j++
	}
	return strconv.Atoi(string(digits[:j]))
}

// WaitFor polls path until the message counter reaches target or the
// timeout passes. It returns the time at which the target was seen (or
// the last poll) and the last counter value.
func WaitFor(path string, target int, timeout time.Duration) (time.Time, int, error) {
	deadline := time.Now().Add(timeout)
	for {
		n, err := Read(path)
		now := time.Now()
		if err != nil {
			return now, n, err
		}
		if n >= target {
			return now, n, nil
		}
		if now.After(deadline) {
			return now, n, fmt.Errorf("sinkcount: smtp-sink received %d of %d messages within %s", n, target, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
