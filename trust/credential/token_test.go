package credential_test

import (
	"strings"
	"testing"

	"github.com/meshfed/meshfed/trust/credential"
)

func TestToken_roundTrip(t *testing.T) {
	tok := credential.Token{ID: "abc123", Secret: "s3cr3ts3cr3ts3cr", CAPin: strings.Repeat("ab", 32)}
	got, err := credential.ParseToken(tok.String())
	if err != nil || got != tok {
		t.Fatalf("ParseToken(%s) = %v, %v", tok, got, err)
	}
}

// FuzzParseToken: a token from the command line never panics the parser,
// and an error never echoes the secret.
func FuzzParseToken(f *testing.F) {
	f.Add("mf1.abc123.s3cr3ts3cr3ts3cr." + strings.Repeat("ab", 32))
	f.Add("mf1...")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := credential.ParseToken(s)
		if err != nil {
			parts := strings.Split(s, ".")
			if len(parts) > 2 && len(parts[2]) >= 8 && strings.Contains(err.Error(), parts[2]) {
				t.Fatalf("error %q echoes the secret", err)
			}
			return
		}
		if back, err := credential.ParseToken(tok.String()); err != nil || back != tok {
			t.Fatalf("round trip of %q: %v, %v", s, back, err)
		}
	})
}
