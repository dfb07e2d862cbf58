/* Connection tracking for the flows balanced at tc (NodePort from outside the node).
 *
 * Socket-level balancing needs none (a socket is rewritten once, at connect). A packet
 * arriving on the underlay for a NodePort is rewritten per packet, so its flow is recorded:
 * the forward entry keeps every later packet on the backend the first one chose (also once
 * the backend stops taking new flows), the reverse entry rewrites the replies back. Both
 * are LRU maps: an idle flow's entries age out when the table is full. */
#ifndef MESH_CT_H
#define MESH_CT_H

#include "common.h"

#define MESH_CT_MAX 262144
/* Source ports for SNAT towards a backend on another node: above Linux's default
 * ephemeral range (32768-60999), so the node's own sockets do not take them. */
#define MESH_NAT_PORT_MIN 61000
#define MESH_NAT_PORT_COUNT 4536
#define MESH_NAT_PORT_TRIES 8

/* Forward: client -> frontend becomes client (or this node, SNAT) -> backend. */
struct ct4_entry {
	__be32 backend_address;
	__be16 backend_port;
	__be16 nat_port;       /* 0: the client's address is kept (the backend is local) */
	__be32 nat_address;    /* this node's address the flow came in on, with nat_port */
};

/* Reverse: what a reply's source and destination become. */
struct ct4_rev {
	__be32 saddr;          /* the frontend */
	__be32 daddr;          /* the client */
	__be16 sport;
	__be16 dport;
};

/* Forward entries by the client's tuple. */
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct ct4_entry, mesh_ct4, MESH_CT_MAX,
		 MESH_PINNED(mesh_ct4));
/* Reverse entries by the reply's tuple (backend -> client, or backend -> this node's NAT
 * port). */
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct ct4_rev, mesh_ct4_rev, MESH_CT_MAX,
		 MESH_PINNED(mesh_ct4_rev));

#endif
