package federation

import (
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"google.golang.org/protobuf/types/known/durationpb"
)

// PolicyToWire converts a validated policy to its wire form.
func PolicyToWire(p catalog.Policy) *meshfedv1.TrafficPolicy {
	ns, name, _ := catalog.ParseServiceID(p.Service)
	out := &meshfedv1.TrafficPolicy{
		Namespace: ns, Name: name, Failover: p.Failover, Retries: p.Retries,
		Allow: p.Allow, OverprovisioningFactor: p.OverprovisioningFactor,
		ConnectTimeout: durationToWire(p.ConnectTimeout),
	}
	for _, s := range p.Split {
		out.Split = append(out.Split, &meshfedv1.TrafficSplit{Name: s.Name, Weight: s.Weight, Site: s.Site, Labels: s.Labels})
	}
	if o := p.OutlierDetection; o != nil {
		out.OutlierDetection = &meshfedv1.OutlierDetection{
			ConsecutiveFailures: o.ConsecutiveFailures, MaxEjectionPercent: o.MaxEjectionPercent,
			Interval: durationToWire(o.Interval), BaseEjectionTime: durationToWire(o.BaseEjectionTime),
		}
	}
	return out
}

// PolicyFromWire converts a wire policy to the catalog model.
func PolicyFromWire(p *meshfedv1.TrafficPolicy) catalog.Policy {
	out := catalog.Policy{
		Service: p.GetNamespace() + "/" + p.GetName(), Failover: p.GetFailover(), Retries: p.Retries,
		Allow: p.GetAllow(), OverprovisioningFactor: p.GetOverprovisioningFactor(),
		ConnectTimeout: catalog.Duration(p.GetConnectTimeout().AsDuration()),
	}
	for _, s := range p.GetSplit() {
		out.Split = append(out.Split, catalog.Split{Name: s.GetName(), Weight: s.GetWeight(), Site: s.GetSite(), Labels: s.GetLabels()})
	}
	if o := p.GetOutlierDetection(); o != nil {
		out.OutlierDetection = &catalog.OutlierDetection{
			ConsecutiveFailures: o.GetConsecutiveFailures(), MaxEjectionPercent: o.GetMaxEjectionPercent(),
			Interval: catalog.Duration(o.GetInterval().AsDuration()), BaseEjectionTime: catalog.Duration(o.GetBaseEjectionTime().AsDuration()),
		}
	}
	return out
}

func durationToWire(d catalog.Duration) *durationpb.Duration {
	if d == 0 {
		return nil
	}
	return durationpb.New(time.Duration(d))
}
