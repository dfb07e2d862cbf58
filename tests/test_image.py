"""The image the chart runs, as `make image` builds it (hack/image/build.sh) into .image/mesh.

The OCI layout is checked as a registry client would (every descriptor's digest and size
against its blob, the configuration's diff_ids against the uncompressed layer), then the
layer is unpacked and its root filesystem entered with `unshare --mount --pid --fork --root`
(a mount namespace of its own: nothing stays mounted) to run what the chart runs: the
entrypoint `mesh`, `mesh envoy`, Envoy, bcc compiling a program against the image's kernel
headers, nft, `mesh cni-install` and the plugin it installs.

The Containerfile test needs no image: it checks that the Containerfile stays in step with
the recipe build.sh uses.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / ".image" / "mesh"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BUILD_SH = ROOT / "hack" / "image" / "build.sh"
CONTAINERFILE = ROOT / "Containerfile"
PATH = "/usr/local/sbin:/usr/local/bin:/opt/mesh/bin:/usr/sbin:/usr/bin:/sbin:/bin"

needs_image = pytest.mark.skipif(
    not (LAYOUT / "index.json").exists(),
    reason="no image in .image/mesh: `make image` builds it (mmdebstrap and umoci, as root; "
    "about 2 minutes cold)")


def _blob(digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    assert algorithm == "sha256"
    return LAYOUT / "blobs" / "sha256" / hexdigest


def _checked(descriptor: dict[str, Any]) -> bytes:
    """The blob a descriptor points at, after checking its size and digest (small blobs)."""
    data = _blob(descriptor["digest"]).read_bytes()
    assert len(data) == descriptor["size"]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
    return data


def _sha256_file(path: Path, opener: Any = open) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    layout = json.loads((LAYOUT / "oci-layout").read_text())
    assert layout == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((LAYOUT / "index.json").read_text())
    assert index["schemaVersion"] == 2
    tagged = [m for m in index["manifests"]
              if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == VERSION]
    assert len(tagged) == 1, f"no manifest tagged {VERSION} (the project's version)"
    assert tagged[0]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    m: dict[str, Any] = json.loads(_checked(tagged[0]))
    assert m["schemaVersion"] == 2
    return m


@pytest.fixture(scope="module")
def config(manifest: dict[str, Any]) -> dict[str, Any]:
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    c: dict[str, Any] = json.loads(_checked(manifest["config"]))
    return c


@pytest.fixture(scope="module")
def rootfs(manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("unpacking the image and entering it need root and unshare")
    # build.sh makes one layer (the whole root filesystem): no whiteouts to apply.
    assert len(manifest["layers"]) == 1
    root = tmp_path_factory.mktemp("image") / "rootfs"
    root.mkdir()
    layer = manifest["layers"][0]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    subprocess.run(["tar", "-xzf", str(_blob(layer["digest"])), "-C", str(root),
                    "--numeric-owner"], check=True)
    yield root
    shutil.rmtree(root)


def run_in(root: Path, *argv: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """argv in the image's root filesystem: own mount and PID namespaces, a fresh /proc."""
    environment = {"PATH": PATH, "HOME": "/root", **(env or {})}
    cmd = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", f"--root={root}",
           "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# -- the layout --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_layout_blobs_match_their_digests(manifest: dict[str, Any],
                                          config: dict[str, Any]) -> None:
    assert config["rootfs"]["type"] == "layers"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert _sha256_file(_blob(layer["digest"])) == (layer["digest"], layer["size"])
        # The configuration names the uncompressed layer.
        assert _sha256_file(_blob(layer["digest"]), gzip.open)[0] == diff_id
    referenced = {manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])}
    index = json.loads((LAYOUT / "index.json").read_text())
    referenced |= {m["digest"] for m in index["manifests"]}
    stored = {"sha256:" + p.name for p in (LAYOUT / "blobs" / "sha256").iterdir()}
    assert stored == referenced, "blobs nothing references (umoci gc was not run)"


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_config(config: dict[str, Any]) -> None:
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    c = config["config"]
    assert c["Entrypoint"] == ["mesh"]
    assert c["Cmd"] == ["--help"]
    assert f"PATH={PATH}" in c["Env"]
    labels = c["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown",
                        labels["org.opencontainers.image.revision"])
    assert c.get("User", "") in ("", "0", "root")  # the chart runs it as root


# -- the contents ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_files(rootfs: Path) -> None:
    wrapper = rootfs / "usr/local/bin/mesh"
    assert wrapper.read_text().startswith("#!/bin/sh")
    assert os.access(wrapper, os.X_OK)
    assert (rootfs / "opt/mesh/bin/mesh").exists()
    assert (rootfs / "usr/sbin/nft").exists()
    headers = sorted(rootfs.glob("usr/src/linux-headers-*-amd64"))
    assert len(headers) == 1
    assert (headers[0] / "include/generated/uapi/linux/version.h").exists()
    common = Path(str(headers[0]).removesuffix("-amd64") + "-common")
    assert (common / "include/uapi/linux/bpf.h").exists()
    # What only the build needed is gone: the sources, uv, its cache, the build's CA bundle.
    for left in ("src", "tmp/uv-venv", "tmp/uv-cache", "tmp/build-ca.crt"):
        assert not (rootfs / left).exists(), left
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages"))


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_entrypoint_version(rootfs: Path, config: dict[str, Any]) -> None:
    out = run_in(rootfs, *config["config"]["Entrypoint"], "--version").stdout
    assert out.strip() == f"mesh {VERSION}"


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_mesh_envoy_help(rootfs: Path) -> None:
    out = run_in(rootfs, "mesh", "envoy", "--help").stdout
    assert "--node-id" in out


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_envoy_runs(rootfs: Path) -> None:
    out = run_in(rootfs, "envoy", "--version").stdout
    assert re.search(r"envoy\s+version: [0-9a-f]+/1\.40\.", out), out


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_bcc_compiles_against_the_image_headers(rootfs: Path) -> None:
    # The wrapper links the image's headers as this kernel's /lib/modules/$(uname -r)/build,
    # where bcc looks; then bcc (Debian's module, from the venv) compiles a program that
    # includes kernel headers. Compiling only: nothing is loaded into the kernel.
    release = os.uname().release
    program = ("from bcc import BPF\n"
               "BPF(text='#include <uapi/linux/bpf.h>\\n#include <linux/if_ether.h>\\n"
               "int f(struct __sk_buff *skb) { return skb->len > ETH_HLEN; }')\n"
               "print('compiled')\n")
    proc = run_in(rootfs, "sh", "-c", 'mesh --version >/dev/null && '
                  'readlink "/lib/modules/$(uname -r)/build" && exec python -c "$PROGRAM"',
                  env={"PROGRAM": program})
    link, compiled = proc.stdout.split()
    assert re.fullmatch(r"/usr/src/linux-headers-.*-amd64", link)
    assert (rootfs / "lib/modules" / release / "source").is_symlink()
    assert compiled == "compiled"


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_nft(rootfs: Path) -> None:
    assert run_in(rootfs, "nft", "--version").stdout.startswith("nftables v1.")


@pytest.mark.slow
@pytest.mark.e2e
@needs_image
def test_cni_install_and_the_plugin(rootfs: Path) -> None:
    run_in(rootfs, "mesh", "cni-install", "--bin-dir", "/tmp/cni/bin", "--conf-dir",
           "/tmp/cni/net.d", "--pod-cidr", "10.244.1.0/24")
    plugin = rootfs / "tmp/cni/bin/mesh-cni"
    assert os.access(plugin, os.X_OK)
    conf = json.loads((rootfs / "tmp/cni/net.d/05-mesh.conflist").read_text())
    assert conf["plugins"][0]["type"] == "mesh-cni"
    # The plugin runs with the python3 found on PATH (on a node: the node's).
    out = run_in(rootfs, "/tmp/cni/bin/mesh-cni", env={"CNI_COMMAND": "VERSION"}).stdout
    assert json.loads(out)["supportedVersions"] == ["0.4.0", "1.0.0"]


# -- the Containerfile ------------------------------------------------------------------------


def test_containerfile_in_step_with_the_recipe() -> None:
    """Docker and Buildah users get what build.sh builds: the same packages (packages.txt),
    the same install commands (install.sh) and the same configuration."""
    cf = CONTAINERFILE.read_text()
    build = BUILD_SH.read_text()
    assert "FROM docker.io/library/debian:bookworm-slim" in cf
    assert re.search(r"^\s+bookworm ", build, re.M)
    assert "hack/image/packages.txt" in cf and "hack/image/packages.txt" in build
    assert "--no-install-recommends" in cf and "APT::Install-Recommends \"false\"" in build
    assert "sh /src/hack/image/install.sh" in cf and "sh /src/hack/image/install.sh" in build
    # What install.sh reads from /src, the Containerfile copies there.
    for copied in ("pyproject.toml uv.lock requirements-uv.txt /src/", "mesh /src/mesh",
                   "meshxds /src/meshxds", "hack/image /src/hack/image"):
        assert f"COPY {copied}" in cf
    assert f"ARG VERSION={VERSION}" in cf
    assert 'ENTRYPOINT ["mesh"]' in cf and "--config.entrypoint=mesh" in build
    assert 'CMD ["--help"]' in cf and "--config.cmd=--help" in build
    assert f"ENV PATH={PATH}" in cf and f"--config.env=PATH={PATH}" in build
    for label in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{label}=" in cf
        assert f"org.opencontainers.image.{label}=" in build
