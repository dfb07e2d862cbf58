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

/* A packet's tuple as it is seen on the wire, in network byte order: the key of connection
 * tracking (ct.h), of the flows (flow.h) and of the socket load balancer's translations
 * (lb.h). */
struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Packet marks (Cilium's layout: the magic in bits 8-11).
 * TO_PROXY: set on a packet handed to the node's Envoy, so that the policy route
 * (fwmark 0x200/0xf00 -> table 2004: local default dev lo) delivers it locally although its
 * destination is a ClusterIP. FROM_PROXY: Envoy's own upstream sockets (SO_MARK), never
 * handed to Envoy again. */
#define MESH_MARK_MASK 0xf00
#define MESH_MARK_TO_PROXY 0x200
#define MESH_MARK_FROM_PROXY 0xb00

#endif
