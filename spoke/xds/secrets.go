package xds

// The secrets (SDS) a node gets: its SVID and the federation's bundles.

import (
	"sort"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

func (b *builder) secrets(svid SVID) {
	if len(svid.CertPEM) > 0 {
		b.add(resource.SecretType, &tlsv3.Secret{Name: SecretSVID, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: svid.CertPEM}},
			PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: svid.KeyPEM}},
		}}})
	}
	tds := make([]string, 0, len(b.c.Bundles))
	for td := range b.c.Bundles {
		tds = append(tds, td)
	}
	sort.Strings(tds)
	v := &tlsv3.SPIFFECertValidatorConfig{}
	for _, td := range tds {
		v.TrustDomains = append(v.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
			Name:        td,
			TrustBundle: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b.c.Bundles[td]}},
		})
	}
	b.add(resource.SecretType, &tlsv3.Secret{Name: SecretFederation, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: "envoy.tls.cert_validator.spiffe", TypedConfig: mustAny(v)},
	}}})
}
