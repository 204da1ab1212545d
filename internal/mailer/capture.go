package mailer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// Capture writes each message to a directory as an .eml file
// instead of sending it. It is meant for development: no SMTP server is
// needed, and every message can be opened in a mail client.
type Capture struct {
	Dir string
}

// captureTrace is what a capture file holds before the message: its
// envelope, written as a local delivery agent writes it into a mailbox
// (Postfix's local, Dovecot's LDA), so that mail tools read it as
// ordinary trace headers: "Return-Path: <sender>" (RFC 5321 section
// 4.4) and one "Delivered-To: <recipient>" per envelope recipient, Bcc
// included. Only capture files get them; sent mail never does (the Bcc
// recipients would show).
func captureTrace(env *Envelope) []byte {
	b := make([]byte, 0, 64+32*len(env.To))
	b = append(b, "Return-Path: <"+env.From+">\r\n"...)
	for _, to := range env.To {
		b = append(b, "Delivered-To: "+to+"\r\n"...)
	}
	return b
}

// Send writes env.Data atomically (temporary file, then rename), so a
// watcher never sees a partial file. Files are readable by the owner only:
// they contain codes and links.
func (c *Capture) Send(_ context.Context, env *Envelope) (Result, error) {
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return Result{}, &Error{Code: CodeCaptureFailed, Phase: PhaseConnect, Err: err}
	}
	name := fmt.Sprintf("%s-%s.eml", time.Now().UTC().Format("20060102-150405.000"), env.ID)
	tmp, err := os.CreateTemp(c.Dir, ".authmail-*.tmp")
	if err != nil {
		return Result{}, &Error{Code: CodeCaptureFailed, Phase: PhaseConnect, Err: err}
	}
	fail := func(err error) (Result, error) {
		_ = tmp.Close()
		_ = os.Remove(tmp.Name())
		return Result{}, &Error{Code: CodeCaptureFailed, Phase: PhaseBody, Err: err}
	}
	if _, err := tmp.Write(captureTrace(env)); err != nil {
		return fail(err)
	}
	if _, err := tmp.Write(env.Data); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		return fail(err)
	}
	// the rename is the capture's final dot (see envelope.BeforeDot)
	if env.BeforeDot != nil {
		if err := env.BeforeDot(); err != nil {
			_ = os.Remove(tmp.Name())
			return Result{}, &Error{Code: CodeOutboxUnavailable, Phase: PhaseBody, Err: err}
		}
	}
	if err := os.Rename(tmp.Name(), filepath.Join(c.Dir, name)); err != nil {
		_ = os.Remove(tmp.Name())
		return Result{}, &Error{Code: CodeCaptureFailed, Phase: PhaseEnd, Err: err}
	}
	return Result{Status: "captured"}, nil
}
