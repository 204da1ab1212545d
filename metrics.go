package authmail

import (
	"errors"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-authmail/authmail/internal/mailer"
)

// Metrics are created once per process, so their values survive config
// reloads, and registered with each new config's registry in Provision.
// Labels are low-cardinality: no addresses, IPs or ids.
var (
	metricsOnce sync.Once
	collectors  []prometheus.Collector

	mAccepted *prometheus.CounterVec
	mFinal    *prometheus.CounterVec
	mAttempts *prometheus.CounterVec
	mSMTPTime *prometheus.HistogramVec
	mWebhooks *prometheus.CounterVec
	mRejected *prometheus.CounterVec
)

func initMetrics() {
	metricsOnce.Do(func() {
		const ns, sub = "caddy", "authmail"
		mAccepted = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "messages_accepted_total", Help: "Messages written to the outbox, by flow and API key id."}, []string{"flow", "key_id"})
		mFinal = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "messages_total", Help: "Messages that reached a final state, by flow and outcome (sent, failed, unknown)."}, []string{"flow", "outcome"})
		mAttempts = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "delivery_attempts_total", Help: "Delivery attempts by result (sent, transient, permanent, uncertain)."}, []string{"result"})
		mSMTPTime = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub,
			Name: "smtp_duration_seconds", Help: "Duration of delivery attempts, connection included, by result.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}, []string{"result"})
		mWebhooks = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "webhooks_total", Help: "Webhook deliveries by result (delivered, retry, failed)."}, []string{"result"})
		mRejected = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub,
			Name: "requests_rejected_total", Help: "API requests answered with an error before a message was created, by error code."}, []string{"error_code"})
		queue := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
			Name: "queue_depth", Help: "Messages in the outbox that have not reached a final state."},
			func() float64 { n, _ := outboxTotals(); return float64(n) })
		oldest := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
			Name: "queue_oldest_age_seconds", Help: "Age of the oldest message waiting for delivery."},
			func() float64 { _, age := outboxTotals(); return age.Seconds() })
		conns := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub,
			Name: "smtp_connections", Help: "Open SMTP connections."},
			func() float64 {
				var n int64
				smtpPool.Range(func(_, v any) bool { n += v.(*mailer.Sender).OpenConnections(); return true })
				return float64(n)
			})
		collectors = []prometheus.Collector{mAccepted, mFinal, mAttempts, mSMTPTime, mWebhooks, mRejected, queue, oldest, conns, rateCollector{}}
		collectors = append(collectors, mailer.FailoverCollectors()...)
	})
}

// registerMetrics registers the collectors with a config's registry;
// several handlers register the same collectors, which is fine.
func registerMetrics(reg prometheus.Registerer) error {
	initMetrics()
	if reg == nil {
		return nil
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

func outboxTotals() (int, time.Duration) {
	total, oldest := 0, time.Duration(0)
	sharedPool.Range(func(_, v any) bool {
		n, age := v.(*shared).engine.QueueStats()
		total += n
		oldest = max(oldest, age)
		return true
	})
	return total, oldest
}

// metricsObserver counts what the outbox engine does in the Prometheus
// metrics.
type metricsObserver struct{}

func (metricsObserver) Accepted(flow, keyID string) { metricAccepted(flow, keyID) }
func (metricsObserver) Attempt(derr *mailer.Error, took time.Duration) {
	metricAttempt(derr, took)
}
func (metricsObserver) Final(flow, status string) { metricFinal(flow, status) }
func (metricsObserver) Webhook(result string)     { metricWebhook(result) }

func metricAccepted(flow, keyID string) { initMetrics(); mAccepted.WithLabelValues(flow, keyID).Inc() }

func metricFinal(flow, status string) { initMetrics(); mFinal.WithLabelValues(flow, status).Inc() }

func metricAttempt(derr *mailer.Error, d time.Duration) {
	initMetrics()
	result := "sent"
	switch {
	case derr == nil:
	case derr.Uncertain():
		result = "uncertain"
	case derr.Permanent():
		result = "permanent"
	default:
		result = "transient"
	}
	mAttempts.WithLabelValues(result).Inc()
	mSMTPTime.WithLabelValues(result).Observe(d.Seconds())
}

func metricWebhook(result string) { initMetrics(); mWebhooks.WithLabelValues(result).Inc() }

func metricRejected(code string) { initMetrics(); mRejected.WithLabelValues(code).Inc() }

// Per-server sending rate, read from each live SMTP sender's pacer when
// scraped, labelled host:port.
var (
	descRateConfigured = prometheus.NewDesc("caddy_authmail_smtp_rate_configured",
		"The SMTP server's configured send rate (smtp rate) in messages per second; 0 without a cap.", []string{"server"}, nil)
	descRateCurrent = prometheus.NewDesc("caddy_authmail_smtp_rate_current",
		"The SMTP server's current send rate in messages per second, lowered by throttling replies; 0 means unlimited.", []string{"server"}, nil)
	descThrottles = prometheus.NewDesc("caddy_authmail_smtp_throttles_total",
		"Replies of the SMTP server that meant slow down (rate, connections or quota).", []string{"server"}, nil)
)

type rateCollector struct{}

func (rateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descRateConfigured
	ch <- descRateCurrent
	ch <- descThrottles
}

func (rateCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	seen := map[string]bool{}
	smtpPool.Range(func(_, v any) bool {
		s := v.(*mailer.Sender)
		label := net.JoinHostPort(s.Settings().Host, strconv.Itoa(s.Settings().Port))
		if seen[label] {
			return true // two accounts on one server: the first one
		}
		seen[label] = true
		snap := s.Pacer().Snapshot(now)
		ch <- prometheus.MustNewConstMetric(descRateConfigured, prometheus.GaugeValue, snap.Configured, label)
		ch <- prometheus.MustNewConstMetric(descRateCurrent, prometheus.GaugeValue, snap.Current, label)
		ch <- prometheus.MustNewConstMetric(descThrottles, prometheus.CounterValue, float64(snap.Throttles), label)
		return true
	})
}
