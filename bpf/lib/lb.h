/* Service load balancing maps, laid out as Cilium's bpf/lib/lb.h lays out its own.
 *
 * A service is one (address, port, protocol) frontend. Its entries in `mesh_services` are
 * slot 0, the frontend (how many backends, flags, the reverse-NAT index), and slots 1..N,
 * one per backend (the backend's id). Picking a backend is one lookup for the frontend,
 * `prandom % count + 1` for the slot, one lookup for the slot, one for the backend: updating
 * one service touches only that service's entries, however many services there are.
 *
 * The Python side mirrors every struct here in mesh/datapath/layout.py; a test compares
 * the two layouts field by field. */
#ifndef MESH_LB_H
#define MESH_LB_H

#include "common.h"

#define MESH_LB_MAX_SERVICES 65536   /* frontends x (1 + backends) entries */
#define MESH_LB_MAX_BACKENDS 65536
#define MESH_LB_MAX_SOCKETS 262144
#define MESH_LB_MAX_XLATE 16384
#define MESH_LB_MAX_MAGLEV 4096      /* services balanced by Maglev */
/* Maglev table size: a prime, Cilium's default. A flow moves to another backend when one is
 * added or removed with probability close to the ideal 1/N while M >> 100 N. */
#define MESH_MAGLEV_M 16381

struct lb4_key {
	__be32 address;      /* the frontend's IPv4 address (ClusterIP) */
	__be16 dport;        /* its port, network byte order */
	__u16 backend_slot;  /* 0: the frontend itself; 1..count: its backends */
	__u8 proto;          /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];
};

struct lb4_service {
	__u32 backend_id;    /* slots 1..count: the backend; slot 0: unused */
	__u16 count;         /* slot 0: how many backend slots follow */
	__u16 rev_nat_index; /* slot 0: this frontend's reverse-NAT entry */
	__u8 flags;          /* slot 0: MESH_SVC_* */
	__u8 pad;
	__be16 proxy_port;   /* slot 0, MESH_SVC_L7: the node Envoy's mesh listener port */
};

#define MESH_SVC_LOCAL_ONLY 0x1  /* reserved: traffic policy Local */
#define MESH_SVC_MAGLEV 0x2      /* packets pick their backend from the Maglev table */
#define MESH_SVC_EXTERNAL 0x4    /* a NodePort on this node's address: balanced at tc too */
#define MESH_SVC_L7 0x8          /* L7 configuration applies: TCP goes to the node's Envoy */

struct lb4_backend {
	__be32 address;      /* the backend's (pod's) IPv4 address */
	__be16 port;         /* its port, network byte order */
	__u8 proto;
	__u8 flags;          /* reserved */
};

struct lb4_reverse_nat {
	__be32 address;      /* the frontend, as the client asked for it */
	__be16 port;
	__u16 pad;
};

/* A connected socket's frontend, by socket cookie: what getpeername() and a UDP reply's
 * source must show instead of the backend. */
struct lb4_sock_rev {
	__be32 address;          /* the frontend */
	__be16 port;
	__u16 rev_nat_index;
	__be32 backend_address;  /* the backend the socket was sent to: only a peer that is */
	__be16 backend_port;     /* this backend is shown as the frontend */
	__u16 pad;
};

/* A Maglev service's lookup table: entry i is the backend of the flows hashing to i. The
 * agent computes it (the same backends give the same table on every node) and replaces it
 * whole with one map update, so a packet sees the old table or the new one, never a mix. */
struct lb4_maglev {
	__u32 backend_ids[MESH_MAGLEV_M];
};

/* Frontends and their backend slots. */
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb4_service, mesh_services,
		 MESH_LB_MAX_SERVICES, MESH_PINNED(mesh_services));
/* Backends by id (ids are the agent's, stable while a backend exists). */
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, mesh_backends, MESH_LB_MAX_BACKENDS,
		 MESH_PINNED(mesh_backends));
/* Reverse NAT: a frontend by its index. */
BPF_TABLE_PINNED("hash", __u16, struct lb4_reverse_nat, mesh_rev_nat, MESH_LB_MAX_SERVICES,
		 MESH_PINNED(mesh_rev_nat));
/* Connected sockets' frontends (LRU: a closed socket's entry ages out). */
BPF_TABLE_PINNED("lru_hash", __u64, struct lb4_sock_rev, mesh_sock_rev, MESH_LB_MAX_SOCKETS,
		 MESH_PINNED(mesh_sock_rev));

/* Sockets' translations, told to the flow tracking (flow.h): the frontend a connection was
 * balanced from, by the tuple its packets carry (client, backend). Written by the socket
 * load balancer once the socket's own port is known (TCP: sock_ops when connect() has
 * picked it; UDP: sendmsg(), the socket bound by then, its address 0 when bound to any),
 * taken (read and removed) by fwd.c at the connection's first packet. LRU: one whose
 * connection never showed, or written while flow tracking is off, ages out. */
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct lb4_reverse_nat, mesh_lb_xlate,
		 MESH_LB_MAX_XLATE, MESH_PINNED(mesh_lb_xlate));

/* Maglev tables by the frontend's reverse-NAT index (no prealloc: 64 KiB each, made only
 * for services that ask for Maglev). */
BPF_TABLE_PINNED("hash", __u16, struct lb4_maglev, mesh_maglev, MESH_LB_MAX_MAGLEV,
		 MESH_PINNED(mesh_maglev), BPF_F_NO_PREALLOC);

#endif
