/* Transparent encryption between nodes: which destinations are other nodes' pods (their pod
 * CIDRs, IPv4 and IPv6), whether the node has a working tunnel to them (a WireGuard peer, or
 * IPsec states and an out policy), and what strict mode drops.
 *
 * The agent's encryption sink (mesh/sinks/encryption.py for WireGuard, mesh/sinks/ipsec.py
 * for IPsec) writes the maps: a peer that is up has its pod CIDRs here with MESH_ENC_PEER_UP;
 * the strict mode's CIDRs without a peer (a node whose key is not known yet, or was refused,
 * and any CIDR the operator names) are here without it. A pod's packet to a destination
 * found with the flag goes straight to the WireGuard device (bpf_redirect: the kernel's
 * routing is skipped) or, with IPsec (MESH_ENC_XFRM), on to the kernel, whose xfrm policy
 * encrypts it (a redirect would skip xfrm); found without it, it is dropped and counted in
 * strict mode (it would leave in the clear), left to the kernel otherwise. Not found: not
 * another node's pod, left to the kernel.
 *
 * The node's own traffic to other nodes' pods (Envoy's connections to backends) takes the
 * agent's routing table instead: the same CIDRs through the device, or blackholed in strict
 * mode. Python mirrors these structs in mesh/datapath/layout.py. */
#ifndef MESH_ENCRYPT_H
#define MESH_ENCRYPT_H

#include "common.h"

#define MESH_ENC_PEER_UP 0x1

/* mesh_encrypt_config[0] */
struct encrypt_config {
	__u32 ifindex;       /* the WireGuard device; 0: none (IPsec, or encryption off) */
	__u32 flags;         /* MESH_ENC_STRICT, MESH_ENC_XFRM */
};

#define MESH_ENC_STRICT 0x1
#define MESH_ENC_XFRM 0x2    /* IPsec: up peers' packets go on to the kernel's xfrm */

struct encrypt4_key {
	__u32 prefixlen;
	__be32 address;
};

struct encrypt6_key {
	__u32 prefixlen;
	__u8 address[16];
};

struct encrypt_entry {
	__u32 flags;         /* MESH_ENC_PEER_UP */
};

#define MESH_ENCRYPT_MAX 16384

/* Other nodes' pod CIDRs (and strict mode's other CIDRs), IPv4. */
BPF_TABLE_PINNED("lpm_trie", struct encrypt4_key, struct encrypt_entry, mesh_encrypt4,
		 MESH_ENCRYPT_MAX, MESH_PINNED(mesh_encrypt4), BPF_F_NO_PREALLOC);
/* ... IPv6. */
BPF_TABLE_PINNED("lpm_trie", struct encrypt6_key, struct encrypt_entry, mesh_encrypt6,
		 MESH_ENCRYPT_MAX, MESH_PINNED(mesh_encrypt6), BPF_F_NO_PREALLOC);
/* [0]: the device and the mode. */
BPF_TABLE_PINNED("array", __u32, struct encrypt_config, mesh_encrypt_config, 1,
		 MESH_PINNED(mesh_encrypt_config));

/* Per CPU (mesh/datapath/layout.py ENCRYPT_STATS): [0] packets sent into the tunnel, [1]
 * IPv4 packets strict mode dropped (no peer), [2] IPv6 packets strict mode dropped. */
#define MESH_ENC_SENT 0
#define MESH_ENC_DROP4 1
#define MESH_ENC_DROP6 2
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mesh_encrypt_stats, 3,
		 MESH_PINNED(mesh_encrypt_stats));

#endif
