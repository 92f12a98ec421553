package federation

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
)

// Stream is one Sync stream, client or server side.
type Stream interface {
	Send(*meshfedv1.SyncMessage) error
	Recv() (*meshfedv1.SyncMessage, error)
}

// Sink receives the peer's deltas.
type Sink interface {
	// Apply applies a delta durably before it returns. An error wrapping
	// ErrRejected NACKs the delta (nothing applied); any other error ends the
	// session, and the peer resumes on its next stream.
	Apply(ctx context.Context, d *meshfedv1.Delta) error
}

// ErrRejected marks a delta the receiver refuses, for example one that
// writes another site's services. The sender does not resend the refused
// versions; a later version of the same key is sent again.
var ErrRejected = errors.New("delta rejected")

// DefaultMaxBatch is how many resources one delta carries at most: it keeps
// messages well under gRPC's 4 MiB default and every stored batch under
// etcd's 128 operations per transaction.
const DefaultMaxBatch = 100

// Session runs both directions of one Sync stream after the Hellos were
// exchanged.
type Session struct {
	Stream Stream
	// Out is what this side publishes; Filter picks the keys of it the peer
	// gets (nil: all).
	Out    *Table
	Filter func(key string) bool
	// PeerKnown are the versions the peer said it holds of Out.
	PeerKnown map[string]string
	In        Sink
	MaxBatch  int
	Logger    *slog.Logger

	// OnSent is called after the peer ACKed a delta of n resources, the
	// oldest of which changed at oldest. OnNack after a NACK, OnReceived
	// after this side applied a delta (synced: the peer is caught up).
	OnSent     func(n int, oldest time.Time)
	OnNack     func(err string)
	OnReceived func(d *meshfedv1.Delta)

	sendMu sync.Mutex
	acks   chan *meshfedv1.Ack
}

// Run runs the session until ctx ends or the stream breaks.
func (s *Session) Run(ctx context.Context) error {
	if s.MaxBatch <= 0 {
		s.MaxBatch = DefaultMaxBatch
	}
	if s.Filter == nil {
		s.Filter = func(string) bool { return true }
	}
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	s.acks = make(chan *meshfedv1.Ack, 1)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() { cancel(s.receive(ctx)) }()
	err := s.send(ctx)
	cancel(err)
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	return err
}

func (s *Session) write(m *meshfedv1.SyncMessage) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return s.Stream.Send(m)
}

func (s *Session) receive(ctx context.Context) error {
	for {
		m, err := s.Stream.Recv()
		if err != nil {
			return fmt.Errorf("federation: receive: %w", err)
		}
		switch k := m.GetKind().(type) {
		case *meshfedv1.SyncMessage_Delta:
			ack := &meshfedv1.Ack{Nonce: k.Delta.GetNonce()}
			if err := s.In.Apply(ctx, k.Delta); err != nil {
				if !errors.Is(err, ErrRejected) {
					return fmt.Errorf("federation: apply delta: %w", err)
				}
				ack.Error = err.Error()
				s.Logger.Warn("rejected a delta", "nonce", ack.Nonce, "err", err)
			} else if s.OnReceived != nil {
				s.OnReceived(k.Delta)
			}
			if err := s.write(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Ack{Ack: ack}}); err != nil {
				return fmt.Errorf("federation: send ack: %w", err)
			}
		case *meshfedv1.SyncMessage_Ack:
			select {
			case s.acks <- k.Ack:
			default:
				return errors.New("federation: protocol error: an ACK for no delta in flight")
			}
		default:
			return fmt.Errorf("federation: protocol error: unexpected %T after hello", k)
		}
	}
}

// send pushes Out's changes to the peer, one delta in flight at a time.
func (s *Session) send(ctx context.Context) error {
	acked := make(map[string]string, len(s.PeerKnown))
	rejected := map[string]string{}
	sub := s.Out.Subscribe(s.Filter)
	defer sub.Close()
	for k, v := range s.PeerKnown {
		if s.Filter(k) {
			acked[k] = v
			sub.Mark(k)
		}
	}
	// peerSynced is what the last delta told the peer; a delta that turns it
	// to true is sent even when empty, so the peer learns it caught up.
	peerSynced := false
	for seq := 1; ; {
		keys, left := sub.Take(s.MaxBatch)
		if len(keys) == 0 && peerSynced {
			select {
			case <-ctx.Done():
				return nil
			case <-sub.C():
				continue
			}
		}
		d := &meshfedv1.Delta{Synced: left == 0}
		var oldest time.Time
		for _, k := range keys {
			r, ok := s.Out.Get(k)
			switch {
			case ok && acked[k] != r.Version && rejected[k] != r.Version:
				d.Updated = append(d.Updated, r)
				if c := sub.changedAt(k); oldest.IsZero() || c.Before(oldest) {
					oldest = c
				}
			case !ok && acked[k] != "":
				d.Removed = append(d.Removed, k)
			}
		}
		if len(d.Updated)+len(d.Removed) == 0 && (peerSynced || !d.Synced) {
			continue
		}
		peerSynced = d.Synced
		d.Nonce = strconv.Itoa(seq)
		seq++
		if err := s.write(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Delta{Delta: d}}); err != nil {
			return fmt.Errorf("federation: send delta: %w", err)
		}
		var ack *meshfedv1.Ack
		select {
		case <-ctx.Done():
			return nil
		case ack = <-s.acks:
		}
		if ack.GetNonce() != d.Nonce {
			return fmt.Errorf("federation: protocol error: ACK for nonce %q, want %q", ack.GetNonce(), d.Nonce)
		}
		if ack.GetError() != "" {
			for _, r := range d.Updated {
				rejected[r.Key] = r.Version
			}
			s.Logger.Warn("peer rejected a delta", "nonce", d.Nonce, "resources", len(d.Updated)+len(d.Removed), "err", ack.GetError())
			if s.OnNack != nil {
				s.OnNack(ack.GetError())
			}
			continue
		}
		for _, r := range d.Updated {
			acked[r.Key] = r.Version
			delete(rejected, r.Key)
		}
		for _, k := range d.Removed {
			delete(acked, k)
		}
		if s.OnSent != nil {
			s.OnSent(len(d.Updated)+len(d.Removed), oldest)
		}
	}
}
