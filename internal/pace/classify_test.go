package pace

import "testing"

// Every row is a reply a provider documents (or a well-known server
// sends), code, enhanced code and text as they arrive.
func TestClassify(t *testing.T) {
	cases := []struct {
		name     string
		code     int
		enhanced string
		text     string
		want     Kind
	}{
		// Amazon SES, "Errors related to the sending quotas for your Amazon SES account"
		{"ses rate", 454, "", "Throttling failure: Maximum sending rate exceeded", Rate},
		{"ses daily quota", 454, "", "Throttling failure: Daily message quota exceeded", Quota},
		// Microsoft 365, "Message storage and concurrent connection throttling for SMTP Authenticated Submission"
		{"m365 concurrent", 432, "4.3.2", "Concurrent connections limit exceeded.", Connections},
		{"m365 thread limit", 432, "4.3.2", "STOREDRV.ClientSubmit; sender thread limit exceeded", Connections},
		{"m365 daily recipients", 554, "5.2.0", "STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message Cannot submit message.", Quota},
		{"m365 tenant daily", 550, "5.7.232", "Your message can't be sent because your trial tenant has exceeded its daily limit for sending email to external recipients (tenant external recipient rate limit).", Quota},
		{"m365 server busy", 451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77719) [BN1NAM02FT012.eop-nam02.prod.protection.outlook.com]", Rate},
		{"exchange connector rate", 421, "4.4.2", "Message submission rate for this client has exceeded the configured limit", Rate},
		{"m365 mailbox full", 554, "5.2.2", "mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded", None},
		// Gmail / Google Workspace, "Gmail SMTP errors and codes"
		{"gmail server busy", 421, "4.4.5", "Server busy, try again later.", Rate},
		{"gmail unusual rate", 421, "4.7.0", "Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily blocked.", Rate},
		{"gmail 4.7.28", 421, "4.7.28", "[192.0.2.1 15] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited. Please visit https://support.google.com/mail/?p=UnsolicitedRateLimitError to review our Bulk Email Senders Guidelines. k10si2978071qtp.33 - gsmtp", Rate},
		{"gmail relay dos", 421, "4.7.0", "Try again later, closing connection.", Rate},
		{"gmail temporary problem", 421, "4.7.0", "Temporary System Problem. Try again later.", None},
		{"gmail tls required", 421, "4.7.0", "TLS required for RCPT domain, closing connection.", None},
		{"gmail ip whitelist", 421, "4.7.0", "IP not in whitelist for RCPT domain, closing connection.", None},
		{"gmail recipient too quickly", 450, "4.2.1", "The user you are trying to contact is receiving mail too quickly. Please resend your message at a later time.", Recipient},
		{"gmail recipient rate", 450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered. Please resend your message at a later time. If the user is able to receive mail at that time, your message will be delivered. For more information, please visit https://support.google.com/mail/?p=ReceivingRate aabb1122ccddeeff.547 - gsmtp", Recipient},
		{"gmail relay peak", 450, "4.2.1", "Peak SMTP relay limit exceeded for customer. This is a temporary error.", Rate},
		{"gmail daily user", 550, "5.4.5", "Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852 - gsmtp", Quota},
		{"gmail daily relay", 550, "5.4.5", "Daily SMTP relay limit exceeded for user. For more information on SMTP relay sending limits please contact your administrator.", Quota},
		{"gmail mailbox over quota", 452, "4.2.2", "The email account that you tried to reach is over quota.", None},
		{"gmail too many recipients per transaction", 452, "4.5.3", "Domain policy size per transaction exceeded, please try this recipient in a separate transaction.", None},
		{"gmail temporary auth", 454, "4.7.0", "Too many login attempts, please try again later.", None},
		// Postfix anvil and smtpd
		{"postfix connection count", 421, "4.7.0", "mx.example.com Error: too many connections from 192.0.2.1", Connections},
		{"postfix new tls", 421, "4.7.0", "mx.example.com Error: too many new TLS sessions from 192.0.2.1", Connections},
		{"postfix message rate", 450, "4.7.1", "Error: too much mail from 192.0.2.1", Rate},
		{"postfix recipient rate", 450, "4.7.1", "Error: too many recipients from 192.0.2.1", Rate},
		{"postfix recipient limit", 452, "4.5.3", "Error: too many recipients", None},
		{"postfix tls unavailable", 454, "4.7.0", "TLS not available due to local problem", None},
		{"postfix relay denied", 454, "4.7.1", "<a@example.com>: Relay access denied", None},
		// greylisting: one message comes back later, the rate is fine
		{"postgrey", 450, "4.2.0", "<a@example.com>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.com.html", None},
		{"rspamd greylist", 451, "4.7.1", "Try again later", None},
		{"sqlgrey", 451, "4.7.1", "Greylisting in action, please come back later", None},
		// relays and other providers
		{"generic throttled", 421, "4.7.0", "Throttled: too many messages, slow down", Rate},
		{"rate limited 451", 451, "4.7.1", "Account example rate limited, try again later", Rate},
		{"yahoo deferred", 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", Rate},
		{"ratelimit word", 450, "", "Ratelimit exceeded for sender", Rate},
		{"congestion code", 451, "4.4.5", "Insufficient system storage", Rate},
		// not replies about the rate
		{"go-smtp invalid credentials", 454, "4.7.0", "invalid credentials", None},
		{"shutdown", 421, "", "Service not available, closing transmission channel", None},
		{"mailbox busy", 450, "4.2.1", "Mailbox busy", None},
		{"accepted", 250, "2.0.0", "Ok: queued as ABC (throttling notice)", None},
		{"permanent rate text", 550, "5.7.1", "Rate limit exceeded, message rejected", None},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := Classify(c.code, c.enhanced, c.text); got != c.want {
				t.Fatalf("Classify(%d, %q, %q) = %v, want %v", c.code, c.enhanced, c.text, got, c.want)
			}
			if got := Throttling(c.code, c.enhanced, c.text); got != c.want.Slows() {
				t.Fatalf("Throttling = %v, want %v", got, c.want.Slows())
			}
		})
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[Kind]string{None: "none", Rate: "rate", Connections: "connections", Quota: "quota", Recipient: "recipient"} {
		if k.String() != want {
			t.Errorf("%d.String() = %q, want %q", int(k), k.String(), want)
		}
	}
}
