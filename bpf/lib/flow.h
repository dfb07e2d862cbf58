/* Flow events: what the datapath did with each connection, told to the agent through a ring
 * buffer.
 *
 * The rate of events is bounded by design: a connection (TCP or UDP over IPv4, with a pod of
 * this node at one end) has one entry here, and an event is sent only when its state
 * changes: its first packet (NEW, with what was done with it), a direction's verdict
 * changing after that (a policy now drops it, say; a retried SYN dropped again is no
 * change), and its end (CLOSED: both FINs or a RST, with the packets and bytes each way).
 * An ordinary connection costs two events whatever its length.
 *
 * A program notes, as it goes, where the packet went (an observation point, as Hubble names
 * them) or why it was dropped (mesh_flow_note); its entry function hands the notes and its
 * return code to flow_observe(). The functions are in fwd.c: bcc rewrites the maps' calls in
 * the main source file only. A packet nobody noted is not tracked (the node's own traffic
 * on the underlay). */
#ifndef MESH_FLOW_H
#define MESH_FLOW_H

#include "common.h"
#include "nat.h"
#include <uapi/linux/tcp.h>

#define MESH_FLOW_MAX 131072
/* 4 MiB: some 50,000 events waiting for the agent. */
#define MESH_FLOW_RING_PAGES 1024

/* Observation points (flow.proto's TraceObservationPoint numbers). */
#define MESH_POINT_TO_PROXY 1
#define MESH_POINT_TO_STACK 3
#define MESH_POINT_TO_CRYPTO 13
#define MESH_POINT_TO_ENDPOINT 101

/* Drop reasons (flow.proto's DropReason numbers). */
#define MESH_REASON_POLICY_DENIED 133
#define MESH_REASON_ERROR_WRITING 141
#define MESH_REASON_NO_BACKEND 158
#define MESH_REASON_NO_NAT_PORT 167
#define MESH_REASON_INVALID_IDENTITY 171
#define MESH_REASON_NO_SOCKET 178
#define MESH_REASON_SOCKET_ASSIGN 179
#define MESH_REASON_UNENCRYPTED 195

/* Verdicts (flow.proto's Verdict numbers). */
#define MESH_VERDICT_FORWARDED 1
#define MESH_VERDICT_DROPPED 2
#define MESH_VERDICT_REDIRECTED 5

/* Event types. */
#define MESH_FLOW_NEW 1
#define MESH_FLOW_CHANGED 2
#define MESH_FLOW_CLOSED 3

/* Entry flags. */
#define MESH_FLOW_FIN0 0x1     /* the initiator sent its FIN */
#define MESH_FLOW_FIN1 0x2     /* the responder sent its FIN */
#define MESH_FLOW_ENDED 0x4    /* CLOSED was sent */

/* A connection is keyed by its initiator's tuple (its first packet's; a SYN-ACK seen first
 * is a reply, and keys its connection the other way round): a struct ct4_key, the tuple as
 * the wire carries it (lib/common.h). */

struct flow_entry {
	__u64 packets[2];    /* [0] initiator -> responder, [1] the replies */
	__u64 bytes[2];
	__u8 verdict[2];     /* each direction's last verdict (0: no packet yet) */
	__u8 reason[2];      /* with DROPPED */
	__u8 flags;          /* MESH_FLOW_* */
	__u8 pad[3];
};

/* What the agent reads from the ring. */
struct flow_event {
	__u64 time_ns;       /* CLOCK_MONOTONIC */
	struct ct4_key key;
	__u64 packets[2];
	__u64 bytes[2];
	__u32 ifindex;       /* the device the packet came in on */
	__u8 type;           /* MESH_FLOW_NEW, _CHANGED, _CLOSED */
	__u8 verdict;        /* of the packet that caused the event */
	__u8 reason;         /* with DROPPED */
	__u8 point;          /* where that packet went */
	__u8 is_reply;       /* it went responder -> initiator */
	__u8 tcp_flags;      /* its TCP flags (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) */
	__u8 policy;         /* with a policy drop: whose (MESH_FLOW_POLICY_*), else 0 */
	__u8 pad;
	__be16 xlate_port;   /* NEW of a connection balanced at its socket: the frontend it */
	__u16 pad2;          /* was translated from (lib/lb.h), else 0 */
	__be32 xlate_address;
	__u32 pad3;
};

/* [0] enabled (1) or not (0): the agent's switch; off, nothing is tracked or sent. */
struct flow_config {
	__u32 enabled;
};

/* The connections seen, LRU: an idle one ages out when the table is full. */
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct flow_entry, mesh_flows, MESH_FLOW_MAX,
		 MESH_PINNED(mesh_flows));
BPF_TABLE_PINNED("array", __u32, struct flow_config, mesh_flow_config, 1,
		 MESH_PINNED(mesh_flow_config));
/* Events per CPU: [0] sent, [1] lost (the ring was full: the agent counts and tells them). */
#define MESH_FLOW_SENT 0
#define MESH_FLOW_LOST 1
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mesh_flow_stats, 2,
		 MESH_PINNED(mesh_flow_stats));
/* The events themselves; not pinned: the agent that loaded the programs reads it. */
BPF_RINGBUF_OUTPUT(mesh_flow_events, MESH_FLOW_RING_PAGES);

/* The packet at hand's notes, per CPU (a program runs to its end on one CPU); written afresh
 * at each program's start. The packet's control block would do without a lookup, but clang
 * turns its accesses into pointer arithmetic on the context, which the verifier refuses. */
struct flow_note {
	__u8 point;
	__u8 reason;
	__u8 policy;         /* with a policy drop: which side's (MESH_FLOW_POLICY_*) */
};
#define MESH_FLOW_POLICY_INGRESS 1  /* the receiving pod's ingress policy */
#define MESH_FLOW_POLICY_EGRESS 2   /* the sending pod's egress policy */
BPF_PERCPU_ARRAY(mesh_flow_note, struct flow_note, 1);

#endif
