//go:build tools

// Package tools keeps in go.mod and go.sum the modules the lab reads but builds no command
// from: the Gateway API's CRDs (config/crd/experimental) and its conformance suite; the
// Network Policy API's CRDs (ClusterNetworkPolicy, config/crd/experimental).
package tools

import (
	_ "sigs.k8s.io/gateway-api/conformance"
	_ "sigs.k8s.io/network-policy-api/apis/v1alpha2"
)
