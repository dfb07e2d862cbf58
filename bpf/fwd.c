/* Forwarding and NodePort at tc ingress.
 *
 * mesh_from_pod, on each pod's host-side veth (packets the pod sends): a TCP packet to a
 * Service port with L7 configuration is handed to the node's Envoy (bpf_sk_assign to the
 * connection's socket, or for a new connection to the mesh listener; the packet itself is
 * not rewritten, so Envoy sees the original source and destination); a reply of a NodePort
 * flow balanced here gets its frontend back as source and goes out by the FIB; a packet to
 * a pod of this node has its Ethernet header rewritten and is redirected into that pod's
 * namespace with bpf_redirect_peer, skipping the node's IP stack (kernel commit
 * 9aa1206e8f48 measured 122 us -> 44 us per TCP_RR round trip). Anything else (another
 * node's pod, the node itself) goes on to the kernel, which routes it over the underlay.
 *
 * mesh_from_underlay, on the node's underlay device (packets from other nodes and from
 * outside): a packet to a NodePort of this node is balanced here, per packet, with
 * connection tracking (lib/ct.h): to a local backend it keeps the client's address, to a
 * backend on another node it is SNATed to this node so the reply comes back through it.
 * Replies to that SNAT are rewritten back; packets for a local pod are redirected as above.
 *
 * mesh_to_pod, at tc egress of each pod's host-side veth (packets the kernel routes to the
 * pod: from the node itself, or whatever did not come by bpf_redirect_peer).
 *
 * Network policy (lib/policy.h) is enforced at the pods' ends: a pod's egress where it sends
 * (mesh_from_pod), its ingress where a packet is delivered to it (to_local_pod, mesh_to_pod).
 * A packet that policy drops goes no further.
 *
 * Each entry function notes where the packet went or why it was dropped (lib/flow.h) and
 * ends with flow_observe(), which turns changes of a connection's state into flow events. */
#include "lib/common.h"
#include "lib/ct.h"
#include "lib/encrypt.h"
#include "lib/endpoints.h"
#include "lib/flow.h"
#include "lib/lb.h"
#include "lib/nat.h"
#include "lib/policy.h"

#define STAT_LOCAL 0     /* redirected to a pod of this node */
#define STAT_KERNEL 1    /* left to the kernel */
#define STAT_NODEPORT 2  /* a NodePort packet balanced (either direction) */
#define STAT_PROXY 3     /* handed to the node's Envoy */

static __always_inline void count(__u32 i)
{
	__u64 *n = mesh_fwd_stats.lookup(&i);
	if (n)
		*n += 1;
}

/* -- flow events (lib/flow.h) -- */

static __always_inline void flow_begin(__u8 point)
{
	__u32 zero = 0;
	struct flow_note *n = mesh_flow_note.lookup(&zero);
	if (n) {
		n->point = point;
		n->reason = 0;
		n->policy = 0;
	}
}

static __always_inline void flow_point(__u8 point)
{
	__u32 zero = 0;
	struct flow_note *n = mesh_flow_note.lookup(&zero);
	if (n)
		n->point = point;
}

/* Returns TC_ACT_SHOT, so a drop reads `return flow_drop(REASON);`. */
static __always_inline int flow_drop(__u8 reason)
{
	__u32 zero = 0;
	struct flow_note *n = mesh_flow_note.lookup(&zero);
	if (n)
		n->reason = reason;
	return TC_ACT_SHOT;
}

/* A policy's drop: its reason, and whose policy it was. */
static __always_inline void flow_policy_drop(__u8 reason, __u8 direction)
{
	__u32 zero = 0;
	struct flow_note *n = mesh_flow_note.lookup(&zero);
	if (n) {
		n->reason = reason;
		n->policy = direction == MESH_POLICY_INGRESS ? MESH_FLOW_POLICY_INGRESS
							     : MESH_FLOW_POLICY_EGRESS;
	}
}

static __always_inline __u8 flow_dropped(void)
{
	__u32 zero = 0;
	struct flow_note *n = mesh_flow_note.lookup(&zero);
	return n ? n->reason : 0;
}

static __always_inline void flow_count(__u32 i)
{
	__u64 *n = mesh_flow_stats.lookup(&i);
	if (n)
		*n += 1;
}

static __always_inline void flow_send(struct ct4_key *k, struct flow_entry *e, __u8 type,
				      __u8 verdict, struct flow_note *note, __u8 is_reply,
				      __u8 tcp_flags, __u32 ifindex, struct lb4_reverse_nat *xlate)
{
	struct flow_event ev = { .time_ns = bpf_ktime_get_ns(), .key = *k, .type = type,
				 .verdict = verdict, .reason = note->reason, .point = note->point,
				 .is_reply = is_reply, .tcp_flags = tcp_flags, .ifindex = ifindex,
				 .policy = note->policy };
	if (xlate) {
		ev.xlate_address = xlate->address;
		ev.xlate_port = xlate->port;
	}
	ev.packets[0] = e->packets[0];
	ev.packets[1] = e->packets[1];
	ev.bytes[0] = e->bytes[0];
	ev.bytes[1] = e->bytes[1];
	if (mesh_flow_events.ringbuf_output(&ev, sizeof(ev), 0) < 0)
		flow_count(MESH_FLOW_LOST);
	else
		flow_count(MESH_FLOW_SENT);
}

/* The frontend the socket load balancer translated a new connection from (lib/lb.h), taken
 * out of mesh_lb_xlate into `out`; 0 when it was not balanced at its socket. */
static __always_inline int flow_xlate(struct ct4_key *k, struct lb4_reverse_nat *out)
{
	struct ct4_key found = *k;
	struct lb4_reverse_nat *x = mesh_lb_xlate.lookup(&found);
	if (!x && k->proto == IPPROTO_UDP) {
		found.saddr = 0;  /* a datagram socket bound to any address */
		x = mesh_lb_xlate.lookup(&found);
	}
	if (!x)
		return 0;
	*out = *x;
	mesh_lb_xlate.delete(&found);
	return 1;
}

/* After a program decided (`action`, its return code): account the packet to its
 * connection and send what changed. */
static __always_inline void flow_observe(struct __sk_buff *skb, int action)
{
	__u32 zero = 0;
	struct flow_note *note = mesh_flow_note.lookup(&zero);
	if (!note || (!note->point && !note->reason))
		return;
	__u8 point = note->point;
	__u8 reason = note->reason;
	struct flow_config *cfg = mesh_flow_config.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return;
	struct flow4 f = {};
	if (!flow4_parse(skb, &f))
		return;
	__u8 tcp_flags = 0;
	if (f.proto == IPPROTO_TCP)
		bpf_skb_load_bytes(skb, f.l4_off + 13, &tcp_flags, 1);
	__u8 verdict = action == TC_ACT_SHOT ? MESH_VERDICT_DROPPED
		     : point == MESH_POINT_TO_PROXY ? MESH_VERDICT_REDIRECTED
						    : MESH_VERDICT_FORWARDED;
	if (verdict != MESH_VERDICT_DROPPED) {
		reason = 0;
		note->reason = 0;
		note->policy = 0;
	}

	struct ct4_key k = { .saddr = f.saddr, .daddr = f.daddr, .sport = f.sport,
			      .dport = f.dport, .proto = f.proto };
	struct ct4_key rk = { .saddr = f.daddr, .daddr = f.saddr, .sport = f.dport,
			       .dport = f.sport, .proto = f.proto };
	__u8 dir = 0;
	struct flow_entry *e = mesh_flows.lookup(&k);
	if (!e) {
		e = mesh_flows.lookup(&rk);
		if (e) {
			dir = 1;
			k = rk;
		}
	}
	/* A SYN (without ACK) from the initiator of an ended connection: its tuple used again. */
	if (e && (e->flags & MESH_FLOW_ENDED) && !dir && (tcp_flags & 0x12) == 0x02)
		e = 0;
	if (!e) {
		struct flow_entry fresh = {};
		if ((tcp_flags & 0x12) == 0x12) {  /* a SYN-ACK first: the reply way */
			dir = 1;
			k = rk;
		}
		/* constant indexes: a variable one on the stack becomes pointer arithmetic the
		 * verifier refuses */
		if (dir) {
			fresh.packets[1] = 1;
			fresh.bytes[1] = skb->len;
			fresh.verdict[1] = verdict;
			fresh.reason[1] = reason;
		} else {
			fresh.packets[0] = 1;
			fresh.bytes[0] = skb->len;
			fresh.verdict[0] = verdict;
			fresh.reason[0] = reason;
		}
		mesh_flows.update(&k, &fresh);
		struct lb4_reverse_nat xlate = {};
		int translated = !dir && flow_xlate(&k, &xlate);
		flow_send(&k, &fresh, MESH_FLOW_NEW, verdict, note, dir, tcp_flags,
			  skb->ingress_ifindex, translated ? &xlate : 0);
		return;
	}
	__sync_fetch_and_add(&e->packets[dir], 1);
	__sync_fetch_and_add(&e->bytes[dir], skb->len);
	if (e->verdict[dir] != verdict || e->reason[dir] != reason) {
		__u8 was = e->verdict[dir];
		e->verdict[dir] = verdict;
		e->reason[dir] = reason;
		/* The replies' first verdict is no change, unless they are dropped. */
		if (was || verdict == MESH_VERDICT_DROPPED)
			flow_send(&k, e, MESH_FLOW_CHANGED, verdict, note, dir, tcp_flags,
				  skb->ingress_ifindex, 0);
	}
	if (f.proto != IPPROTO_TCP || (e->flags & MESH_FLOW_ENDED))
		return;
	if (tcp_flags & 0x01)
		e->flags |= dir ? MESH_FLOW_FIN1 : MESH_FLOW_FIN0;
	if ((tcp_flags & 0x04) ||
	    (e->flags & (MESH_FLOW_FIN0 | MESH_FLOW_FIN1)) == (MESH_FLOW_FIN0 | MESH_FLOW_FIN1)) {
		e->flags |= MESH_FLOW_ENDED;
		flow_send(&k, e, MESH_FLOW_CLOSED, verdict, note, dir, tcp_flags,
			  skb->ingress_ifindex, 0);
	}
}

/* -- transparent encryption (lib/encrypt.h) -- */

static __always_inline void encrypt_count(__u32 i)
{
	__u64 *n = mesh_encrypt_stats.lookup(&i);
	if (n)
		*n += 1;
}

/* A pod's packet to another node's pod: into the WireGuard device when its peer is up (with
 * IPsec, counted and left to the kernel's xfrm); in strict mode dropped (and counted) when
 * not, as it would leave in the clear. -1: the caller goes on (not another node's pod,
 * encryption off, or IPsec's up peer). */
static __always_inline int to_tunnel(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct encrypt_config *cfg = mesh_encrypt_config.lookup(&zero);
	if (!cfg || !(cfg->ifindex || cfg->flags))
		return -1;
	struct encrypt_entry *e = 0;
	__u32 drop = MESH_ENC_DROP4;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct encrypt4_key k = { .prefixlen = 32 };
		if (bpf_skb_load_bytes(skb, MESH_IP_OFF(daddr), &k.address, sizeof(k.address)) < 0)
			return -1;
		e = mesh_encrypt4.lookup(&k);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		/* the IPv6 header's destination address: 24 bytes in */
		struct encrypt6_key k = { .prefixlen = 128 };
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 24, k.address, sizeof(k.address)) < 0)
			return -1;
		e = mesh_encrypt6.lookup(&k);
		drop = MESH_ENC_DROP6;
	}
	if (!e)
		return -1;
	if ((e->flags & MESH_ENC_PEER_UP) && (cfg->flags & MESH_ENC_XFRM)) {
		encrypt_count(MESH_ENC_SENT);
		flow_point(MESH_POINT_TO_CRYPTO);
		return -1;
	}
	if ((e->flags & MESH_ENC_PEER_UP) && cfg->ifindex) {
		encrypt_count(MESH_ENC_SENT);
		flow_point(MESH_POINT_TO_CRYPTO);
		return bpf_redirect(cfg->ifindex, 0);
	}
	if (cfg->flags & MESH_ENC_STRICT) {
		encrypt_count(drop);
		return flow_drop(MESH_REASON_UNENCRYPTED);
	}
	return -1;
}

/* -- network policy (lib/policy.h) -- */

static __always_inline void policy_count(__u32 i)
{
	__u64 *n = mesh_policy_stats.lookup(&i);
	if (n)
		*n += 1;
}

static __always_inline struct ipcache_info policy_peer(__be32 address)
{
	struct ipcache_key k = { .prefixlen = 32, .address = address };
	struct ipcache_info *info = mesh_ipcache.lookup(&k);
	struct ipcache_info out = { .identity = MESH_ID_WORLD };
	if (info)
		out = *info;
	return out;
}

/* Whether `endpoint`'s NetworkPolicies (and MeshNetworkPolicies) allow `peer` in `direction`
 * to the destination port: 0 no; 1 yes; above 1, yes through a proxy of the node on that
 * port. Ingress: the node Envoy's policy listener (L7 rules), and an allow without L7 rules,
 * found by any of the lookups, wins. Egress: the DNS proxy, which wins (it only looks: the
 * pod's toFQDNs rules learn from the answers). */
static __always_inline int policy_allows(__be32 endpoint, __u8 direction,
					 struct ipcache_info *peer, __u8 proto, __be16 dport)
{
	struct policy_key k = { .prefixlen = 96, .endpoint = endpoint, .direction = direction,
				.proto = proto, .dport = dport };
	__u32 ids[3] = { peer->identity, peer->cidr_identity, MESH_ID_ANY };
	int verdict = 0;
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (i == 1 && !ids[1])
			continue;
		k.identity = ids[i];
		struct policy_entry *e = mesh_policy.lookup(&k);
		if (!e || !(e->flags & MESH_POLICY_ALLOW))
			continue;
		if (!e->proxy_port) {
			if (direction == MESH_POLICY_INGRESS)
				return 1;  /* a plain allow wins over L7 rules */
			verdict = 1;
			continue;
		}
		if (direction == MESH_POLICY_EGRESS)
			return bpf_ntohs(e->proxy_port);  /* the DNS proxy wins */
		verdict = bpf_ntohs(e->proxy_port);
	}
	return verdict;
}

/* Whether `endpoint`'s toFQDNs rules allow sending to `address` (an answer of the node's DNS
 * proxy gave it, and its TTL has not run out). */
static __always_inline int fqdn_allows(__be32 endpoint, __be32 address, __u8 proto,
				       __be16 dport)
{
	struct fqdn_key k = { .prefixlen = 96, .endpoint = endpoint, .address = address,
			      .proto = proto, .dport = dport };
	struct policy_entry *e = mesh_policy_fqdn.lookup(&k);
	return e && (e->flags & MESH_POLICY_ALLOW);
}

/* A tier's action for a flow (0: no entry), the lowest precedence of the three lookups. The
 * two tiers' maps get a function each: bcc resolves a map by its name at each call. */
static __always_inline int admin_action(__be32 endpoint, __u8 direction,
					struct ipcache_info *peer, __u8 proto, __be16 dport)
{
	struct policy_key k = { .prefixlen = 96, .endpoint = endpoint, .direction = direction,
				.proto = proto, .dport = dport };
	__u32 ids[3] = { peer->identity, peer->cidr_identity, MESH_ID_ANY };
	__u32 best = 0xffffffff;
	int action = 0;
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (i == 1 && !ids[1])
			continue;
		k.identity = ids[i];
		struct tier_entry *e = mesh_policy_admin.lookup(&k);
		if (e && e->precedence < best) {
			best = e->precedence;
			action = e->action;
		}
	}
	return action;
}

static __always_inline int baseline_action(__be32 endpoint, __u8 direction,
					   struct ipcache_info *peer, __u8 proto, __be16 dport)
{
	struct policy_key k = { .prefixlen = 96, .endpoint = endpoint, .direction = direction,
				.proto = proto, .dport = dport };
	__u32 ids[3] = { peer->identity, peer->cidr_identity, MESH_ID_ANY };
	__u32 best = 0xffffffff;
	int action = 0;
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (i == 1 && !ids[1])
			continue;
		k.identity = ids[i];
		struct tier_entry *e = mesh_policy_baseline.lookup(&k);
		if (e && e->precedence < best) {
			best = e->precedence;
			action = e->action;
		}
	}
	return action;
}

/* A new flow's verdict for the local pod's side: the host always reaches its own pods
 * (kubelet's probes: Kubernetes says a pod cannot block its node); then the Admin tier
 * (Accept, Deny; Pass goes on), the NetworkPolicies if they isolate the pod, the Baseline
 * tier; nothing decided: allowed. */
static __always_inline int policy_decide(struct policy_endpoint *ep, __be32 local,
					 __be32 remote, __u8 direction, struct ipcache_info *peer,
					 __u8 proto, __be16 dport)
{
	if (direction == MESH_POLICY_INGRESS && peer->identity == MESH_ID_HOST)
		return 1;
	if (ep->flags & MESH_EP_ADMIN) {
		int a = admin_action(local, direction, peer, proto, dport);
		if (a == MESH_TIER_ACCEPT)
			return 1;
		if (a == MESH_TIER_DENY)
			return 0;
	}
	__u8 isolated = direction == MESH_POLICY_INGRESS ? MESH_EP_INGRESS_ISOLATED
							 : MESH_EP_EGRESS_ISOLATED;
	if (ep->flags & isolated) {
		int v = policy_allows(local, direction, peer, proto, dport);
		if (!v && direction == MESH_POLICY_EGRESS && (ep->flags & MESH_EP_FQDN))
			v = fqdn_allows(local, remote, proto, dport);
		return v;
	}
	if ((ep->flags & MESH_EP_BASELINE) &&
	    baseline_action(local, direction, peer, proto, dport) == MESH_TIER_DENY)
		return 0;
	return 1;
}

/* The local pod's side of a flow: `local` is the pod, `direction` what the packet is for it
 * (INGRESS: the pod receives it). Returns 0 to drop (counted, its reason noted), 1 to pass,
 * above 1 to hand the packet to the node's Envoy on that port (L7 rules). */
static __always_inline int policy_check(struct __sk_buff *skb, struct flow4 *f, __u8 direction)
{
	__be32 local = direction == MESH_POLICY_INGRESS ? f->daddr : f->saddr;
	__be32 remote = direction == MESH_POLICY_INGRESS ? f->saddr : f->daddr;
	struct policy_endpoint *ep = mesh_policy_endpoints.lookup(&local);
	if (!ep)
		return 1;
	__u32 zero = 0;
	__u32 *rev = mesh_policy_revision.lookup(&zero);
	__u32 revision = rev ? *rev : 0;

	/* The flow's own entry (this packet goes the way its first did), or the entry of the
	 * flow it replies to (decided for the other direction). */
	struct policy_ct_key ck = { .saddr = f->saddr, .daddr = f->daddr, .sport = f->sport,
				    .dport = f->dport, .proto = f->proto, .direction = direction };
	__u8 decide_dir = direction;
	__be16 decide_port = f->dport;
	struct policy_ct_entry *ct = mesh_policy_ct.lookup(&ck);
	if (!ct) {
		struct policy_ct_key rk = { .saddr = f->daddr, .daddr = f->saddr,
					    .sport = f->dport, .dport = f->sport,
					    .proto = f->proto, .direction = direction ^ 1 };
		ct = mesh_policy_ct.lookup(&rk);
		if (ct) {
			ck = rk;
			decide_dir = direction ^ 1;
			decide_port = f->sport;  /* the flow's destination port */
		}
	}
	int ok;
	if (ct && ct->revision == revision) {
		ok = !ct->allowed ? 0 : ct->proxy_port ? bpf_ntohs(ct->proxy_port) : 1;
	} else {
		struct ipcache_info peer = policy_peer(remote);
		ok = policy_decide(ep, local, remote, decide_dir, &peer, f->proto, decide_port);
		if (ct || ok) {
			/* A new flow denied leaves no entry: nothing to keep for it. */
			struct policy_ct_entry fresh = { .revision = revision, .allowed = ok != 0,
							 .proxy_port = ok > 1 ? bpf_htons(ok) : 0 };
			mesh_policy_ct.update(&ck, &fresh);
			policy_count(ct ? MESH_POLICY_REDECIDED : MESH_POLICY_NEW);
		}
		if (!ok && peer.identity == MESH_ID_UNMANAGED) {
			policy_count(MESH_DROP_NO_IDENTITY);
			flow_policy_drop(MESH_REASON_INVALID_IDENTITY, decide_dir);
		}
	}
	if (!ok) {
		policy_count(decide_dir == MESH_POLICY_INGRESS ? MESH_DROP_INGRESS
							       : MESH_DROP_EGRESS);
		if (!flow_dropped())
			flow_policy_drop(MESH_REASON_POLICY_DENIED, decide_dir);
	}
	/* Through a proxy is for the flow's own way (to Envoy what the pod receives, to the DNS
	 * proxy what it sends); its replies pass. */
	return ok > 1 && decide_dir != direction ? 1 : ok;
}

/* The policy of the pod at one end of this packet (`direction`: what the packet is for that
 * pod): 1 to pass. Parsed again here, as the packet may have been rewritten since. */
static __always_inline int policy_pass(struct __sk_buff *skb, __u8 direction)
{
	struct flow4 f = {};
	if (!policy_parse(skb, &f))
		return 1; /* not IPv4: policy is IPv4 only for now */
	return policy_check(skb, &f, direction);
}

#define MESH_LOOPBACK 0x7f000001

/* Deliver the packet to `sk`, a proxy's socket (Envoy's or the DNS proxy's), taking the
 * lookup's reference; the mark routes it locally (the proxy route). */
static __always_inline int assign_to_proxy(struct __sk_buff *skb, struct bpf_sock *sk)
{
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return flow_drop(MESH_REASON_SOCKET_ASSIGN);
	skb->mark = MESH_MARK_TO_PROXY;
	count(STAT_PROXY);
	return TC_ACT_OK;
}

/* A TCP packet for a pod whose ingress policy has L7 rules for it: to the node Envoy's
 * socket of its connection, or for a new connection to the policy listener on
 * loopback:port; the packet is not rewritten, so Envoy sees the client and the pod as the
 * connection's ends. No listener (Envoy down): dropped, the client's SYN retries. */
static __always_inline int to_policy_proxy(struct __sk_buff *skb, int port)
{
	struct flow4 f = {};
	flow_point(MESH_POINT_TO_PROXY);
	if (!flow4_parse(skb, &f) || f.proto != IPPROTO_TCP)
		return flow_drop(MESH_REASON_POLICY_DENIED);  /* L7 rules: TCP only */
	struct bpf_sock_tuple t = {};
	t.ipv4.saddr = f.saddr;
	t.ipv4.daddr = f.daddr;
	t.ipv4.sport = f.sport;
	t.ipv4.dport = f.dport;
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk && sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		sk = 0;
	}
	if (!sk) {
		t.ipv4.daddr = bpf_htonl(MESH_LOOPBACK);
		t.ipv4.dport = bpf_htons(port);
		sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return flow_drop(MESH_REASON_NO_SOCKET);
		if (sk->state != BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return flow_drop(MESH_REASON_NO_SOCKET);
		}
	}
	return assign_to_proxy(skb, sk);
}

/* A pod's DNS query, when its egress policy has toFQDNs rules: to the node's DNS proxy on
 * loopback:port (UDP; TCP as to_policy_proxy does), not rewritten, so the proxy sees where the
 * pod sent it and answers from there. No proxy: dropped, the pod's resolver retries. */
static __always_inline int to_dns_proxy(struct __sk_buff *skb, struct flow4 *f, int port)
{
	if (f->proto == IPPROTO_TCP)
		return to_policy_proxy(skb, port);
	flow_point(MESH_POINT_TO_PROXY);
	if (f->proto != IPPROTO_UDP)
		return flow_drop(MESH_REASON_POLICY_DENIED);
	struct bpf_sock_tuple t = {};
	t.ipv4.saddr = f->saddr;
	t.ipv4.sport = f->sport;
	t.ipv4.daddr = bpf_htonl(MESH_LOOPBACK);
	t.ipv4.dport = bpf_htons(port);
	struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return flow_drop(MESH_REASON_NO_SOCKET);
	return assign_to_proxy(skb, sk);
}

/* To a pod of this node, straight into its namespace (if its ingress policy lets the packet
 * in); else to the kernel. */
static __always_inline int to_local_pod(struct __sk_buff *skb, __be32 daddr)
{
	struct endpoint_info *ep = mesh_endpoints.lookup(&daddr);
	if (!ep || ep->ifindex == skb->ifindex) {
		count(STAT_KERNEL);
		return TC_ACT_OK; /* a pod's own packet back to it: mesh_to_pod decides */
	}
	flow_point(MESH_POINT_TO_ENDPOINT);
	int verdict = policy_pass(skb, MESH_POLICY_INGRESS);
	if (!verdict)
		return TC_ACT_SHOT;
	if (verdict > 1)
		return to_policy_proxy(skb, verdict);
	if (bpf_skb_store_bytes(skb, 0, ep->pod_mac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, ep->host_mac, ETH_ALEN, 0) < 0)
		return flow_drop(MESH_REASON_ERROR_WRITING);
	count(STAT_LOCAL);
	return bpf_redirect_peer(ep->ifindex, 0);
}

static __always_inline __be32 ipv4_daddr(struct __sk_buff *skb)
{
	__be32 daddr = 0;
	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, MESH_IP_OFF(daddr), &daddr, sizeof(daddr)) < 0)
		return 0;
	return daddr;
}

/* A reply matching a reverse entry: its source (and, after SNAT, destination) rewritten
 * back to what the client sent to, then out by the FIB. */
static __always_inline int reverse_nat(struct __sk_buff *skb, struct flow4 *f,
				       struct ct4_rev *rev)
{
	struct ct4_rev r = *rev;
	if (flow4_rewrite(skb, f, 0, r.saddr, r.sport) < 0 ||
	    flow4_rewrite(skb, f, 1, r.daddr, r.dport) < 0)
		return flow_drop(MESH_REASON_ERROR_WRITING);
	count(STAT_NODEPORT);
	return flow4_redirect_fib(skb, f);
}

/* Hand a TCP packet sent to a Service frontend to the node's Envoy: to the socket of its
 * connection if Envoy has one (also once the Service lost its L7 configuration: its
 * established connections finish through Envoy), else, for an L7 frontend, to the mesh
 * listener on loopback:proxy_port. -1: not for Envoy. A new connection while Envoy is down
 * is dropped: the client's SYN retries reach it once it is back. */
static __always_inline int to_proxy(struct __sk_buff *skb, struct flow4 *f,
				    struct lb4_service *svc)
{
#ifdef MESH_REDIRECT_TPROXY
	/* The variant: only the mark here, every packet of the flow; netfilter's TPROXY rule
	 * (the agent's nft table mesh_tproxy) looks the socket up and delivers to it. */
	if (!(svc->flags & MESH_SVC_L7))
		return -1;
	skb->mark = MESH_MARK_TO_PROXY;
	count(STAT_PROXY);
	flow_point(MESH_POINT_TO_PROXY);
	return TC_ACT_OK;
#else
	struct bpf_sock_tuple t = {};
	t.ipv4.saddr = f->saddr;
	t.ipv4.daddr = f->daddr;
	t.ipv4.sport = f->sport;
	t.ipv4.dport = f->dport;
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk && sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);  /* something listens on the ClusterIP itself: not ours */
		return -1;
	}
	if (!sk) {
		if (!(svc->flags & MESH_SVC_L7))
			return -1;
		t.ipv4.daddr = bpf_htonl(MESH_LOOPBACK);
		t.ipv4.dport = svc->proxy_port;
		sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
		flow_point(MESH_POINT_TO_PROXY);
		if (!sk)
			return flow_drop(MESH_REASON_NO_SOCKET);
		if (sk->state != BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return flow_drop(MESH_REASON_NO_SOCKET);
		}
	}
	flow_point(MESH_POINT_TO_PROXY);
	return assign_to_proxy(skb, sk);
#endif
}

static __always_inline int from_pod(struct __sk_buff *skb)
{
	struct flow4 f = {};
	if ((skb->mark & MESH_MARK_MASK) == MESH_MARK_FROM_PROXY)
		return to_local_pod(skb, ipv4_daddr(skb));
	if (!flow4_parse(skb, &f)) {
		if (!policy_pass(skb, MESH_POLICY_EGRESS))
			return TC_ACT_SHOT;
		int tunnel = to_tunnel(skb);  /* IPv6, ICMP, fragments */
		if (tunnel >= 0)
			return tunnel;
		return to_local_pod(skb, ipv4_daddr(skb));
	}
	if (f.proto == IPPROTO_TCP) {
		/* Pods' connections to other frontends were rewritten to a backend at
		 * connect(): a frontend on the wire is one for Envoy (or was). Its backend is
		 * Envoy's to choose: the pod's egress policy is not applied to it here. */
		struct lb4_key sk = { .address = f.daddr, .dport = f.dport, .proto = IPPROTO_TCP };
		struct lb4_service *svc = mesh_services.lookup(&sk);
		if (svc) {
			int verdict = to_proxy(skb, &f, svc);
			if (verdict >= 0)
				return verdict;
		}
	}
	int verdict = policy_check(skb, &f, MESH_POLICY_EGRESS);
	if (!verdict)
		return TC_ACT_SHOT;
	if (verdict > 1)
		return to_dns_proxy(skb, &f, verdict);
	struct ct4_key rk = { .saddr = f.saddr, .daddr = f.daddr, .sport = f.sport,
			      .dport = f.dport, .proto = f.proto };
	struct ct4_rev *rev = mesh_ct4_rev.lookup(&rk);
	if (rev)
		return reverse_nat(skb, &f, rev);
	int tunnel = to_tunnel(skb);
	if (tunnel >= 0)
		return tunnel;
	return to_local_pod(skb, f.daddr);  /* parsed already: no second read of the header */
}

int mesh_from_pod(struct __sk_buff *skb)
{
	flow_begin(MESH_POINT_TO_STACK);  /* unless it goes elsewhere: to the kernel */
	int action = from_pod(skb);
	flow_observe(skb, action);
	return action;
}

/* Packets the kernel routes to a pod (from the node itself, or not redirected here): the
 * pod's ingress policy. */
int mesh_to_pod(struct __sk_buff *skb)
{
	flow_begin(MESH_POINT_TO_ENDPOINT);
	/* Here (tc egress) a flow cannot be handed to Envoy: one with L7 rules is dropped rather
	 * than let through unchecked (the kernel path carries none but the host's own). */
	int verdict = policy_pass(skb, MESH_POLICY_INGRESS);
	int action = verdict == 1 ? TC_ACT_OK : TC_ACT_SHOT;
	if (verdict > 1)
		flow_policy_drop(MESH_REASON_POLICY_DENIED, MESH_POLICY_INGRESS);
	flow_observe(skb, action);
	return action;
}

/* A new flow to an external frontend: its backend (Maglev or random), or 0. */
static __always_inline int nodeport_select(struct flow4 *f, struct lb4_service *svc,
					   struct lb4_backend *out)
{
	__u32 id = 0;
	if (svc->flags & MESH_SVC_MAGLEV) {
		__u16 rev = svc->rev_nat_index;
		struct lb4_maglev *table = mesh_maglev.lookup(&rev);
		if (!table)
			return 0;
		__u32 i = flow4_client_hash(f) % MESH_MAGLEV_M;
		/* The verifier does not follow the modulo's bound: check it again, after a
		 * barrier the compiler cannot see through. */
		asm volatile("" : "+r"(i));
		if (i >= MESH_MAGLEV_M)
			return 0;
		id = table->backend_ids[i];
	} else {
		struct lb4_key key = { .address = f->daddr, .dport = f->dport, .proto = f->proto,
				       .backend_slot = (bpf_get_prandom_u32() % svc->count) + 1 };
		struct lb4_service *slot = mesh_services.lookup(&key);
		if (!slot)
			return 0;
		id = slot->backend_id;
	}
	struct lb4_backend *be = mesh_backends.lookup(&id);
	if (!be)
		return 0;
	*out = *be;
	return 1;
}

/* Record a new flow: the forward entry, and the reverse one its replies will match. A
 * remote backend's flow gets a NAT port of this node no other flow to it uses. */
static __always_inline int nodeport_track(struct flow4 *f, struct ct4_key *fk,
					  struct lb4_backend *be, struct ct4_entry *ct)
{
	ct->backend_address = be->address;
	ct->backend_port = be->port;
	struct ct4_rev rev = { .saddr = f->daddr, .sport = f->dport, .daddr = f->saddr,
			       .dport = f->sport };
	struct ct4_key rk = { .saddr = be->address, .sport = be->port, .proto = f->proto };
	if (mesh_endpoints.lookup(&be->address)) {
		rk.daddr = f->saddr;
		rk.dport = f->sport;
	} else {
		__u32 h = flow4_client_hash(f);
		rk.daddr = f->daddr;
		ct->nat_address = f->daddr;
#pragma unroll
		for (int i = 0; i < MESH_NAT_PORT_TRIES; i++) {
			__be16 port = bpf_htons(MESH_NAT_PORT_MIN + (h + i * 2654435761u) %
							MESH_NAT_PORT_COUNT);
			rk.dport = port;
			if (!mesh_ct4_rev.lookup(&rk)) {
				ct->nat_port = port;
				break;
			}
		}
		if (!ct->nat_port)
			return -1; /* every port tried is taken: drop, the client retries */
	}
	if (mesh_ct4_rev.update(&rk, &rev) < 0 || mesh_ct4.update(fk, ct) < 0)
		return -1;
	return 0;
}

static __always_inline int from_underlay(struct __sk_buff *skb)
{
	struct flow4 f = {};
	if (!flow4_parse(skb, &f))
		return to_local_pod(skb, ipv4_daddr(skb));
	struct ct4_key key = { .saddr = f.saddr, .daddr = f.daddr, .sport = f.sport,
			       .dport = f.dport, .proto = f.proto };
	/* A reply to a flow SNATed here: only NAT ports are looked up. */
	if (bpf_ntohs(f.dport) >= MESH_NAT_PORT_MIN) {
		struct ct4_rev *rev = mesh_ct4_rev.lookup(&key);
		if (rev)
			return reverse_nat(skb, &f, rev);
	}
	struct lb4_key sk = { .address = f.daddr, .dport = f.dport, .proto = f.proto };
	struct lb4_service *svc = mesh_services.lookup(&sk);
	if (!svc || !(svc->flags & MESH_SVC_EXTERNAL))
		return to_local_pod(skb, f.daddr);
	struct ct4_entry ct = {};
	struct ct4_entry *known = mesh_ct4.lookup(&key);
	if (known) {
		ct = *known;
	} else {
		struct lb4_backend be = {};
		if (svc->count == 0 || !nodeport_select(&f, svc, &be))
			/* a NodePort with no backend: refused, as kube-proxy */
			return flow_drop(MESH_REASON_NO_BACKEND);
		if (nodeport_track(&f, &key, &be, &ct) < 0)  /* no NAT port free: the client retries */
			return flow_drop(MESH_REASON_NO_NAT_PORT);
	}
	count(STAT_NODEPORT);
	if (flow4_rewrite(skb, &f, 1, ct.backend_address, ct.backend_port) < 0)
		return flow_drop(MESH_REASON_ERROR_WRITING);
	if (!ct.nat_port)
		return to_local_pod(skb, f.daddr);
	if (flow4_rewrite(skb, &f, 0, ct.nat_address, ct.nat_port) < 0)
		return flow_drop(MESH_REASON_ERROR_WRITING);
	return flow4_redirect_fib(skb, &f);
}

/* Packets from other nodes and from outside: only those for this node's pods (and
 * NodePorts refused) are flows of ours; the node's own traffic is not tracked. */
int mesh_from_underlay(struct __sk_buff *skb)
{
	flow_begin(0);
	int action = from_underlay(skb);
	flow_observe(skb, action);
	return action;
}
