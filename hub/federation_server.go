package hub

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

type federationServer struct {
	meshfedv1.UnimplementedFederationServer
	h *Hub
}

// Join redeems a one-time token: the token must exist, match its secret,
// be unexpired, unused and for the site asked; it is burnt in the same
// atomic update that checks it, so two spokes cannot both redeem it.
func (s *federationServer) Join(ctx context.Context, req *meshfedv1.JoinRequest) (*meshfedv1.JoinResponse, error) {
	h := s.h
	if err := catalog.ValidateName("site name", req.GetSite()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	_, tok, err := h.redeem(ctx, req.GetToken(), req.GetSite(), false)
	if err != nil {
		return nil, err
	}
	if !h.siteExists(req.GetSite()) {
		return nil, status.Errorf(codes.NotFound, "site %s was removed after its token was made: add it again with `meshfed site add`", req.GetSite())
	}
	h.log.Info("spoke joined", "site", req.GetSite(), "token_id", tok.ID)
	return s.issue(req.GetSite(), req.GetCsr())
}

// Renew gives a spoke with a valid certificate a fresh one.
func (s *federationServer) Renew(ctx context.Context, req *meshfedv1.RenewRequest) (*meshfedv1.JoinResponse, error) {
	site := spokeSite(ctx)
	if !s.h.siteExists(site) {
		return nil, status.Errorf(codes.PermissionDenied, "site %s is not registered at this hub", site)
	}
	return s.issue(site, req.GetCsr())
}

func (s *federationServer) issue(site string, csr []byte) (*meshfedv1.JoinResponse, error) {
	h := s.h
	id, err := ca.SpokeID(h.td, site)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cert, err := h.ca.SignCSR(csr, id, h.o.SpokeCertTTL)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &meshfedv1.JoinResponse{
		CertificatePem: ca.EncodeCertPEM(cert),
		CaPem:          ca.EncodeCertPEM(h.ca.Cert),
		Federation:     h.o.Federation,
		SpiffeId:       id.String(),
		TrustDomain:    h.siteTrustDomain(site),
	}, nil
}

// RedeemNodeToken burns a node token for the calling spoke's site.
func (s *federationServer) RedeemNodeToken(ctx context.Context, req *meshfedv1.RedeemNodeTokenRequest) (*meshfedv1.RedeemNodeTokenResponse, error) {
	site := spokeSite(ctx)
	rec, _, err := s.h.redeem(ctx, req.GetToken(), site, true)
	if err != nil {
		return nil, err
	}
	s.h.log.Info("node attested", "site", site, "node", rec.Node)
	return &meshfedv1.RedeemNodeTokenResponse{Node: rec.Node}, nil
}

// redeem checks and burns a token in one atomic update: it must exist,
// match its secret, be unexpired, unused, of the right kind and for site.
// A refusal for the wrong site or kind does not burn it. It returns the
// token's record as redeemed.
func (h *Hub) redeem(ctx context.Context, token, site string, node bool) (tokenRecord, credential.Token, error) {
	kind, create := "join", "meshfed site token create --site "+site
	if node {
		kind, create = "node", "meshfed vm token create --site "+site
	}
	var rec tokenRecord
	tok, err := credential.ParseToken(token)
	if err != nil {
		h.m.joins.WithLabelValues("malformed").Inc()
		return rec, tok, status.Error(codes.InvalidArgument, err.Error())
	}
	now := time.Now()
	result := "ok"
	err = h.store.Update(ctx, keyTokens+tok.ID, func(cur []byte) ([]byte, error) {
		rec = tokenRecord{}
		if cur == nil || json.Unmarshal(cur, &rec) != nil || !secretMatches(rec.SecretHash, tok.Secret) {
			result = "unknown"
			return nil, fmt.Errorf("%s token is not known to this hub: create one with `%s`", kind, create)
		}
		switch {
		case (rec.Node != "") != node:
			result = "wrong_kind"
			if node {
				return nil, errors.New("this is a spoke join token, not a node token: create one with `" + create + "`")
			}
			return nil, errors.New("this is a node token: give it to the host's vmagent, not to a spoke")
		case !rec.Used.IsZero():
			result = "replayed"
			return nil, fmt.Errorf("%s token was already used at %s: tokens are single-use, create a new one with `%s`", kind, rec.Used.Format(time.RFC3339), create)
		case now.After(rec.Expires):
			result = "expired"
			return nil, fmt.Errorf("%s token expired at %s: create a new one with `%s`", kind, rec.Expires.Format(time.RFC3339), create)
		case rec.Site != site:
			result = "wrong_site"
			return nil, fmt.Errorf("%s token is for site %q, not %q: use it at site %s or create a token for %s", kind, rec.Site, site, rec.Site, site)
		}
		rec.Used = now
		return json.Marshal(rec)
	})
	h.m.joins.WithLabelValues(result).Inc()
	if err != nil {
		if result == "ok" {
			return rec, tok, status.Errorf(codes.Unavailable, "redeem token: %v", err)
		}
		h.log.Warn("refused a token", "kind", kind, "site", site, "token_id", tok.ID, "reason", result)
		return rec, tok, status.Error(codes.Unauthenticated, err.Error())
	}
	return rec, tok, nil
}

func secretMatches(hash, secret string) bool {
	sum := sha256.Sum256([]byte(secret))
	return subtle.ConstantTimeCompare([]byte(hash), []byte(hex.EncodeToString(sum[:]))) == 1
}

func (h *Hub) siteTrustDomain(name string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if st := h.sites[name]; st != nil {
		return st.rec.Site.TrustDomain
	}
	return ""
}

func (h *Hub) siteExists(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sites[name] != nil
}

// Sync runs one spoke's federation stream. The newest stream of a site wins:
// an older one still open is cancelled.
func (s *federationServer) Sync(stream meshfedv1.Federation_SyncServer) error {
	h := s.h
	site := spokeSite(stream.Context())
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		return status.Error(codes.InvalidArgument, "the first message of a Sync stream must be a Hello")
	}
	if hello.GetSite() != "" && hello.GetSite() != site {
		h.m.nacks.WithLabelValues(site, "hub").Inc()
		return status.Errorf(codes.PermissionDenied, "this certificate is for site %s, the hello claims site %s", site, hello.GetSite())
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	st, err := h.connect(site, cancel)
	if err != nil {
		return err
	}
	defer h.disconnect(site, st)
	connected := time.Now()
	reply := &meshfedv1.Hello{KnownVersions: h.ownedVersions(site)}
	if err := stream.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Hello{Hello: reply}}); err != nil {
		return err
	}
	sess := &federation.Session{
		Stream:    stream,
		Out:       h.table,
		Filter:    func(k string) bool { return !federation.OwnedBy(k, site) },
		PeerKnown: hello.GetKnownVersions(),
		In:        &spokeSink{h: h, site: site},
		Logger:    h.log.With("site", site),
		OnSent: func(n int, oldest time.Time) {
			h.m.resourcesSent.WithLabelValues(site).Add(float64(n))
			switch {
			case oldest.IsZero():
			case oldest.Before(connected):
				// Changes from before the stream: the initial sync, timed
				// from the stream's start; it is not a push's latency.
				h.m.initialSync.WithLabelValues(site).Set(time.Since(connected).Seconds())
			default:
				h.m.pushDuration.Observe(time.Since(oldest).Seconds())
			}
		},
		OnNack: func(string) { h.m.nacks.WithLabelValues(site, "spoke").Inc() },
	}
	h.log.Info("spoke connected", "site", site, "holds", len(hello.GetKnownVersions()))
	err = sess.Run(ctx)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// connect marks site connected with a new stream, cancelling an older one.
func (h *Hub) connect(site string, cancel context.CancelFunc) (*siteState, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.sites[site]
	if st == nil {
		return nil, status.Errorf(codes.PermissionDenied, "site %s is not registered at this hub (was it removed?): add it with `meshfed site add` and join with a new token", site)
	}
	if st.conn != nil {
		h.log.Warn("a second spoke stream for the site replaces the first", "site", site)
		st.conn.cancel()
	}
	st.conn = &spokeConn{cancel: cancel, since: time.Now()}
	st.rec.LastSync = time.Now()
	st.rec.ConnectedVia = h.o.Advertise
	h.publishSiteLocked(st)
	h.refreshGaugesLocked()
	h.saveSiteLater(st)
	return st, nil
}

// disconnect marks the site stale if st's stream is still its current one,
// and records when it was last in sync.
func (h *Hub) disconnect(site string, st *siteState) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sites[site] != st {
		return
	}
	st.conn = nil
	st.rec.ConnectedVia = ""
	h.publishSiteLocked(st)
	h.refreshGaugesLocked()
	h.saveSiteLater(st)
	h.log.Info("spoke disconnected", "site", site)
}

// saveSiteLater stores st's record as it is now without holding up the
// caller, which holds h.mu. The write is Run's work (h.bg): the store
// closes after it, even when the hub stops as the stream ends, so the last
// sync is recorded. A site's writes land in the order they were asked for:
// one overtaken by a newer one is dropped.
func (h *Hub) saveSiteLater(st *siteState) {
	rec := st.rec
	st.saves++
	seq := st.saves
	h.bg.Add(1)
	go func() {
		defer h.bg.Done()
		st.saving.Lock()
		defer st.saving.Unlock()
		if seq < st.saved {
			return
		}
		st.saved = seq
		// Not Run's context: a stream ends because the hub stops, and its
		// last sync must be written all the same.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		theirs, err := h.saveSite(ctx, rec)
		if err != nil {
			h.log.Warn("could not record the site's connection and last sync", "site", rec.Site.Name, "err", err)
			return
		}
		if theirs == nil {
			return
		}
		// This stream lingered: show the replica that holds the spoke now.
		h.mu.Lock()
		defer h.mu.Unlock()
		if st := h.sites[rec.Site.Name]; st != nil && st.conn == nil && st.rec.ConnectedVia == "" {
			st.rec.ConnectedVia, st.rec.LastSync = theirs.ConnectedVia, theirs.LastSync
			h.publishSiteLocked(st)
		}
	}()
}

// saveSite stores rec's last sync and connection; the rest of the stored
// record (which another hub replica may have changed) stays as it is. A
// stream ending here clears only this hub's claim: the spoke may hold a
// newer one at another replica already (this one lingered, say, through a
// partition), and that replica's claim and last sync stay: theirs
// returns them then.
func (h *Hub) saveSite(ctx context.Context, rec siteRecord) (theirs *siteRecord, err error) {
	err = h.store.Update(ctx, keySites+rec.Site.Name, func(cur []byte) ([]byte, error) {
		if cur == nil {
			return nil, nil // removed meanwhile: do not bring it back
		}
		var stored siteRecord
		if err := json.Unmarshal(cur, &stored); err != nil {
			return nil, fmt.Errorf("stored record of site %s is damaged: %w", rec.Site.Name, err)
		}
		if rec.ConnectedVia == "" && stored.ConnectedVia != "" && stored.ConnectedVia != h.o.Advertise {
			theirs = &stored
			return nil, errOtherReplicas
		}
		stored.LastSync, stored.ConnectedVia = rec.LastSync, rec.ConnectedVia
		return json.Marshal(stored)
	})
	if errors.Is(err, errOtherReplicas) {
		return theirs, nil
	}
	return nil, err
}

// errOtherReplicas leaves a site record as it is: another replica holds
// the site's stream.
var errOtherReplicas = errors.New("another hub replica holds the stream")

// spokeSink applies a spoke's deltas to the federated catalog.
type spokeSink struct {
	h    *Hub
	site string
}

func (k *spokeSink) Apply(ctx context.Context, d *meshfedv1.Delta) error {
	err := k.apply(ctx, d)
	if errors.Is(err, federation.ErrRejected) {
		k.h.m.nacks.WithLabelValues(k.site, "hub").Inc()
	}
	return err
}

func (k *spokeSink) apply(ctx context.Context, d *meshfedv1.Delta) error {
	h, site := k.h, k.site
	ops := make([]store.Op, 0, len(d.GetUpdated())+len(d.GetRemoved()))
	for _, r := range d.GetUpdated() {
		if err := k.check(r.GetKey()); err != nil {
			return err
		}
		if err := federation.CheckResource(r); err != nil {
			return fmt.Errorf("%w: %v", federation.ErrRejected, err)
		}
		if err := k.validate(r); err != nil {
			return fmt.Errorf("%w: %v", federation.ErrRejected, err)
		}
		b, err := proto.Marshal(r)
		if err != nil {
			return err
		}
		ops = append(ops, store.Op{Key: keyResource + r.GetKey(), Value: b})
	}
	for _, key := range d.GetRemoved() {
		if err := k.check(key); err != nil {
			return err
		}
		ops = append(ops, store.Op{Key: keyResource + key, Delete: true})
	}
	h.mu.Lock()
	st := h.sites[site]
	h.mu.Unlock()
	if st == nil {
		return fmt.Errorf("site %s was removed", site)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if len(ops) > 0 {
		err := h.applyForSite(ctx, site, ops...)
		if errors.Is(err, errSiteGone) {
			return fmt.Errorf("site %s was removed", site)
		}
		if err != nil {
			h.log.Error("could not store a spoke's delta; the spoke will resend it", "site", site, "err", err)
			return err
		}
	}
	dServices, dEndpoints := 0, 0
	for _, r := range d.GetUpdated() {
		if old, ok := h.table.Get(r.GetKey()); ok {
			dServices -= countServices(old)
			dEndpoints -= len(old.GetService().GetEndpoints())
		}
		dServices += countServices(r)
		dEndpoints += len(r.GetService().GetEndpoints())
		h.table.Put(r)
	}
	for _, key := range d.GetRemoved() {
		if old, ok := h.table.Get(key); ok {
			dServices -= countServices(old)
			dEndpoints -= len(old.GetService().GetEndpoints())
			h.table.Delete(key)
		}
	}
	h.m.resourcesReceived.WithLabelValues(site).Add(float64(len(ops)))
	h.mu.Lock()
	st.services += dServices
	st.endpoints += dEndpoints
	st.rec.LastSync = time.Now()
	h.refreshGaugesLocked()
	h.mu.Unlock()
	return nil
}

func countServices(r *meshfedv1.Resource) int {
	if r.GetService() != nil {
		return 1
	}
	return 0
}

// validate checks what a spoke may publish: its services, and its own
// trust domain's bundle.
func (k *spokeSink) validate(r *meshfedv1.Resource) error {
	switch b := r.GetBody().(type) {
	case *meshfedv1.Resource_Service:
		return catalog.ValidateService(federation.ServiceFromWire(b.Service, catalog.Locality{}))
	case *meshfedv1.Resource_SourceStatus:
		if b.SourceStatus.GetSite() != k.site {
			return fmt.Errorf("site %s may report only its own source status", k.site)
		}
		return nil
	case *meshfedv1.Resource_Bundle:
		if want := k.h.siteTrustDomain(k.site); b.Bundle.GetTrustDomain() != want {
			return fmt.Errorf("site %s may publish the bundle of its trust domain %s only, not %s", k.site, want, b.Bundle.GetTrustDomain())
		}
		_, err := federation.BundleFromWire(b.Bundle)
		return err
	}
	return fmt.Errorf("%s: a spoke may send only services and its bundle", r.GetKey())
}

func (k *spokeSink) check(key string) error {
	if federation.KeySite(key) != k.site {
		return fmt.Errorf("%w: spoke of site %s may not write %q: a spoke writes only its own site's services", federation.ErrRejected, k.site, key)
	}
	return nil
}
