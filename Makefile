# Two commands for a fresh machine (Debian, root, Python 3.11):
#   make run    installs everything and brings up the lab (two nodes) with examples/lab
#   make test   installs everything and runs lint, type checks, the docs build and the test suite
#   make docs   serves the documentation site on http://127.0.0.1:8000 (loopback only)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system
# uv installs exactly uv.lock (every dependency, direct and transitive, with hashes); uv
# itself comes from requirements-uv.txt, pinned by hash, into a venv of its own.
UV_VENV := .venv-uv
UV := $(UV_VENV)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON := python3
export UV_PYTHON_DOWNLOADS := never
# The machine's part of the datapath: bcc (compiles the eBPF programs; its Python module and
# libbcc from Debian), kernel headers for it, the standard CNI plugins (host-local IPAM),
# iproute2 and procps (ip, sysctl, ps), curl (the lab's demo), redis-server (the global rate
# limits' counters, started by the lab and the tests); for the benchmarks, iperf3,
# sockperf and iptables.
DEBIAN_PACKAGES := python3-bpfcc linux-headers-amd64 containernetworking-plugins iproute2 procps \
	curl redis-server wireguard-go
BENCH_PACKAGES := iperf3 sockperf iptables wrk
# `mesh map --png` and the service map's tests: Debian's Chromium, headless.
BROWSER_PACKAGES := chromium
# Debian's kernel under qemu, for what this machine's kernel lacks (tests/vm.py): without
# their Recommends (qemu's would bring a desktop's worth).
VM_PACKAGES := qemu-system-x86 busybox-static linux-image-amd64
# The documentation site (mkdocs.yml, docs/), built into $(SITE) (git-ignored).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
SITE := .site

.PHONY: install system debian run run-host test test-fast bench docs clean lock upgrade kube-bin conformance \
	hubble-bin

# The real Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler),
# kubectl and etcd, built from the Go modules pinned in hack/kube (go.mod, go.sum) into
# .kube/bin; rebuilt only when hack/kube/go.sum changes. -v lists the packages as they compile,
# counted here against the total so a cold build shows where it is.
KUBE_BIN := .kube/bin
# The OCI image (make image; hack/image/build.sh), which make test builds and tests.
IMAGE_DIR := .image
KUBE_VERSION := v1.37.2
KUBE_CMDS := k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
KUBE_LDFLAGS := -s -w -X k8s.io/component-base/version.gitVersion=$(KUBE_VERSION) \
	-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37
$(KUBE_BIN)/.built: hack/kube/go.mod hack/kube/go.sum
	@command -v go >/dev/null || { echo "error: Go (1.26) is needed to build the lab's Kubernetes" >&2; exit 1; }
	@mkdir -p $(KUBE_BIN)
	@cd hack/kube && total=$$(go list -deps $(KUBE_CMDS) go.etcd.io/etcd/server/v3 | wc -l) && \
	echo "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd from hack/kube ($$total packages; a cold build takes about 8 minutes on 2 cores)" && \
	set -o pipefail && \
	{ go build -v -trimpath -ldflags "$(KUBE_LDFLAGS)" -o ../../$(KUBE_BIN)/ $(KUBE_CMDS) && \
	  go build -v -trimpath -ldflags "-s -w" -o ../../$(KUBE_BIN)/etcd go.etcd.io/etcd/server/v3; } 2>&1 | \
	awk -v total=$$total '/^go: / || /\.go:[0-9]+/ {print; next} {n++} n % 200 == 0 {printf "  %d of at most %d packages compiled\n", n, total; fflush()}'
	@for b in kube-apiserver kube-controller-manager kube-scheduler kubectl etcd; do \
		test -x $(KUBE_BIN)/$$b || { echo "error: $(KUBE_BIN)/$$b was not built" >&2; exit 1; }; done
	@du -sh $(KUBE_BIN) | awk '{print "built into $(KUBE_BIN): " $$1}'
	@touch $@
kube-bin: $(KUBE_BIN)/.built

# The Gateway API's conformance suite, its test binary built from the module go.sum pins
# (sigs.k8s.io/gateway-api/conformance), run against a lab: make conformance.
CONFORMANCE_TEST := $(KUBE_BIN)/gateway-api-conformance.test
$(CONFORMANCE_TEST): hack/kube/go.mod hack/kube/go.sum
	@mkdir -p $(KUBE_BIN)
	@echo "building the Gateway API conformance suite from hack/kube (about 4 minutes cold)"
	cd hack/kube && go test -c -trimpath -o ../../$@ sigs.k8s.io/gateway-api/conformance

# Hubble's Observer API: the Python modules generated from the protos of the cilium/cilium
# module hack/hubble/go.sum pins (hack/hubble/generate.py, into mesh/hubble/api, git-ignored),
# and the `hubble` CLI built from the same module (the tests and the docs run it against the
# agent and the relay).
HUBBLE_API := mesh/hubble/api/README
$(HUBBLE_API): hack/hubble/go.mod hack/hubble/go.sum hack/hubble/generate.py $(STAMP)
	@command -v go >/dev/null || { echo "error: Go (1.26) is needed to fetch Hubble's protos" >&2; exit 1; }
	$(PY) hack/hubble/generate.py
HUBBLE_BIN := $(KUBE_BIN)/hubble
$(HUBBLE_BIN): hack/hubble/go.mod hack/hubble/go.sum
	@mkdir -p $(KUBE_BIN)
	@echo "building the hubble CLI from hack/hubble (about 3 minutes cold)"
	cd hack/hubble && go build -trimpath -ldflags "-s -w" -o ../../$@ github.com/cilium/cilium/hubble
hubble-bin: $(HUBBLE_BIN)

$(UV): requirements-uv.txt
	python3 -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		--require-hashes -r requirements-uv.txt
	touch $(UV)

# --locked: install uv.lock as it is, and stop if it no longer matches pyproject.toml.
$(STAMP): pyproject.toml uv.lock $(UV)
	@$(UV) sync --locked --extra dev --quiet || { \
		echo "error: uv.lock does not match pyproject.toml (or could not be installed)." >&2; \
		echo "       If pyproject.toml changed on purpose, run 'make lock' and commit uv.lock." >&2; \
		exit 1; }
	touch $(STAMP)

# Refresh the lock on purpose: `make lock` after editing pyproject.toml (keeps every other
# pin), `make upgrade` to move every dependency to its newest allowed version. Either is a
# commit of its own that passes `make test`.
lock: $(UV)
	$(UV) lock
upgrade: $(UV)
	$(UV) lock --upgrade

# Debian packages (as root; `apt-get update` only if the lists are stale), then: where the
# running kernel ships no headers, Debian's linux-headers-amd64 stand in (the programs use
# UAPI headers only); bcc's module is reached from the venv through a directory holding
# just it, so Debian's other Python packages stay out of the venv.
$(SYSTEM_STAMP): $(STAMP) Makefile
	@$(MAKE) --no-print-directory debian PACKAGES="$(DEBIAN_PACKAGES)"
	@$(MAKE) --no-print-directory debian PACKAGES="$(BENCH_PACKAGES)" || \
		echo "warning: $(BENCH_PACKAGES) not installed: the benchmarks that use them will fail"
	@$(MAKE) --no-print-directory debian PACKAGES="$(BROWSER_PACKAGES)" \
		APT_OPTS=--no-install-recommends || \
		echo "warning: $(BROWSER_PACKAGES) not installed: mesh map --png and its tests will fail"
	@$(MAKE) --no-print-directory debian PACKAGES="$(VM_PACKAGES)" \
		APT_OPTS=--no-install-recommends || \
		echo "warning: $(VM_PACKAGES) not installed: the tests under qemu will be skipped"
	@k=$$(uname -r); if [ ! -e /lib/modules/$$k/build/include ]; then \
		h=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1); \
		mkdir -p /lib/modules/$$k; ln -sfn $$h /lib/modules/$$k/build; \
		ln -sfn $${h%-amd64}-common /lib/modules/$$k/source; fi
	mkdir -p $(VENV)/system-bcc
	ln -sfn /usr/lib/python3/dist-packages/bcc $(VENV)/system-bcc/bcc
	echo "$(abspath $(VENV))/system-bcc" > \
		$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/system-bcc.pth
	touch $(SYSTEM_STAMP)

# Install the Debian packages in $(PACKAGES) that are missing (as root; `apt-get update`
# only if the package lists are stale).
debian:
	@missing=""; for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || \
			missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_OPTS) $$missing \
		  >/dev/null || \
		{ apt-get update -q >/dev/null && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_OPTS) $$missing \
		  >/dev/null; }; fi

install: $(STAMP) $(SYSTEM_STAMP) $(HUBBLE_API)
system: $(SYSTEM_STAMP)

# The embedded default: a lab of two nodes on a real control plane (built from source by
# kube-bin), with examples/lab deployed, left running.
run: $(STAMP) $(SYSTEM_STAMP) $(HUBBLE_API) $(KUBE_BIN)/.built $(HUBBLE_BIN)
	@$(VENV)/bin/mesh lab down --name demo >/dev/null 2>&1 || true
	$(VENV)/bin/mesh lab up --nodes 2 --manifests examples/lab --name demo
	@$(VENV)/bin/mesh lab status --name demo
	@echo
	@echo "Try:"
	@echo "  export KUBECONFIG=\$$($(VENV)/bin/mesh lab kubeconfig) PATH=$(CURDIR)/$(KUBE_BIN):\$$PATH"
	@echo "  kubectl get nodes,pods -o wide; kubectl get gateways,httproutes -A   # the lab's API server: status written by the agents"
	@echo "  $(VENV)/bin/mesh lab exec client -- curl -si http://echo/         # a GAMMA route: the node's Envoy, 90/10 v1/v2, x-mesh header"
	@echo "  $(VENV)/bin/mesh lab exec client -- curl -s http://echo-v2/        # no route: balanced in eBPF, no Envoy"
	@echo "  curl -s -H 'Host: echo.example' http://172.30.0.11:8080/          # from this host: the Gateway on node1, 90/10 v1/v2"
	@echo "  curl -s http://172.30.0.12:30080/                                  # from this host: the echo NodePort on node2 (Maglev)"
	@echo "  curl -si -H 'Host: echo.example' -H 'x-user: me' http://172.30.0.12:8080/   # 5 a minute per x-user, shared by both nodes (429 after)"
	@echo "  kubectl scale deployment echo-v1 --replicas=3                      # the real controllers, scheduler and the lab's kubelets"
	@echo "  $(VENV)/bin/mesh lab exec client -- curl -s -m 2 http://echo-admin:9000/   # closed by the echo pods' NetworkPolicy"
	@echo "  $(VENV)/bin/mesh observe --verdict DROPPED                          # ... the flows say why; --protocol http for requests"
	@echo "  hubble observe --server unix:///run/mesh/lab/demo/hubble-relay.sock   # Hubble's own CLI, against the lab's relay"
	@echo "  $(VENV)/bin/mesh lab down"

# The upstream Gateway API conformance suite against a lab of its own (GATEWAY-HTTP,
# GATEWAY-GRPC, GATEWAY-TLS); the report goes to conformance/reports/.
conformance: $(STAMP) $(SYSTEM_STAMP) $(KUBE_BIN)/.built $(CONFORMANCE_TEST)
	$(PY) -m tests.conformance.upstream

# The agent and its Envoy on this host alone, on examples/gateway (no lab).
run-host: $(STAMP) $(HUBBLE_API)
	$(VENV)/bin/mesh run --manifests examples/gateway --echo 127.0.0.1:18080

test: $(STAMP) $(SYSTEM_STAMP) $(HUBBLE_API) $(KUBE_BIN)/.built $(HUBBLE_BIN) $(CONFORMANCE_TEST) \
		$(IMAGE_DIR)/.built
	$(VENV)/bin/ruff check mesh meshxds tests benchmarks docs
	$(VENV)/bin/mypy
	$(MKDOCS) build --strict --quiet --site-dir $(SITE)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP) $(SYSTEM_STAMP) $(HUBBLE_API)
	$(PY) -m pytest -q -ra -m 'not slow'

# The documentation site (mkdocs.yml, docs/): strict, so a broken link, anchor or generated
# reference fails the build; served on loopback only.
docs: $(STAMP) $(HUBBLE_API)
	$(MKDOCS) serve --strict -a 127.0.0.1:8000

bench: $(STAMP) $(HUBBLE_API)
	$(PY) benchmarks/xds_push.py --quick

# The image the chart runs, built without a container engine (as root): hack/image/build.sh
# (mmdebstrap: Debian bookworm with hack/image/packages.txt, the project and uv.lock installed
# into /opt/mesh by hack/image/install.sh; umoci: the layer and the configuration) into the
# OCI layout .image/mesh, tagged with the project's version. The Containerfile builds the
# same with Docker or Buildah. Rebuilt only when its inputs change; about 2 minutes cold.
IMAGE_INPUTS := pyproject.toml uv.lock requirements-uv.txt Containerfile $(wildcard hack/image/*) \
	$(wildcard $(shell git ls-files -co --exclude-standard mesh meshxds 2>/dev/null))
$(IMAGE_DIR)/.built: $(IMAGE_INPUTS) $(HUBBLE_API)
	@$(MAKE) --no-print-directory debian PACKAGES="mmdebstrap umoci"
	hack/image/build.sh $(IMAGE_DIR)
	@touch $@
image: $(IMAGE_DIR)/.built
.PHONY: image

clean:
	rm -rf $(VENV) $(UV_VENV) .kube $(IMAGE_DIR) .mypy_cache .pytest_cache .ruff_cache $(SITE) \
		mesh/hubble/api
