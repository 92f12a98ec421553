package store

import "go.uber.org/zap"

// nopZap keeps the etcd client's own logger quiet: meshfed reports store
// errors itself, through slog, with context.
func nopZap() *zap.Logger { return zap.NewNop() }
