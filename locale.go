package authmail

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/text/language"
)

// defaultLocale is the locale of the templates without a locale in their
// file name, and the last fallback of every resolution.
const defaultLocale = "en"

// maxLocaleLength bounds a locale tag; RFC 5646 (4.4.1) asks for 35
// characters to be supported, extensions make some tags longer.
const maxLocaleLength = 64

// parseLocale checks the syntax of a BCP 47 language tag and returns its
// canonical form ("de-at" → "de-AT", "iw" → "he"). A well-formed tag
// with subtags the registry does not know is not an error: they are
// dropped ("xx" → "und", "de-XX" → "de"), and the locale falls back like
// any locale without templates. strict refuses such tags, for config.
func parseLocale(s string, strict bool) (string, error) {
	if s == "" {
		return "", fmt.Errorf("is empty")
	}
	if len(s) > maxLocaleLength {
		return "", fmt.Errorf("is longer than %d characters", maxLocaleLength)
	}
	// x/text accepts "_" as a separator; BCP 47 does not, and a POSIX
	// locale such as ko_KR.UTF-8 would otherwise half-parse
	if strings.ContainsRune(s, '_') {
		return "", fmt.Errorf("must be a BCP 47 language tag such as ko or de-AT (subtags are separated by '-', not '_')")
	}
	tag, err := language.Parse(s)
	if err != nil {
		if _, unknown := err.(language.ValueError); !unknown || strict {
			if unknown {
				return "", fmt.Errorf("'%s' is not a known language tag (%v)", s, err)
			}
			return "", fmt.Errorf("must be a BCP 47 language tag such as ko or de-AT")
		}
	}
	return tag.String(), nil
}

// checkLocale validates a request's locale field; "" means none given.
func checkLocale(s string) (string, *apiError) {
	if s == "" {
		return "", nil
	}
	loc, err := parseLocale(s, false)
	if err != nil {
		return "", invalid("locale", "%s", err)
	}
	return loc, nil
}

// localeParents returns a canonical tag and its less specific forms,
// most specific first: "de-AT" → de-AT, de; "zh-Hant-TW" → zh-Hant-TW,
// zh-Hant, zh; "en-US-u-co-phonebk" → en-US-u-co-phonebk, en-US, en.
// "und" and private-use tags have none.
func localeParents(loc string) []string {
	tag, err := language.Parse(loc)
	if err != nil {
		return nil
	}
	base, script, region := tag.Raw()
	if base.String() == "und" {
		return nil
	}
	var out []string
	add := func(s string) {
		if len(out) == 0 || out[len(out)-1] != s {
			out = append(out, s)
		}
	}
	add(tag.String())
	b := base.String()
	bs := b
	if script != (language.Script{}) {
		bs += "-" + script.String()
	}
	if region != (language.Region{}) {
		add(bs + "-" + region.String())
	}
	add(bs)
	add(b)
	return out
}

// localeChain is the order in which a requested locale is looked up:
// the tag and its parents, then the configured default and its parents,
// then en. Duplicates are dropped.
func localeChain(tag, def string) []string {
	var out []string
	for _, l := range append(append(localeParents(tag), localeParents(def)...), defaultLocale) {
		if !containsString(out, l) {
			out = append(out, l)
		}
	}
	return out
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// localeText holds the phrases that the handler puts into templateData
// rather than the templates: validity periods, dates and security event
// titles. Locales without an entry use en's.
type localeText struct {
	minutes func(int) string
	date    func(time.Time) string
	events  map[string]string
}

var localeTexts = map[string]*localeText{
	"en": {minutes: humanMinutes, date: func(t time.Time) string { return t.UTC().Format("2 January 2006, 15:04 UTC") }},
	"ko": {
		minutes: koreanMinutes,
		date:    koreanDate,
		events: map[string]string{
			"password_changed":    "비밀번호가 변경되었습니다",
			"two_factor_enabled":  "2단계 인증이 설정되었습니다",
			"two_factor_disabled": "2단계 인증이 해제되었습니다",
			"account_locked":      "계정이 잠겼습니다",
			"new_login":           "새로운 로그인이 감지되었습니다",
		},
	},
}

// textFor returns the phrases of a locale: its own, its parents', or en's.
func textFor(loc string) *localeText {
	for _, l := range localeParents(loc) {
		if t := localeTexts[l]; t != nil {
			return t
		}
	}
	return localeTexts[defaultLocale]
}

// eventTitle is the title of a security event in a locale.
func (t *localeText) eventTitle(ev string) string {
	if s := t.events[ev]; s != "" {
		return s
	}
	return securityEvents[ev].title
}

// koreanMinutes renders a validity period as "10분", "1시간", "24시간",
// "3일", with the same units as humanMinutes.
func koreanMinutes(m int) string {
	switch {
	case m >= 2880 && m%1440 == 0:
		return strconv.Itoa(m/1440) + "일"
	case m >= 60 && m%60 == 0:
		return strconv.Itoa(m/60) + "시간"
	default:
		return strconv.Itoa(m) + "분"
	}
}

// koreanDate renders a UTC time as Korean dates read: "2026년 12월 3일
// 오후 3:04 (UTC)", with a 12-hour clock (0:30 is 오전 12:30).
func koreanDate(t time.Time) string {
	t = t.UTC()
	ampm, h := "오전", t.Hour()
	if h >= 12 {
		ampm = "오후"
	}
	if h %= 12; h == 0 {
		h = 12
	}
	return fmt.Sprintf("%d년 %d월 %d일 %s %d:%02d (UTC)", t.Year(), int(t.Month()), t.Day(), ampm, h, t.Minute())
}

// localize fills the locale-dependent fields of d for loc: the validity
// period from ExpiresInMinutes, an empty event title from Event, and the
// date from the time the alert gave. Fields without their source are
// left as the caller set them.
func localize(d *templateData, loc string) {
	t := textFor(loc)
	d.Locale = loc
	if d.ExpiresInMinutes > 0 {
		d.ExpiresIn = t.minutes(d.ExpiresInMinutes)
	}
	if _, known := securityEvents[d.Event]; known && d.EventTitle == "" {
		d.EventTitle = t.eventTitle(d.Event)
	}
	if !d.occurredAt.IsZero() {
		d.OccurredAt = t.date(d.occurredAt)
	}
}

// renderFlow renders a flow's templates for a recipient in the locale
// resolved for the requested tag (canonical, or "" for none): the tag,
// its parents, the configured default locale, en. It returns the locale
// used. This is the one render path of the templated flows.
func (h *Handler) renderFlow(flow, tag string, d *templateData) (rendered, string, error) {
	return h.tmpl.renderIn(flow, tag, firstNonEmpty(h.locale, defaultLocale), d)
}

// withLocale adds the locale of the first message to an answer that
// accepted it, so that the caller learns which language was sent (a
// fallback included).
func withLocale(resp apiResponse, msgs []*outMessage) apiResponse {
	if resp.created && len(msgs) > 0 && msgs[0].locale != "" {
		resp.body = withJSONField(resp.body, "locale", strconv.Quote(msgs[0].locale))
	}
	return resp
}

// checkConfigLocale validates the configured default locale. Unlike a
// request's, it must be a known tag: a misspelt default would silently
// send every message in English.
func checkConfigLocale(loc string) error {
	if loc == "" {
		return nil
	}
	l, err := parseLocale(loc, true)
	if err == nil && localeParents(l) == nil {
		err = fmt.Errorf("must name a language, such as ko or de-AT")
	}
	if err != nil {
		return fmt.Errorf("locale %v", err)
	}
	return nil
}

// provisionLocale resolves the default locale and warns when no
// template is in its language: the messages then fall back to en.
func (h *Handler) provisionLocale() error {
	h.locale = defaultLocale
	if l := h.defaultLocaleCompat(); l != "" {
		h.locale = l // the relay's wording, unless the config names a locale
	}
	if h.Locale != "" {
		l, err := parseLocale(h.Locale, true)
		if err != nil {
			return fmt.Errorf("locale %v", err)
		}
		h.locale = l
	}
	if !h.tmpl.hasLocale(h.locale) {
		h.logger.Warn("no template is in the configured locale; messages without a locale of their own fall back to en",
			zap.String("locale", h.locale))
	}
	return nil
}
