// Package gateway will hold the east-west gateway (`meshfed gateway`): TLS
// passthrough by SNI to local endpoints of exported services, fed over xDS
// by its spoke, never an open relay. It is not built yet; see the README's
// "What works today".
package gateway
