#!/bin/sh
# /usr/local/bin/mesh in the image: the chart's containers run `mesh ...` (command: [mesh]).
# bcc compiles the eBPF programs against /lib/modules/$(uname -r)/build, and the node's kernel
# is known only now: where the node's own headers are not there, link Debian's
# linux-headers-amd64 of the image (the programs use UAPI headers only), as the project's
# `make` does on a machine. Quietly skipped where the root filesystem is read-only (Envoy's
# container, which compiles nothing).
k=$(uname -r)
if [ ! -e "/lib/modules/$k/build/include" ]; then
	h=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
	if [ -n "$h" ]; then
		{ mkdir -p "/lib/modules/$k" && ln -sfn "$h" "/lib/modules/$k/build" &&
		  ln -sfn "${h%-amd64}-common" "/lib/modules/$k/source"; } 2>/dev/null || true
	fi
fi
exec /opt/mesh/bin/mesh "$@"
