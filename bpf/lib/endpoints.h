/* Local endpoints: the pods of this node, by address. Filled by the agent from what the CNI
 * plugin made (a /32 route to the pod's host-side veth, a permanent neighbour entry with
 * the pod's MAC), so no API between the two is needed. */
#ifndef MESH_ENDPOINTS_H
#define MESH_ENDPOINTS_H

#include "common.h"

struct endpoint_info {
	__u32 ifindex;       /* the pod's host-side veth */
	__u8 pod_mac[6];     /* the pod's eth0 */
	__u8 host_mac[6];    /* the host-side veth's own */
	__u16 pad;
};

/* Pods of this node by IPv4 address (network byte order). */
BPF_TABLE_PINNED("hash", __be32, struct endpoint_info, mesh_endpoints, 4096,
		 MESH_PINNED(mesh_endpoints));
/* Packets per CPU: [0] redirected to a local pod, [1] left to the kernel, [2] NodePort
 * packets balanced (either direction), [3] handed to the node's Envoy. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mesh_fwd_stats, 4, MESH_PINNED(mesh_fwd_stats));

#endif
