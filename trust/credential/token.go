package credential

import (
	"errors"
	"strings"
)

// tokenPrefix versions the token format.
const tokenPrefix = "mf1"

// Token is a one-time join token: an id the hub looks the token up by, a
// secret it checks against a stored hash, and the pin (hex SHA-256 of the
// public key) of the hub's CA, so the spoke can trust the hub before it
// has any certificate.
type Token struct {
	ID, Secret, CAPin string
}

// String renders the token as mf1.<id>.<secret>.<pin>.
func (t Token) String() string {
	return strings.Join([]string{tokenPrefix, t.ID, t.Secret, t.CAPin}, ".")
}

// ParseToken parses a token string; it never echoes the secret in errors.
func ParseToken(s string) (Token, error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) != 4 || parts[0] != tokenPrefix || parts[1] == "" || parts[2] == "" || len(parts[3]) != 64 {
		return Token{}, errors.New("token is malformed: want mf1.<id>.<secret>.<ca-pin>, as `meshfed site token create` (for a spoke) or `meshfed vm token create` (for a node) prints it")
	}
	return Token{ID: parts[1], Secret: parts[2], CAPin: parts[3]}, nil
}

// RemovedHost starts the refusal a spoke gives the SVID of a host removed
// from its site (meshfed vm remove): retrying cannot help, so the host's
// agent stops on it.
const RemovedHost = "removed host"
