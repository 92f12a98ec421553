package hub

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/gossip"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// maxGossipKeys bounds the keyring: a rotation drops the oldest beyond it.
const maxGossipKeys = 3

// ensureGossipKeyring makes the WAN gossip key on first start.
func (h *Hub) ensureGossipKeyring(ctx context.Context) error {
	if _, ok := h.table.Get(federation.GossipKeyringKey); ok {
		return nil
	}
	key, err := newGossipKey()
	if err != nil {
		return err
	}
	if err := h.publish(ctx, "", federation.GossipKeyringResource(&meshfedv1.GossipKeyring{Keys: [][]byte{key}})); err != nil {
		return fmt.Errorf("hub: store the gossip keyring: %w", err)
	}
	h.log.Info("created the WAN gossip key")
	return nil
}

func newGossipKey() ([]byte, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	return key, nil
}

// RotateGossipKey adds a new key to the keyring; every member installs it
// at once and encrypts with it after the delay.
func (s *adminServer) RotateGossipKey(ctx context.Context, req *meshfedv1.RotateGossipKeyRequest) (*meshfedv1.RotateGossipKeyResponse, error) {
	h := s.h
	delay := req.GetDelay().AsDuration()
	if delay <= 0 {
		delay = 30 * time.Second
	}
	r, ok := h.table.Get(federation.GossipKeyringKey)
	if !ok {
		return nil, status.Error(codes.FailedPrecondition, "the hub has no gossip keyring yet")
	}
	key, err := newGossipKey()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	keys := append(r.GetGossipKeyring().GetKeys(), key)
	if len(keys) > maxGossipKeys {
		keys = keys[len(keys)-maxGossipKeys:]
	}
	k := &meshfedv1.GossipKeyring{Keys: keys, UseNewestAfter: timestamppb.New(time.Now().Add(delay))}
	if err := h.publish(ctx, "", federation.GossipKeyringResource(k)); err != nil {
		return nil, status.Errorf(codes.Unavailable, "store: %v", err)
	}
	h.log.Info("WAN gossip key rotated", "keys", len(keys), "encrypts_after", k.UseNewestAfter.AsTime())
	return &meshfedv1.RotateGossipKeyResponse{Keys: uint32(len(keys)), UseNewestAfter: k.UseNewestAfter}, nil
}

// runGossip keeps the hub in the WAN pool, as an observer: `site list`
// shows each site as the pool sees it.
func (h *Hub) runGossip(ctx context.Context) error {
	r, _ := h.table.Get(federation.GossipKeyringKey)
	pool, err := gossip.New(gossip.Options{
		Name: "hub", Role: gossip.RoleHub, Bind: h.o.GossipListen, Advertise: h.o.GossipAdvertise, ProbeInterval: h.o.GossipProbeInterval,
		Keys: federation.KeyringFromWire(r.GetGossipKeyring()), Logger: h.log,
	})
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.pool = pool
	h.mu.Unlock()
	return federation.RunGossip(ctx, pool, h.table, "", h.log)
}
