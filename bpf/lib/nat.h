/* Parsing a packet's IPv4 flow at tc, rewriting its addresses and ports with the checksums
 * kept right, and sending it on by the kernel's FIB. */
#ifndef MESH_NAT_H
#define MESH_NAT_H

#include "common.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#define MESH_AF_INET 2

/* bcc 0.26 declares bpf_redirect_neigh with the 5.10 arguments; since 5.11 it takes the
 * next hop as well. */
static long (*mesh_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				   __u64 flags) = (void *)BPF_FUNC_redirect_neigh;
#define MESH_IP_OFF(field) (ETH_HLEN + __builtin_offsetof(struct iphdr, field))

struct flow4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u32 l4_off;
};

/* A TCP or UDP packet over IPv4, not a fragment: its flow, or 0 (left to the kernel). */
static __always_inline int flow4_parse(struct __sk_buff *skb, struct flow4 *f)
{
	struct iphdr ip;
	__be16 ports[2];
	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
	    ip.ihl < 5 || (ip.frag_off & bpf_htons(0x3fff)) ||
	    (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP))
		return 0;
	f->l4_off = ETH_HLEN + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, f->l4_off, ports, sizeof(ports)) < 0)
		return 0;
	f->saddr = ip.saddr;
	f->daddr = ip.daddr;
	f->sport = ports[0];
	f->dport = ports[1];
	f->proto = ip.protocol;
	return 1;
}

/* Rewrite the source (dst = 0) or destination (dst = 1) address and port. The L4
 * checksum covers the addresses through the pseudo-header; a UDP checksum of 0 (none)
 * stays 0. Returns 0, or <0 if the packet could not be written. */
static __always_inline int flow4_rewrite(struct __sk_buff *skb, struct flow4 *f, int dst,
					 __be32 addr, __be16 port)
{
	__u32 csum_off = f->l4_off + (f->proto == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be32 old_addr = dst ? f->daddr : f->saddr;
	__be16 old_port = dst ? f->dport : f->sport;
	__u32 addr_off = dst ? MESH_IP_OFF(daddr) : MESH_IP_OFF(saddr);
	if (old_addr != addr) {
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, addr,
					mangled | BPF_F_PSEUDO_HDR | sizeof(addr)) < 0 ||
		    bpf_l3_csum_replace(skb, MESH_IP_OFF(check), old_addr, addr, sizeof(addr)) < 0 ||
		    bpf_skb_store_bytes(skb, addr_off, &addr, sizeof(addr), 0) < 0)
			return -1;
	}
	if (old_port != port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | sizeof(port)) < 0 ||
		    bpf_skb_store_bytes(skb, f->l4_off + (dst ? 2 : 0), &port, sizeof(port), 0) < 0)
			return -1;
	}
	if (dst) {
		f->daddr = addr;
		f->dport = port;
	} else {
		f->saddr = addr;
		f->sport = port;
	}
	return 0;
}

/* Send a rewritten packet out where the FIB routes its destination. It cannot go back to
 * the kernel's input path: a packet whose source is now this node's own address would be
 * dropped there as a martian. */
static __always_inline int flow4_redirect_fib(struct __sk_buff *skb, struct flow4 *f)
{
	struct bpf_fib_lookup p = {};
	p.family = MESH_AF_INET;
	p.l4_protocol = f->proto;
	p.sport = f->sport;
	p.dport = f->dport;
	p.tot_len = skb->len - ETH_HLEN;
	p.ipv4_src = f->saddr;
	p.ipv4_dst = f->daddr;
	p.ifindex = skb->ingress_ifindex;
	long rc = bpf_fib_lookup(skb, &p, sizeof(p), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, p.dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, p.smac, ETH_ALEN, 0) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(p.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The next hop's MAC is not known yet: the kernel resolves it. */
		struct bpf_redir_neigh nh = {};
		nh.nh_family = MESH_AF_INET;
		nh.ipv4_nh = p.ipv4_dst;
		return mesh_redirect_neigh(p.ifindex, &nh, sizeof(nh), 0);
	}
	return TC_ACT_SHOT; /* no route: nothing sensible to do with a rewritten packet */
}

/* A small integer hash of a flow's client side (Maglev's index): the client's address,
 * port and protocol only, so a flow gets the same backend whichever node it enters. */
static __always_inline __u32 flow4_client_hash(struct flow4 *f)
{
	__u32 h = f->saddr ^ ((__u32)f->sport << 16) ^ f->proto;
	/* murmur3's finalizer: every input bit moves every output bit */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

#endif
