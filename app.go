package authmail

import "github.com/caddyserver/caddy/v2"

func init() {
	caddy.RegisterModule(App{})
}

// App is the authmail app. It needs no configuration: authmail handlers
// load it, and it starts their outbox engines when a config actually
// starts running, so that `caddy validate` and failed reloads never start
// a delivery worker.
//
// Engines are added while the config is provisioned and started after, by
// the same goroutine, so no locking is needed.
type App struct {
	shared []*shared
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "authmail",
		New: func() caddy.Module { return new(App) },
	}
}

func (a *App) add(s *shared) { a.shared = append(a.shared, s) }

// Start starts the engines of this config. Engines shared with the
// previous config are already running; starting is idempotent.
func (a *App) Start() error {
	for _, e := range a.shared {
		e.Start()
	}
	return nil
}

// Stop does nothing: engines stop when the last config that uses them is
// cleaned up, after deliveries in flight finish.
func (a *App) Stop() error { return nil }

// Interface guards
var _ caddy.App = (*App)(nil)
