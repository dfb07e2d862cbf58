/* Socket-level load balancing (the kube-proxy replacement for pods' own connections).
 *
 * Attached to the pods' cgroup: connect() and sendmsg() to a ClusterIP:port are rewritten,
 * once per connection (per datagram for unconnected UDP), to a backend's address; the
 * packets then go straight to the backend with no per-packet NAT. getpeername() and a UDP
 * reply's source show the ClusterIP again, as the application asked for it. Each
 * translation is also told to the flow tracking (mesh_lb_xlate), which names the Service on
 * the connection's flows. */
#include "lib/common.h"
#include "lib/lb.h"

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_DGRAM ? IPPROTO_UDP : IPPROTO_TCP;
}

/* The backend for this frontend, or 0 (not a service, no live backend). */
static __always_inline int lb4_pick(struct bpf_sock_addr *ctx, struct lb4_backend *out,
				    __u16 *rev_nat_index)
{
	struct lb4_key key = {};
	key.address = ctx->user_ip4;
	key.dport = (__u16)ctx->user_port;
	key.proto = sock_proto(ctx);
	struct lb4_service *svc = mesh_services.lookup(&key);
	if (!svc || svc->count == 0)
		return 0;
	/* L7 configuration applies: the connection goes to the ClusterIP as asked, and tc at the
	 * pod's veth hands it to the node's Envoy, which sees the original destination. */
	if ((svc->flags & MESH_SVC_L7) && key.proto == IPPROTO_TCP)
		return 0;
	*rev_nat_index = svc->rev_nat_index;
	/* Slots hold only backends that take new connections: a terminating backend leaves its
	 * slot (the agent compacts the slots) but stays in mesh_backends, and connections
	 * already made to it go on, since a socket-level rewrite is done once per connect. */
	key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
	struct lb4_service *slot = mesh_services.lookup(&key);
	if (!slot)
		return 0;
	__u32 id = slot->backend_id;
	struct lb4_backend *be = mesh_backends.lookup(&id);
	if (!be)
		return 0;
	*out = *be;
	return 1;
}

/* Tell the flow tracking which frontend the datagrams from this socket to the backend were
 * balanced from. The socket's port is bound by the time sendmsg() runs the program; its
 * address may be 0 (bound to any): fwd.c then looks the tuple up without it. */
static __always_inline void lb4_xlate_udp(struct bpf_sock_addr *ctx, struct lb4_sock_rev *r)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return;
	struct ct4_key k = {};
	k.saddr = ctx->msg_src_ip4 ? ctx->msg_src_ip4 : sk->src_ip4;
	k.daddr = r->backend_address;
	k.sport = bpf_htons((__u16)sk->src_port);
	k.dport = r->backend_port;
	k.proto = IPPROTO_UDP;
	struct lb4_reverse_nat x = { .address = r->address, .port = r->port };
	mesh_lb_xlate.update(&k, &x);
}

static __always_inline int lb4_translate(struct bpf_sock_addr *ctx, int sendmsg)
{
	struct lb4_backend be = {};
	__u16 rev = 0;
	__be32 frontend = ctx->user_ip4;
	__be16 fport = (__u16)ctx->user_port;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (!lb4_pick(ctx, &be, &rev)) {
		/* Not a service (or none live): the connection goes as asked, and a socket that
		 * once went to a service shows its new peer as it is. */
		mesh_sock_rev.delete(&cookie);
		return 1;
	}
	ctx->user_ip4 = be.address;
	ctx->user_port = be.port;
	struct lb4_sock_rev r = { .address = frontend, .port = fport, .rev_nat_index = rev,
				  .backend_address = be.address, .backend_port = be.port };
	/* An unconnected socket sends each datagram through here: its translation is told
	 * when it changes (a new destination, another backend), not per datagram. */
	struct lb4_sock_rev *old = mesh_sock_rev.lookup(&cookie);
	int changed = !old || old->address != r.address || old->port != r.port ||
		      old->backend_address != r.backend_address ||
		      old->backend_port != r.backend_port;
	mesh_sock_rev.update(&cookie, &r);
	if (sendmsg && changed)
		lb4_xlate_udp(ctx, &r);
	return 1;
}

int mesh_connect4(struct bpf_sock_addr *ctx)
{
	return lb4_translate(ctx, 0);
}

int mesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_translate(ctx, 1);
}

/* TCP: connect() has picked the socket's own address and port by the time it calls this
 * (before its SYN is sent): a balanced socket's translation is told to the flow tracking
 * by the tuple its packets will carry. */
int mesh_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB || skops->family != 2 /* AF_INET */)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct lb4_sock_rev *r = mesh_sock_rev.lookup(&cookie);
	if (!r)
		return 1;
	struct ct4_key k = {};
	k.saddr = skops->local_ip4;
	k.daddr = skops->remote_ip4;
	k.sport = bpf_htons((__u16)skops->local_port);       /* host order */
	k.dport = (__be16)(skops->remote_port >> 16);         /* network order, upper half */
	k.proto = IPPROTO_TCP;
	if (k.daddr != r->backend_address || k.dport != r->backend_port)
		return 1;  /* connected elsewhere since */
	struct lb4_reverse_nat x = { .address = r->address, .port = r->port };
	mesh_lb_xlate.update(&k, &x);
	return 1;
}

/* Show the frontend again where the socket's peer is the backend it was sent to. */
static __always_inline int lb4_reverse(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct lb4_sock_rev *r = mesh_sock_rev.lookup(&cookie);
	if (!r)
		return 1;
	if (ctx->user_ip4 != r->backend_address || (__u16)ctx->user_port != r->backend_port)
		return 1; /* a peer other than the backend (UDP): shown as it is */
	__u16 idx = r->rev_nat_index;
	struct lb4_reverse_nat *nat = mesh_rev_nat.lookup(&idx);
	if (!nat || nat->address != r->address || nat->port != r->port)
		return 1; /* the service is gone or changed: tell the truth */
	ctx->user_ip4 = r->address;
	ctx->user_port = r->port;
	return 1;
}

int mesh_recvmsg4(struct bpf_sock_addr *ctx)
{
	return lb4_reverse(ctx);
}

int mesh_getpeername4(struct bpf_sock_addr *ctx)
{
	return lb4_reverse(ctx);
}
