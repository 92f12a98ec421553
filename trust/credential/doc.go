// Package credential holds what a component carries to prove who it is
// before and after it joins: the one-time join token (its format, with the
// pin of the hub's CA) and the credential file a spoke or the CLI keeps
// for the hub. The hub mints and checks tokens and writes the admin's
// file; spokes and agents parse tokens and keep their own file. Dialing
// with them lives in hubclient and identityclient.
package credential
