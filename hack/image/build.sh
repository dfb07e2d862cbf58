#!/bin/bash
# Builds the mesh image without a container engine, into the OCI layout OUT/mesh (tag: the
# project's version). `make image` runs it; run it as root (mmdebstrap's root mode, chroot).
#   1. mmdebstrap: a Debian bookworm root filesystem (minbase) with hack/image/packages.txt,
#      then, in a chroot of it, hack/image/install.sh: the project and its locked dependencies
#      (uv.lock) into the venv /opt/mesh, /usr/local/bin/mesh. The Containerfile at the
#      repository's root runs the same two steps for Docker or Buildah.
#   2. umoci: that root filesystem as the image's one layer, then its configuration
#      (entrypoint `mesh`, PATH, the org.opencontainers.image.* labels).
# OUT/cache/uv keeps uv's downloads between builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:-.image}")
layout=$out/mesh
work=$out/work
start=$(date +%s)
step() { printf '[image %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- pyproject.toml uv.lock requirements-uv.txt mesh meshxds hack/image Containerfile 2>/dev/null)" ]; then
	revision=$revision-dirty
fi
source_url=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || true)}
epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
packages=$(grep -v '^#' hack/image/packages.txt | paste -sd, -)
for tool in mmdebstrap umoci; do
	command -v $tool >/dev/null || { echo "error: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "error: run as root (mmdebstrap --mode=root, chroot)" >&2; exit 1; }

step "mesh $version ($revision): Debian bookworm with $packages"
rm -rf "$work"
mkdir -p "$work/src" "$out/cache/uv"
# The project's files as the Containerfile's COPY lines take them: tracked ones and new ones
# git does not ignore.
git ls-files -z -co --exclude-standard -- pyproject.toml uv.lock requirements-uv.txt mesh meshxds hack/image |
	while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
	xargs -0 cp --parents -t "$work/src"

# The chroot step of mmdebstrap's customize hook: uv's cache bind-mounted from OUT/cache/uv
# for the time of install.sh (unmounted however it ends).
cache=$(realpath "$out/cache/uv")
cat > "$work/hook.sh" <<'HOOK'
set -e
root=$1 cache=$2
mkdir -p "$root/tmp/uv-cache"
mount --bind "$cache" "$root/tmp/uv-cache"
trap 'umount "$root/tmp/uv-cache"; rmdir "$root/tmp/uv-cache"; rm -f "$root/etc/resolv.conf" "$root/tmp/build-ca.crt"' EXIT
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The downloads trust what this machine trusts (a TLS-intercepting proxy's CA, say): its CA
# bundle, for the time of install.sh only; the image keeps Debian's ca-certificates.
cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$root/tmp/build-ca.crt"
chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	HOME=/root SSL_CERT_FILE=/tmp/build-ca.crt PIP_CERT=/tmp/build-ca.crt \
	sh /src/hack/image/install.sh
HOOK
SOURCE_DATE_EPOCH=$epoch mmdebstrap --mode=root --variant=minbase --include="$packages" \
	--aptopt='APT::Install-Recommends "false"' --dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	--customize-hook="copy-in $work/src /" \
	--customize-hook="bash $work/hook.sh \"\$1\" $cache" \
	bookworm "$work/rootfs.tar" \
	"deb http://deb.debian.org/debian bookworm main" \
	"deb http://deb.debian.org/debian bookworm-updates main" \
	"deb http://deb.debian.org/debian-security bookworm-security main"
step "root filesystem: $(du -h "$work/rootfs.tar" | cut -f1) (tar)"

step "OCI layout $layout:$version (umoci)"
rm -rf "$work/oci"
umoci init --layout "$work/oci"
umoci new --image "$work/oci:$version"
umoci raw add-layer --image "$work/oci:$version" --history.created="$created" \
	--history.created_by="hack/image/build.sh: mmdebstrap bookworm ($packages), hack/image/install.sh" \
	"$work/rootfs.tar"
labels=(--config.label "org.opencontainers.image.version=$version"
	--config.label "org.opencontainers.image.revision=$revision"
	--config.label "org.opencontainers.image.title=mesh"
	--config.label "org.opencontainers.image.created=$created")
[ -n "$source_url" ] && labels+=(--config.label "org.opencontainers.image.source=$source_url")
umoci config --image "$work/oci:$version" --no-history --created="$created" \
	--architecture=amd64 --os=linux --config.workingdir=/ \
	--config.entrypoint=mesh --config.cmd=--help \
	--config.env=PATH=/usr/local/sbin:/usr/local/bin:/opt/mesh/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	"${labels[@]}"
umoci gc --layout "$work/oci"
rm -rf "$layout"
mv "$work/oci" "$layout"
rm -rf "$work"
size=$(du -sb "$layout/blobs" | cut -f1)
step "built $layout:$version: $(( size / 1024 / 1024 )) MiB compressed ($(du -sh "$layout" | cut -f1) on disk)"
