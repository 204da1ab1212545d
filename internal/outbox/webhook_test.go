package outbox

import (
	"net/netip"
	"testing"
)

// TestBlockedIP: every entry of the block list refuses its first and last
// address; the ranges that embed an IPv4 address refuse exactly when the
// embedded address is refused; global unicast passes.
func TestBlockedIP(t *testing.T) {
	last := func(p netip.Prefix) netip.Addr {
		b := p.Addr().As16()
		bits, total := p.Bits(), 128
		if p.Addr().Is4() {
			bits += 96
		}
		for i := bits; i < total; i++ {
			b[i/8] |= 1 << (7 - i%8)
		}
		a := netip.AddrFrom16(b)
		if p.Addr().Is4() {
			a = a.Unmap()
		}
		return a
	}
	for _, r := range reservedRanges {
		if !r.refuse {
			continue
		}
		for _, a := range []netip.Addr{r.prefix.Addr(), last(r.prefix)} {
			if !BlockedIP(a) {
				t.Errorf("%s (%s, in %s) is not blocked", a, r.name, r.prefix)
			}
		}
	}
	for s, want := range map[string]bool{
		// the reported holes
		"::7f00:1": true, "::a00:1": true, "64:ff9b:1::7f00:1": true, "2002:7f00:1::1": true,
		"192.0.2.1": true, "198.51.100.7": true, "203.0.113.255": true,
		// IPv4-mapped: the embedded address decides
		"::ffff:10.0.0.1": true, "::ffff:127.0.0.1": true, "::ffff:8.8.8.8": false,
		// IPv4-compatible: refused whole
		"::808:808": true,
		// NAT64 well-known prefix: the embedded address decides
		"64:ff9b::808:808": false, "64:ff9b::7f00:1": true, "64:ff9b::a9fe:a9fe": true, "64:ff9b::c000:201": true,
		// local-use NAT64: refused whole
		"64:ff9b:1::808:808": true, "64:ff9b:1:ffff::808:808": true,
		// 6to4: the router's address decides
		"2002:808:808::1": false, "2002:c0a8:101::1": true, "2002:a9fe:a9fe:1::1": true, "2002:c633:6401::1": true,
		// Teredo: server 65.54.227.120 with client 8.8.8.8 (inverted
		// f7f7:f7f7) passes; a private client or server is refused
		"2001:0:4136:e378:8000:63bf:f7f7:f7f7": false, "2001:0:4136:e378:8000:63bf:f5ff:fffe": true,
		"2001:0:4136:e378:8000:63bf:80ff:fffe": true, "2001:0:a00:1:8000:63bf:f7f7:f7f7": true,
		// the rest of 2001::/23 and anycast services
		"2001:1::1": true, "2001:4:112::1": true, "192.0.0.9": true, "192.31.196.1": true,
		// classic ranges
		"127.0.0.1": true, "10.1.2.3": true, "172.16.0.1": true, "192.168.1.1": true, "169.254.169.254": true,
		"::1": true, "::": true, "fe80::1": true, "fe80::1%eth0": true, "fd00:ec2::254": true, "fec0::1": true,
		"0.0.0.0": true, "100.64.1.1": true, "224.0.0.1": true, "239.255.255.250": true, "255.255.255.255": true,
		"ff02::1": true, "4000::1": true, "3fff::1": true, "5f00::1": true,
		// global unicast
		"8.8.8.8": false, "1.1.1.1": false, "93.184.216.34": false, "192.0.1.1": false, "198.20.0.1": false,
		"2606:4700::1111": false, "2a00:1450:4001:81c::200e": false, "2001:200::1": false, "3ffe::1": false,
	} {
		if got := BlockedIP(netip.MustParseAddr(s)); got != want {
			t.Errorf("BlockedIP(%s) = %v, want %v", s, got, want)
		}
	}
	if !BlockedIP(netip.Addr{}) {
		t.Error("the zero address is not blocked")
	}
}

// TestHookHost: webhooks are limited per host and port, whatever the
// case, path, query or fragment.
func TestHookHost(t *testing.T) {
	for u, want := range map[string]string{
		"https://Hooks.Example.COM/a/b?c=d": "hooks.example.com",
		"http://127.0.0.1:8080?x":           "127.0.0.1:8080",
		"http://[::1]:80/#f":                "[::1]:80",
		"https://example.com":               "example.com",
	} {
		if got := hookHost(u); got != want {
			t.Errorf("hookHost(%s) = %q, want %q", u, got, want)
		}
	}
}
