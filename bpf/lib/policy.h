/* Network policy: identities and verdicts, laid out as Cilium's bpf/lib/policy.h lays out its
 * own.
 *
 * A packet's peer is known by its security identity: the ipcache (an LPM trie, so that pod
 * /32s, node addresses and the CIDRs policies name all fit) gives, for an address, the
 * identity of what holds it (a pod's label set, the host, another node, the world) and its CIDR
 * identity (the longest CIDR any policy names that holds it, 0: none). An ipBlock therefore
 * selects pods as well as the world, as Kubernetes' NetworkPolicy wants.
 *
 * Each local pod has an entry in mesh_policy_endpoints (isolated for ingress, egress), its
 * ClusterNetworkPolicy tiers in mesh_policy_admin and mesh_policy_baseline, and its
 * NetworkPolicies' allowed peers in mesh_policy: {pod, identity, direction, protocol, port} -> allow, an LPM trie
 * so that "every protocol", "every port" and port ranges (split into prefixes) are single
 * entries. A new flow costs up to three lookups there: the peer's identity, its CIDR identity,
 * and 0 (any peer).
 *
 * The verdict is taken at a flow's first packet and kept in mesh_policy_ct (per direction, so
 * that the reply of an allowed flow passes the other end's check): later packets cost one
 * lookup. An entry carries the policy revision it was decided under; the agent bumps the
 * revision after every change of the maps, and a packet of a flow decided under an older one is
 * decided again and the entry keeps the new verdict: a flow no longer allowed is dropped both
 * ways (its entry stays, denied, so that no packet of it passes as a new flow of the other
 * end). So a change takes effect for every packet at once and never drops a flow it still
 * allows.
 *
 * The Python side mirrors every struct here in mesh/datapath/layout.py. The functions that use
 * the maps are in fwd.c: bcc rewrites map calls in the program's own file only. */
#ifndef MESH_POLICY_H
#define MESH_POLICY_H

#include "common.h"
#include "nat.h"

/* Reserved identities (mesh/policy/identities.py). */
#define MESH_ID_ANY 0
#define MESH_ID_HOST 1
#define MESH_ID_WORLD 2
#define MESH_ID_UNMANAGED 3

#define MESH_POLICY_INGRESS 0
#define MESH_POLICY_EGRESS 1

#define MESH_IPCACHE_MAX 131072
#define MESH_POLICY_MAX 262144
#define MESH_POLICY_ENDPOINTS_MAX 4096
#define MESH_POLICY_CT_MAX 262144

struct ipcache_key {
	__u32 prefixlen;     /* 0-32 */
	__be32 address;
};

struct ipcache_info {
	__u32 identity;      /* the holder's: a label set's (256-65535) or a reserved one */
	__u32 cidr_identity; /* the longest CIDR a policy names that holds it; 0: none */
};

struct policy_endpoint {
	__u32 identity;      /* the pod's own (for the counters and `mesh policy`) */
	__u8 flags;          /* MESH_EP_* */
	__u8 pad[3];
};

#define MESH_EP_INGRESS_ISOLATED 0x1
#define MESH_EP_EGRESS_ISOLATED 0x2
#define MESH_EP_ADMIN 0x4        /* ClusterNetworkPolicy Admin tier entries exist for it */
#define MESH_EP_BASELINE 0x8     /* ... Baseline tier entries */
#define MESH_EP_FQDN 0x10        /* its egress policy names DNS names (mesh_policy_fqdn) */

/* Compared bit by bit from `endpoint` on: prefixlen 72 = any protocol and port, 80 = any port
 * of one protocol, 96 = one port; between 80 and 96, a range of ports. */
struct policy_key {
	__u32 prefixlen;
	__be32 endpoint;     /* the local pod */
	__u32 identity;      /* the peer: a label set's, reserved, CIDR, or 0 = any */
	__u8 direction;      /* MESH_POLICY_INGRESS | MESH_POLICY_EGRESS */
	__u8 proto;
	__be16 dport;
};

struct policy_entry {
	__u8 flags;          /* MESH_POLICY_ALLOW */
	__u8 pad;
	/* Ingress: L7 rules apply, the node Envoy's policy listener. Egress: the node's DNS
	 * proxy (the pod's DNS, for its toFQDNs rules). 0: none. */
	__be16 proxy_port;
};

/* An address a pod's toFQDNs rules allow, learned by the node's DNS proxy from the answers
 * to the pod's (or any pod's) queries, for the records' TTL: the agent removes it when they
 * expire. Compared bit by bit from `endpoint` on: prefixlen 64 = any protocol and port, 80 =
 * any port of one protocol (the pad is always 0), 96 = one port; between, a range of ports. */
struct fqdn_key {
	__u32 prefixlen;
	__be32 endpoint;     /* the local pod */
	__be32 address;      /* the peer's address, as a DNS answer gave it */
	__u8 proto;
	__u8 pad;            /* 0 */
	__be16 dport;
};

#define MESH_POLICY_ALLOW 0x1

/* A ClusterNetworkPolicy tier's entry: the action of the first rule (lowest precedence)
 * covering this key's protocol and ports. Of the entries the lookups find (the peer's
 * identity, its CIDR identity, any), the lowest precedence decides. */
struct tier_entry {
	__u8 action;         /* MESH_TIER_* */
	__u8 pad[3];
	__u32 precedence;
};

#define MESH_TIER_ACCEPT 1
#define MESH_TIER_DENY 2
#define MESH_TIER_PASS 3

/* A flow as its first packet had it, and the direction (of the local pod) it was decided
 * for. */
struct policy_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 direction;
	__u8 pad[2];
};

struct policy_ct_entry {
	__u32 revision;      /* the policy revision the verdict was taken under */
	__u8 allowed;        /* the verdict: 0 drops the flow's packets both ways */
	__u8 pad;
	__be16 proxy_port;   /* allowed through the node's Envoy (L7 rules) on this port; 0: not */
};

/* Address -> identity (pods of every node, nodes, CIDRs of policies). */
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_info, mesh_ipcache,
		 MESH_IPCACHE_MAX, MESH_PINNED(mesh_ipcache), BPF_F_NO_PREALLOC);
/* This node's pods: isolation. A pod missing here is one the agent has not seen yet: not
 * isolated (Kubernetes allows a pod to start before its policies apply). */
BPF_TABLE_PINNED("hash", __be32, struct policy_endpoint, mesh_policy_endpoints,
		 MESH_POLICY_ENDPOINTS_MAX, MESH_PINNED(mesh_policy_endpoints));
/* Allowed peers of this node's pods. */
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_entry, mesh_policy,
		 MESH_POLICY_MAX, MESH_PINNED(mesh_policy), BPF_F_NO_PREALLOC);
/* Addresses this node's pods may reach by their toFQDNs rules (struct fqdn_key). */
BPF_TABLE_PINNED("lpm_trie", struct fqdn_key, struct policy_entry, mesh_policy_fqdn,
		 MESH_POLICY_MAX, MESH_PINNED(mesh_policy_fqdn), BPF_F_NO_PREALLOC);
/* ClusterNetworkPolicy: the Admin tier (before NetworkPolicy) and the Baseline tier (after),
 * keyed as mesh_policy. */
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct tier_entry, mesh_policy_admin,
		 MESH_POLICY_MAX, MESH_PINNED(mesh_policy_admin), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct tier_entry, mesh_policy_baseline,
		 MESH_POLICY_MAX, MESH_PINNED(mesh_policy_baseline), BPF_F_NO_PREALLOC);
/* Verdicts of flows, by their first packet's tuple and direction (LRU: idle flows age out;
 * a flow whose entry aged out is decided again). */
BPF_TABLE_PINNED("lru_hash", struct policy_ct_key, struct policy_ct_entry, mesh_policy_ct,
		 MESH_POLICY_CT_MAX, MESH_PINNED(mesh_policy_ct));
/* [0]: the policy revision, bumped by the agent after it changed the maps. */
BPF_TABLE_PINNED("array", __u32, __u32, mesh_policy_revision, 1,
		 MESH_PINNED(mesh_policy_revision));

/* Drops per CPU by reason (mesh/datapath/layout.py DROP_REASONS): [0] denied by the
 * destination's ingress policy, [1] by the source's egress policy, [2] of those, the peer had
 * no identity yet; [3] packets allowed as new flows, [4] flows decided again after a change. */
#define MESH_DROP_INGRESS 0
#define MESH_DROP_EGRESS 1
#define MESH_DROP_NO_IDENTITY 2
#define MESH_POLICY_NEW 3
#define MESH_POLICY_REDECIDED 4
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mesh_policy_stats, 5,
		 MESH_PINNED(mesh_policy_stats));

/* Any IPv4 packet's addresses, protocol and ports (0 for a protocol without ports and for a
 * fragment after the first: such packets match only rules without ports). 0: not IPv4. */
static __always_inline int policy_parse(struct __sk_buff *skb, struct flow4 *f)
{
	struct iphdr ip;
	__be16 ports[2] = {};
	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
	    ip.ihl < 5)
		return 0;
	f->saddr = ip.saddr;
	f->daddr = ip.daddr;
	f->proto = ip.protocol;
	f->l4_off = ETH_HLEN + ip.ihl * 4;
	if ((ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP ||
	     ip.protocol == IPPROTO_SCTP) && !(ip.frag_off & bpf_htons(0x1fff)))
		bpf_skb_load_bytes(skb, f->l4_off, ports, sizeof(ports));
	f->sport = ports[0];
	f->dport = ports[1];
	return 1;
}

#endif
