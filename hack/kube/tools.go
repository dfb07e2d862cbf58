//go:build tools

// Package tools keeps in go.mod and go.sum the modules the lab reads but builds no command
// from: the Gateway API's CRDs (config/crd/experimental) and its conformance suite.
package tools

import (
	_ "sigs.k8s.io/gateway-api/conformance"
)
