#!/bin/sh
# Runs inside the image's root filesystem, as root, with the project's files in /src
# (pyproject.toml, uv.lock, requirements-uv.txt, mesh/, meshxds/, hack/image/): in the
# Containerfile (RUN) and in hack/image/build.sh (chroot). The same commands in both.
set -eu
# uv, pinned by hash (requirements-uv.txt), in a throwaway venv.
python3 -m venv /tmp/uv-venv
/tmp/uv-venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check \
	--require-hashes -r /src/requirements-uv.txt
# The project and exactly its locked dependencies (uv.lock; no dev extra), installed (not
# editable) into the venv /opt/mesh with Debian's python3; byte-compiled now, since the
# Envoy container's root filesystem is read-only.
cd /src
UV_PROJECT_ENVIRONMENT=/opt/mesh UV_PYTHON=/usr/bin/python3 UV_PYTHON_DOWNLOADS=never \
UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_CACHE_DIR=/tmp/uv-cache \
	/tmp/uv-venv/bin/uv sync --locked --no-editable --no-progress
# bcc's module (Debian's, for its python3) reached from the venv through a directory that
# holds just it, so Debian's other Python packages stay out (as the project's Makefile does).
mkdir -p /opt/mesh/system-bcc
ln -sfn /usr/lib/python3/dist-packages/bcc /opt/mesh/system-bcc/bcc
echo /opt/mesh/system-bcc > "$(/opt/mesh/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/system-bcc.pth"
install -m 0755 /src/hack/image/mesh.sh /usr/local/bin/mesh
rm -rf /tmp/uv-venv /src
