/* Shared by every program of the mesh datapath. Compiled by bcc at agent start against the
 * kernel's UAPI headers only (no kernel internals), so Debian's linux-headers-amd64 serve
 * where the running kernel ships none. */
#ifndef MESH_COMMON_H
#define MESH_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

/* From the socket API (linux/net.h is not UAPI): the types a bpf_sock_addr carries. */
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#endif

/* Where the agent pins the maps (bpffs under its state directory): given with -D at
 * compile time, so an agent restart finds the same maps and keeps their contents. */
#ifndef MESH_PIN_DIR
#error "MESH_PIN_DIR must name the bpffs directory the maps are pinned in"
#endif

#define MESH_PINNED(name) MESH_PIN_DIR "/" #name

#endif
