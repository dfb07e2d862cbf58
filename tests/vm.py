"""A command run under Debian's kernel in qemu, for what the machine's own kernel lacks (ESP
for IPsec, the kernel's WireGuard): the VM's root is the host's filesystem, read-only over
9p, so the project's venv and code run in it unchanged.

The project builds the VM's initramfs itself (`initramfs`): a static busybox and an init that
loads the 9p modules of the chosen kernel, mounts the host's root read-only with fresh tmpfs
over /run and /var/tmp (not /tmp: a project checked out there stays visible; TMPDIR points
into /run instead), and switches to it to run the command; the console is the serial port,
read back by `run`, which ends at the init's exit line. qemu emulates the CPU (TCG): these
machines' /dev/kvm is nested and fails on Debian's kernel (an emulation failure as it
decompresses); MESH_VM_KVM=1 asks for KVM where it works.

    python -m tests.vm -- COMMAND...   # prints the command's output, exits with its status
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What the init loads to reach the host's root (those the kernel has built in are skipped):
# virtio over PCI, 9p over virtio.
MODULES = ("kernel/drivers/virtio/virtio_pci.ko", "kernel/fs/9p/9p.ko",
           "kernel/net/9p/9pnet_virtio.ko")
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static puts a static one here
EXIT = "MESH-VM-EXIT"
WORK_ROOT = Path("/var/lib/mesh/vm")


class VMError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    modules: Path


def kernels() -> list[Kernel]:
    """Debian's kernels installed with their modules (newest first)."""
    out = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists() and any(
                (modules / "kernel/net/ipv4").glob("esp4.ko*")):
            out.append(Kernel(version, image, modules))
    return sorted(out, key=lambda k: [int(n) for n in re.findall(r"\d+", k.version)],
                  reverse=True)


def missing() -> str | None:
    """Why no VM can run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian: qemu-system-x86)"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing (Debian: busybox-static)"
    if not kernels():
        return "no Debian kernel with its modules in /boot (Debian: linux-image-amd64)"
    return None


def with_headers() -> Kernel | None:
    """The newest kernel (MESH_VM_KERNEL's, if set) whose headers are installed: bcc compiles
    the datapath's programs against the running kernel's."""
    wanted = os.environ.get("MESH_VM_KERNEL")
    return next((k for k in kernels() if wanted in (None, k.version) and
                 (k.modules / "build" / "include").is_dir()), None)


def _deps(kernel: Kernel) -> list[str]:
    """MODULES and what they need, dependencies first."""
    dep: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        name, _, needs = line.partition(":")
        dep[re.sub(r"\.(xz|zst|gz)$", "", name)] = [re.sub(r"\.(xz|zst|gz)$", "", n)
                                                    for n in needs.split()]
    order: list[str] = []

    def visit(m: str) -> None:
        for d in reversed(dep.get(m, [])):
            visit(d)
        if m not in order:
            order.append(m)

    for m in MODULES:
        if m in dep:  # else built in
            visit(m)
    return order


INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /root
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in {modules}; do /bin/busybox insmod /modules/$m || echo "insmod $m failed"; done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /root \\
  || {{ echo "{exit} 99"; /bin/busybox poweroff -f; }}
for d in proc sys dev; do /bin/busybox mkdir -p /root/$d 2>/dev/null; done
/bin/busybox mount -t sysfs sys /root/sys
/bin/busybox mount --move /dev /root/dev
/bin/busybox umount /proc
/bin/busybox mount -t proc proc /root/proc
for d in run var/tmp; do /bin/busybox mount -t tmpfs tmpfs /root/$d; done
exec /bin/busybox switch_root /root /bin/sh {script}
"""

SCRIPT = """set +e
mkdir -p /run/netns /var/run/wireguard /run/tmp
export TMPDIR=/run/tmp
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
cd {cwd}
{command}
echo "{exit} $?"
echo o > /proc/sysrq-trigger
"""


def initramfs(kernel: Kernel, script: Path, out: Path) -> Path:
    """The init, a static busybox and the 9p modules, as a newc cpio."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "bin").mkdir()
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        (root / "modules").mkdir()
        names = []
        for m in _deps(kernel):
            src = next(kernel.modules.glob(m + "*"))
            data = src.read_bytes()
            if src.suffix == ".xz":
                data = lzma.decompress(data)
            name = Path(m).name
            (root / "modules" / name).write_bytes(data)
            names.append(name)
        init = root / "init"
        init.write_text(INIT.format(modules=" ".join(names), exit=EXIT, script=script))
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True,
                               check=True).stdout
        with out.open("wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(),
                           stdout=f, check=True)
    return out


def run(command: str, timeout: float = 600, memory: int = 2048, cwd: Path | None = None,
        kernel: Kernel | None = None) -> tuple[int, str]:
    """(the command's exit status, the console's output) of `command` (a shell line) run as
    root in the VM, in `cwd` (the project by default)."""
    why = missing()
    if why is not None:
        raise VMError(why)
    wanted = os.environ.get("MESH_VM_KERNEL")  # a version, else the newest installed
    installed = [k for k in kernels() if wanted in (None, k.version)]
    if not installed:
        raise VMError(f"no installed kernel {wanted}")
    kernel = kernel or installed[0]
    # not under /run or /var/tmp: the VM mounts fresh ones there
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK_ROOT))
    try:
        script = work / "cmd.sh"
        script.write_text(SCRIPT.format(command=command, exit=EXIT,
                                        cwd=cwd or Path(__file__).resolve().parents[1]))
        initrd = initramfs(kernel, script, work / "initrd.cpio")
        kvm = os.environ.get("MESH_VM_KVM") == "1"
        args = ["qemu-system-x86_64", "-m", str(memory), "-smp", "2", "-nographic",
                "-no-reboot", "-kernel", str(kernel.image), "-initrd", str(initrd),
                "-append", "console=ttyS0 quiet loglevel=3 panic=-1",
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                "multidevs=remap",
                "-nic", "none", *(["-enable-kvm", "-cpu", "host"] if kvm
                                  else ["-accel", "tcg", "-cpu", "max"])]
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                 errors="replace")
        except subprocess.TimeoutExpired as e:
            raise VMError(f"the VM did not finish in {timeout:.0f} s: "
                          f"{(e.stdout or b'')[-2000:]!r}") from None
        text = out.stdout.replace("\r", "")
        found = re.search(rf"^{EXIT} (\d+)$", text, re.M)
        if found is None:
            raise VMError(f"the VM ended without its exit line:\n{text[-3000:]}"
                          f"{out.stderr[-1000:]}")
        return int(found.group(1)), text[:found.start()]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    status, output = run(" ".join(argv))
    sys.stdout.write(output)
    sys.exit(status)


if __name__ == "__main__":
    main()
