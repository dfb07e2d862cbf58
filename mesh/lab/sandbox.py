"""A container's mounts, in a mount namespace of its own: run by the lab's kubelet as

    unshare --mount --propagation private -- python -m mesh.lab.sandbox \
        --mount SOURCE:TARGET[:ro] ... -- ip netns exec POD_NETNS COMMAND...

It bind-mounts each volume the kubelet filled (mesh.lab.volumes) at its mountPath, then
execs the rest: the container's process sees its volumes where its spec says, and nothing
outside its namespace does (the host's file system keeps only the empty mountpoints the
kubelet made, removed with the pod).

A container's root would be its image's; here it is the host's, which the lab's own
programs run from. So a volume whose mountPath is a host directory with files in it (CoreDNS
mounts its Corefile at /root, where this machine's Python lives) is laid over it with
overlayfs, the volume on top (and written to), rather than hiding it.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> None:
    if "--" not in argv:
        sys.exit("usage: sandbox [--mount SOURCE:TARGET[:ro]]... -- COMMAND...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    mounts = [options[i + 1] for i, o in enumerate(options) if o == "--mount"]
    for spec in mounts:
        source, target, *flags = spec.split(":")
        if os.path.isdir(source) and os.path.isdir(target) and os.listdir(target):
            work = source.rstrip("/") + ".overlay-work"
            os.makedirs(work, exist_ok=True)
            layers = (f"lowerdir={source}:{target}" if "ro" in flags else
                       f"lowerdir={target},upperdir={source},workdir={work}")
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", layers, target],
                           check=True)
            continue
        subprocess.run(["mount", "--bind", source, target], check=True)
        if "ro" in flags:
            subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)
    if not command:
        sys.exit("sandbox: no command")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
