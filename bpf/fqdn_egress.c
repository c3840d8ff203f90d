// SPDX-License-Identifier: Apache-2.0
/*
 * fqdn_egress.c: per-endpoint egress gating for fqdnproxy (tc, clsact ingress).
 *
 * Attached to clsact *ingress* of an endpoint's host-side veth, every packet the endpoint sends
 * passes through fqdn_egress() before the host routes it. Attached to a gateway interface, the
 * same program gates whoever sends through it; endpoints are then known only by source IP.
 *
 * This file is the source of truth for the map layout. fqdnproxy/datapath/maps.py mirrors every
 * struct below; datapath.load() passes the Python sizes and offsets as -D flags and the
 * _Static_asserts at the end of this file refuse to compile if the two disagree.
 *
 * Verdict, in order (first match decides):
 *   1. not IPv4/IPv6 (ARP, ...)                      -> pass, untouched
 *   2. source not in `endpoints`                     -> pass, unless the interface belongs to an
 *                                                       enforced endpoint (`ifaces`): spoofed
 *   3. endpoint's ifindex set and != this interface  -> drop SPOOFED (anti-spoofing)
 *   4. endpoint without ENFORCE_EGRESS               -> pass (PASS_UNENFORCED)
 *   5. ICMP control messages (errors, echo replies,
 *      IPv6 neighbour discovery and MLD)             -> pass (PASS_ICMP_CONTROL)
 *   6. flow in `ct` and not idle                     -> pass (PASS_ESTABLISHED)
 *   7. `allow_exact` (/32, /128; with DNS workers, each worker's) then `allow` (LPM):
 *      unexpired and port+protocol match             -> pass, record the flow in `ct`
 *      (a TCP SYN without ACK tries 7 before 6: same verdict, the likelier hit paid first)
 *   8. destination is a DNS target (the proxy)       -> pass (PASS_DNS), not recorded
 *   9. otherwise                                     -> drop with the reason of step 7
 *      (NO_ENTRY, EXPIRED or PORT); with AUDIT the drop is counted and logged as AUDITED and the
 *      packet passes.
 * Drops and audits emit an event to the `events` ring buffer, rate-limited per endpoint.
 *
 * Deliberate choices (also in fqdnproxy/datapath/README.md):
 *  - Fragments: the first fragment carries the L4 header and is judged like any packet. Later
 *    fragments carry no ports, so they pass when the endpoint may reach the destination address
 *    with that protocol on *some* port (allow hit, ports ignored), and are dropped otherwise. A
 *    datagram whose first fragment was dropped cannot be reassembled, and Linux discards
 *    overlapping fragments (RFC 5722), so later fragments cannot smuggle a different header.
 *  - IPv6 extension headers: hop-by-hop, routing, destination options, fragment and AH are
 *    skipped (at most FQDN_MAX_EXT_HEADERS); more than that, or a truncated header, is MALFORMED.
 *    ESP and unknown next headers are judged as that protocol with no ports: only an entry whose
 *    range has protocol 0 (any) admits them.
 *  - ICMP: echo requests are judged against the allow map with protocol ICMP/ICMPv6 (ports are
 *    ignored; the echo id stands in for the source port in `ct`). Error messages, echo replies,
 *    IPv6 neighbour discovery (133-137) and MLD (130-132, 143) pass: they answer traffic the
 *    endpoint received, and IPv6 stops working without NDP. They pass from link-local and
 *    unspecified sources too, which are no endpoint's (see link_local_control). Other ICMP
 *    types are dropped.
 *  - DNS to the proxy is looked up only when a packet would otherwise be dropped, so allowed
 *    traffic never pays for it.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

/* Bump when any pinned map's key, value, type or meaning changes (datapath/maps.py mirrors it). */
#define FQDN_LAYOUT_VERSION 2
#define FQDN_MAX_PORT_RANGES 8
#define FQDN_MAX_EXT_HEADERS 4

/* --- options (datapath.Options passes them as -D flags) ------------------------------------- */
#ifndef FQDN_PIN_DIR
#define FQDN_PIN_DIR "/sys/fs/bpf/fqdnproxy"
#endif
#ifndef FQDN_ENDPOINTS_MAX
#define FQDN_ENDPOINTS_MAX 4096
#endif
#ifndef FQDN_ALLOW_MAX
#define FQDN_ALLOW_MAX 262144
#endif
#ifndef FQDN_CT_MAX
#define FQDN_CT_MAX 262144
#endif
#ifndef FQDN_CT_TCP_IDLE_NS
#define FQDN_CT_TCP_IDLE_NS (6ULL * 3600 * 1000000000ULL) /* Cilium's default: 6 h */
#endif
#ifndef FQDN_CT_OTHER_IDLE_NS
#define FQDN_CT_OTHER_IDLE_NS (60ULL * 1000000000ULL) /* Cilium's default: 60 s */
#endif
/* Refresh a flow's last-seen at most this often: a write per packet would bounce the cache line
 * between CPUs, and idle timeouts are seconds long. */
#ifndef FQDN_CT_REFRESH_NS
#define FQDN_CT_REFRESH_NS 1000000000ULL
#endif
/* The hot path reads the clock with bpf_ktime_get_coarse_ns() (the monotonic time of the last
 * timekeeping update: a few ns, where bpf_ktime_get_ns() costs ~30 ns in a VM). Coarse time is
 * never ahead of the precise clock and lags it by at most a tick or so, so an expiry earlier than
 * coarse "now" is certainly past, and one more than this slack ahead is certainly not; only an
 * entry that expires within the slack pays for the precise clock. Expiry stays exact. */
#ifndef FQDN_COARSE_SLACK_NS
#define FQDN_COARSE_SLACK_NS 1000000000ULL
#endif
#ifndef FQDN_EVENTS_PER_SEC
#define FQDN_EVENTS_PER_SEC 100
#endif
/* 0 only in benchmarks/bench_datapath.py, to measure the new-flow (allow lookup) path. */
#ifndef FQDN_RECORD_FLOWS
#define FQDN_RECORD_FLOWS 1
#endif

/* --- enums ------------------------------------------------------------------------------------ */
enum fqdn_endpoint_flags {
    EP_ENFORCE_EGRESS = 1 << 0, /* some policy selects the endpoint for egress */
    EP_AUDIT = 1 << 1,          /* log would-be drops and pass them */
};

/* Counter and event reasons. Values are ABI: datapath/maps.py Reason mirrors them. */
enum fqdn_reason {
    REASON_PASS_UNENFORCED = 0,
    REASON_PASS_DNS = 1,
    REASON_PASS_ESTABLISHED = 2,
    REASON_PASS_ALLOWED = 3,
    REASON_PASS_ICMP_CONTROL = 4,
    REASON_AUDITED = 5, /* would have been dropped; passed because of EP_AUDIT */
    REASON_DROP_NO_ENTRY = 6,
    REASON_DROP_EXPIRED = 7,
    REASON_DROP_PORT = 8,
    REASON_DROP_SPOOFED = 9,
    REASON_DROP_MALFORMED = 10,
    REASON_DROP_ICMP = 11,
    REASON_EVENT_SUPPRESSED = 12, /* counter only: a drop event over the rate limit */
    REASON_MAX = 13,
};

/* --- map layout --------------------------------------------------------------------------------
 * Addresses are 16 bytes in network order; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so one
 * map serves both families. Explicit pad fields: every byte of a key is hashed, so padding must
 * be zero and visible. */

struct meta_value {
    u32 layout_version;
    u32 pad;
};

struct endpoint_key {
    u8 family; /* 4 or 6: keeps an IPv6 packet from ::ffff:a.b.c.d matching an IPv4 endpoint */
    u8 pad[3];
    u8 addr[16];
};

/* `slot` indexes `counters` (slot * REASON_MAX + reason): a per-CPU array costs a bounds check
 * where a per-CPU hash costs a hash and a compare per packet. Userspace gives every endpoint id
 * one slot (the `slots` map says whose it is); a removed endpoint's slot keeps its counts until
 * the slot is needed for another id, which zeroes them first. */
struct endpoint_value {
    u32 endpoint_id;
    u32 flags;   /* enum fqdn_endpoint_flags */
    u32 ifindex; /* non-zero: packets from this source must arrive on this interface */
    u32 slot;    /* the endpoint's counters slot, < FQDN_ENDPOINTS_MAX */
};

struct iface_value {
    u32 endpoint_id;
    u32 flags;
    u32 slot;
};

/* `slots` (userspace bookkeeping, not read by the program): who owns a counters slot. */
struct slot_value {
    u32 endpoint_id;
    u32 state; /* 0: free, 1: in use, 2: retired (no address left; counts kept) */
};

struct port_range {
    u16 first;   /* host order, inclusive */
    u16 last;    /* host order, inclusive */
    u8 protocol; /* IPPROTO_*, 0 = any protocol */
    u8 pad[3];
};

struct allow_value {
    u64 expiry_ns; /* bpf_ktime_get_ns() deadline (CLOCK_MONOTONIC); 0 = static */
    u32 nranges;   /* used entries of ranges[] */
    u32 pad;
    struct port_range ranges[FQDN_MAX_PORT_RANGES];
};

/* LPM trie key. The kernel matches the first `prefixlen` bits of everything after prefixlen:
 *
 *   | prefixlen (u32) | endpoint_id (u32, 32 bits) | addr[16] (128 bits)         |
 *                       always fully matched         IPv4: 96 bits ::ffff: + plen
 *
 * so prefixlen = 32 + plen for IPv6 and 32 + 96 + plen for IPv4 (an IPv4 /24 is 152). */
struct allow_key {
    u32 prefixlen;
    u32 endpoint_id;
    u8 addr[16];
};

/* Exact-match key for /32 and /128 entries (the ones DNS learning writes): a hash lookup costs
 * the same at 1k and 1M entries, a trie lookup grows with depth. */
struct exact_key {
    u32 endpoint_id;
    u8 addr[16];
};

/* A flow: the key holds a 64-bit hash of the two addresses instead of the addresses (a 20-byte
 * key hashes and compares in about half the time of the 44 bytes it replaces); the value holds
 * the addresses, and a hit counts only when they are equal, so a hash collision is a miss (the
 * packet is judged against the allow map), never a pass. */
struct ct_key {
    u32 endpoint_id;
    u32 addr_hash[2]; /* flow_addr_hash() of saddr, daddr */
    u16 sport;        /* host order; ICMP echo id */
    u16 dport;        /* host order; 0 for ICMP */
    u8 protocol;
    u8 family;
    u8 pad[2];
};

struct ct_value {
    u64 last_seen_ns; /* bpf_ktime_get_coarse_ns(): idle timeouts are seconds, refresh is 1 s */
    u64 created_ns;
    u8 saddr[16];
    u8 daddr[16];
};

struct dns_key {
    u8 family;
    u8 protocol;
    u16 port; /* host order */
    u8 addr[16];
};

struct rate_state {
    u64 window_start_ns;
    u32 count;
    u32 pad;
};

struct drop_event {
    u64 timestamp_ns; /* bpf_ktime_get_ns() */
    u32 endpoint_id;
    u32 reason; /* enum fqdn_reason of the drop (also when audited) */
    u32 ifindex;
    u8 family;
    u8 protocol;
    u16 sport;
    u16 dport;
    u16 audited; /* 1: EP_AUDIT passed it */
    u8 saddr[16];
    u8 daddr[16];
    u32 pad;
};

#define PIN(name) FQDN_PIN_DIR "/" name

BPF_TABLE_PINNED("array", u32, struct meta_value, meta, 1, PIN("meta"));
BPF_TABLE_PINNED("hash", struct endpoint_key, struct endpoint_value, endpoints,
                 FQDN_ENDPOINTS_MAX, PIN("endpoints"));
BPF_TABLE_PINNED("hash", u32, struct iface_value, ifaces, FQDN_ENDPOINTS_MAX, PIN("ifaces"));
BPF_TABLE_PINNED("lpm_trie", struct allow_key, struct allow_value, allow, FQDN_ALLOW_MAX,
                 PIN("allow"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct exact_key, struct allow_value, allow_exact, FQDN_ALLOW_MAX,
                 PIN("allow_exact"), BPF_F_NO_PREALLOC);
/* DNS workers (the agent's dns.workers): each worker process keeps its own FQDN cache and writes
 * its own exact map, so no two processes ever write one key. Worker 0's is allow_exact, worker
 * k's allow_exact_k; an address any worker learned for the endpoint admits the flow (judge). */
#ifndef FQDN_WORKERS
#define FQDN_WORKERS 1
#endif
#if FQDN_WORKERS < 1 || FQDN_WORKERS > 8
#error "FQDN_WORKERS must be 1 to 8"
#endif
#define WORKER_EXACT(k)                                                                        \
    BPF_TABLE_PINNED("hash", struct exact_key, struct allow_value, allow_exact_##k,             \
                     FQDN_ALLOW_MAX, PIN("allow_exact_" #k), BPF_F_NO_PREALLOC)
#if FQDN_WORKERS > 1
WORKER_EXACT(1);
#endif
#if FQDN_WORKERS > 2
WORKER_EXACT(2);
#endif
#if FQDN_WORKERS > 3
WORKER_EXACT(3);
#endif
#if FQDN_WORKERS > 4
WORKER_EXACT(4);
#endif
#if FQDN_WORKERS > 5
WORKER_EXACT(5);
#endif
#if FQDN_WORKERS > 6
WORKER_EXACT(6);
#endif
#if FQDN_WORKERS > 7
WORKER_EXACT(7);
#endif
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_value, ct, FQDN_CT_MAX, PIN("ct"));
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, FQDN_ENDPOINTS_MAX * REASON_MAX,
                 PIN("counters"));
BPF_TABLE_PINNED("array", u32, struct slot_value, slots, FQDN_ENDPOINTS_MAX, PIN("slots"));
BPF_TABLE_PINNED("hash", struct dns_key, u32, dns_targets, 64, PIN("dns_targets"));
/* Not pinned: they belong to one program instance; a restarted agent reads its own ring. */
BPF_TABLE("lru_hash", u32, struct rate_state, event_rate, FQDN_ENDPOINTS_MAX);
BPF_RINGBUF_OUTPUT(events, 64);

/* --- packet parsing ------------------------------------------------------------------------- */

enum parse_result { PARSE_OK = 0, PARSE_NOT_IP = 1, PARSE_MALFORMED = 2 };

struct flow {
    u8 saddr[16] __attribute__((aligned(8))); /* read as two u64 words (see "map keys") */
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u8 family;
    u8 protocol;
    u8 later_fragment; /* no L4 header: ports unknown */
    u8 icmp_type;
    u8 tcp_syn;        /* SYN without ACK: a connection attempt, judged before `ct` */
    void *l4;
};

struct ipv6_ext {
    u8 nexthdr;
    u8 hdrlen;
};

struct ipv6_frag {
    u8 nexthdr;
    u8 reserved;
    __be16 frag_off;
    __be32 identification;
};

/* --- map keys ------------------------------------------------------------------------------------
 * The kernel hashes a key with jhash2 (u32 reads) and compares it with memcmp (u64 reads). A key
 * assembled on the stack from byte, u16 and u32 stores makes those wider reads miss store-to-load
 * forwarding, and each then waits for the stores to reach the cache. Measured with
 * BPF_PROG_TEST_RUN, the endpoint lookup cost 30 ns that way and 16 ns with the key written in
 * whole words; the allow_exact and ct lookups gained 5-15 ns each. So every key the program looks
 * up is composed in registers and written as u64 words (a 20-byte key's last four bytes as one
 * u32), and struct flow keeps addresses as two aligned u64 words. The words hold the key's bytes
 * in memory order on a little-endian host. */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the key word helpers below assume a little-endian host"
#endif

/* On a key variable: lets the helpers below write it as u64 words. Not on the struct types, whose
 * size (20 bytes for most) is ABI and would grow to 24. */
#define FQDN_KEY_ALIGNED __attribute__((aligned(8)))

/* Word i (0 or 1) of a 16-byte address held 8-byte aligned (struct flow's). */
static __always_inline u64 addr_word(const u8 *addr, int i)
{
    return ((const u64 *)addr)[i];
}

/* Writes a 20-byte key laid out | u32 head | 16-byte address | into a FQDN_KEY_ALIGNED `key`. The
 * head: endpoint_key's family and three zero pad bytes, exact_key's endpoint id, dns_key's family,
 * protocol and port. */
static __always_inline void put_head_addr_key(void *key, u32 head, const u8 *addr)
{
    u64 a0 = addr_word(addr, 0), a1 = addr_word(addr, 1);
    u64 *w = key;
    w[0] = head | a0 << 32;
    w[1] = a0 >> 32 | a1 << 32;
    *(u32 *)(w + 2) = (u32)(a1 >> 32);
}

/* IPv4 as ::ffff:a.b.c.d, written as two words (see above). */
static __always_inline void map_v4(u8 *dst, __be32 addr)
{
    u64 *w = (u64 *)dst;
    w[0] = 0;
    w[1] = 0xffff0000ULL | (u64)addr << 32;
}

static __always_inline int parse_l3(struct __sk_buff *skb, struct flow *f)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return PARSE_NOT_IP;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->ihl < 5)
            return PARSE_MALFORMED;
        f->family = 4;
        f->protocol = ip->protocol;
        map_v4(f->saddr, ip->saddr);
        map_v4(f->daddr, ip->daddr);
        f->later_fragment = (ip->frag_off & htons(0x1fff)) != 0;
        f->l4 = (void *)ip + ip->ihl * 4;
        return PARSE_OK;
    }
    if (eth->h_proto != htons(ETH_P_IPV6))
        return PARSE_NOT_IP;

    struct ipv6hdr *ip6 = (void *)(eth + 1);
    if ((void *)(ip6 + 1) > data_end)
        return PARSE_MALFORMED;
    f->family = 6;
    __builtin_memcpy(f->saddr, &ip6->saddr, 16);
    __builtin_memcpy(f->daddr, &ip6->daddr, 16);
    u8 nexthdr = ip6->nexthdr;
    void *cursor = (void *)(ip6 + 1);

#pragma unroll
    for (int i = 0; i < FQDN_MAX_EXT_HEADERS; i++) {
        if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
            nexthdr == IPPROTO_DSTOPTS) {
            struct ipv6_ext *ext = cursor;
            if ((void *)(ext + 1) > data_end)
                return PARSE_MALFORMED;
            nexthdr = ext->nexthdr;
            cursor += (ext->hdrlen + 1) * 8;
        } else if (nexthdr == IPPROTO_AH) {
            struct ipv6_ext *ext = cursor;
            if ((void *)(ext + 1) > data_end)
                return PARSE_MALFORMED;
            nexthdr = ext->nexthdr;
            cursor += (ext->hdrlen + 2) * 4;
        } else if (nexthdr == IPPROTO_FRAGMENT) {
            struct ipv6_frag *frag = cursor;
            if ((void *)(frag + 1) > data_end)
                return PARSE_MALFORMED;
            nexthdr = frag->nexthdr;
            if (frag->frag_off & htons(0xfff8))
                f->later_fragment = 1;
            cursor += sizeof(*frag);
        } else {
            break;
        }
    }
    if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS ||
        nexthdr == IPPROTO_AH || nexthdr == IPPROTO_FRAGMENT)
        return PARSE_MALFORMED; /* more extension headers than we skip */
    f->protocol = nexthdr;
    f->l4 = cursor;
    return PARSE_OK;
}

/* Fill ports (or ICMP type and echo id). Later fragments and unknown protocols have none. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct flow *f)
{
    void *data_end = (void *)(long)skb->data_end;

    if (f->later_fragment)
        return PARSE_OK;
    if (f->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = f->l4;
        if ((void *)(tcp + 1) > data_end)
            return PARSE_MALFORMED;
        f->sport = ntohs(tcp->source);
        f->dport = ntohs(tcp->dest);
        f->tcp_syn = tcp->syn && !tcp->ack;
    } else if (f->protocol == IPPROTO_UDP) {
        struct udphdr *udp = f->l4;
        if ((void *)(udp + 1) > data_end)
            return PARSE_MALFORMED;
        f->sport = ntohs(udp->source);
        f->dport = ntohs(udp->dest);
    } else if (f->protocol == IPPROTO_ICMP || f->protocol == IPPROTO_ICMPV6) {
        /* type, code, checksum, then the echo id: same layout in ICMP and ICMPv6. */
        struct icmphdr *icmp = f->l4;
        if ((void *)(icmp + 1) > data_end)
            return PARSE_MALFORMED;
        f->icmp_type = icmp->type;
        f->sport = ntohs(icmp->un.echo.id);
    }
    return PARSE_OK;
}

enum icmp_class { ICMP_JUDGE = 0, ICMP_CONTROL = 1, ICMP_REFUSE = 2 };

static __always_inline int classify_icmp(struct flow *f)
{
    u8 t = f->icmp_type;

    if (f->later_fragment)
        return ICMP_JUDGE;
    if (f->protocol == IPPROTO_ICMP) {
        if (t == ICMP_ECHO)
            return ICMP_JUDGE;
        if (t == ICMP_ECHOREPLY || t == ICMP_DEST_UNREACH || t == ICMP_TIME_EXCEEDED ||
            t == ICMP_PARAMETERPROB)
            return ICMP_CONTROL;
        return ICMP_REFUSE;
    }
    if (t == 128) /* echo request */
        return ICMP_JUDGE;
    if ((t >= 1 && t <= 4) || t == 129 || (t >= 130 && t <= 137) || t == 143)
        return ICMP_CONTROL; /* errors, echo reply, MLD, NDP */
    return ICMP_REFUSE;
}

/* IPv6 neighbour discovery and MLD sent from a link-local (fe80::/10) or the unspecified (::,
 * duplicate address detection) source. Those addresses are no endpoint's, yet a pod cannot reach
 * a link-local gateway (as most CNIs give it) without them. Nothing else passes from them. */
static __always_inline int link_local_control(struct __sk_buff *skb, struct flow *f)
{
    if (f->family != 6)
        return 0;
    u8 *a = f->saddr;
    int link_local = a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
    u64 *w = (u64 *)f->saddr;
    if (!link_local && (w[0] | w[1]))
        return 0;
    if (parse_l4(skb, f) != PARSE_OK || f->protocol != IPPROTO_ICMPV6 || f->later_fragment)
        return 0;
    u8 t = f->icmp_type;
    return (t >= 130 && t <= 137) || t == 143;
}

/* --- counters and events -------------------------------------------------------------------- */

static __always_inline void count(u32 slot, u32 reason)
{
    u32 index = slot * REASON_MAX + reason;
    u64 *value = counters.lookup(&index);
    if (value)
        *value += 1; /* per-CPU slot: no atomic needed */
}

/* Who a packet belongs to: the endpoint's id (allow and ct keys, events) and counters slot. */
struct owner {
    u32 endpoint_id;
    u32 flags;
    u32 slot;
};

static __always_inline void emit_drop(struct __sk_buff *skb, struct flow *f, struct owner *o,
                                      u32 reason, u16 audited)
{
    u32 endpoint_id = o->endpoint_id;
    u64 now = bpf_ktime_get_ns(); /* drops only: the precise clock for the event */
    struct rate_state *rs = event_rate.lookup(&endpoint_id);
    if (!rs) {
        struct rate_state fresh = {.window_start_ns = now, .count = 1};
        event_rate.update(&endpoint_id, &fresh);
    } else if (now - rs->window_start_ns >= 1000000000ULL) {
        /* Racy reset across CPUs: at worst a few extra events in a window. */
        rs->window_start_ns = now;
        rs->count = 1;
    } else if (rs->count >= FQDN_EVENTS_PER_SEC) {
        count(o->slot, REASON_EVENT_SUPPRESSED);
        return;
    } else {
        __sync_fetch_and_add(&rs->count, 1);
    }

    struct drop_event ev = {
        .timestamp_ns = now,
        .endpoint_id = endpoint_id,
        .reason = reason,
        .ifindex = skb->ifindex,
        .family = f->family,
        .protocol = f->protocol,
        .sport = f->sport,
        .dport = f->dport,
        .audited = audited,
    };
    __builtin_memcpy(ev.saddr, f->saddr, 16);
    __builtin_memcpy(ev.daddr, f->daddr, 16);
    if (events.ringbuf_output(&ev, sizeof(ev), 0) != 0)
        count(o->slot, REASON_EVENT_SUPPRESSED);
}

static __always_inline int deny(struct __sk_buff *skb, struct flow *f, struct owner *o, u32 reason)
{
    if (o->flags & EP_AUDIT) {
        count(o->slot, REASON_AUDITED);
        emit_drop(skb, f, o, reason, 1);
        return TC_ACT_OK;
    }
    count(o->slot, reason);
    emit_drop(skb, f, o, reason, 0);
    return TC_ACT_SHOT;
}

/* Exact expiry from coarse time (see FQDN_COARSE_SLACK_NS): 1 when `expiry_ns` has passed. */
static __always_inline int expired(u64 expiry_ns, u64 coarse_now)
{
    if (!expiry_ns)
        return 0;
    if (expiry_ns <= coarse_now)
        return 1;
    if (expiry_ns - coarse_now > FQDN_COARSE_SLACK_NS)
        return 0;
    return expiry_ns <= bpf_ktime_get_ns();
}

/* --- policy ----------------------------------------------------------------------------------- */

static __always_inline int ranges_admit(struct allow_value *v, struct flow *f)
{
    int any_port = f->later_fragment || f->protocol == IPPROTO_ICMP ||
                   f->protocol == IPPROTO_ICMPV6;
    u32 n = v->nranges;

#pragma unroll
    for (int i = 0; i < FQDN_MAX_PORT_RANGES; i++) {
        if (i >= n)
            break;
        struct port_range *r = &v->ranges[i];
        if (r->protocol && r->protocol != f->protocol)
            continue;
        if (any_port)
            return 1;
        /* Protocols without ports (ESP, GRE, ...) only match protocol-wildcard ranges. */
        if (f->protocol != IPPROTO_TCP && f->protocol != IPPROTO_UDP && r->protocol == 0)
            return 1;
        if (f->dport >= r->first && f->dport <= r->last)
            return 1;
    }
    return 0;
}

/* Whether an exact entry (NULL: none) admits the flow; if not, what it says against it, into
 * `reason`: PORT (the address is known, not that port) over EXPIRED over NO_ENTRY. */
static __always_inline int exact_admits(struct allow_value *v, struct flow *f, u64 now,
                                        u32 *reason)
{
    if (!v)
        return 0;
    if (expired(v->expiry_ns, now)) {
        if (*reason == REASON_DROP_NO_ENTRY)
            *reason = REASON_DROP_EXPIRED;
        return 0;
    }
    if (ranges_admit(v, f))
        return 1;
    *reason = REASON_DROP_PORT;
    return 0;
}

/* Returns REASON_PASS_ALLOWED or the drop reason. The exact entries are tried first (every DNS
 * worker's); when they are missing, expired or their ports do not match, the covering CIDR entry
 * in the trie still applies, so a learned /32 never narrows a broader static rule. */
static __always_inline u32 judge(u32 endpoint_id, struct flow *f, u64 now)
{
    u32 reason = REASON_DROP_NO_ENTRY;
    struct allow_value *v;
    struct exact_key ek FQDN_KEY_ALIGNED;
    put_head_addr_key(&ek, endpoint_id, f->daddr);
    if (exact_admits(allow_exact.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#if FQDN_WORKERS > 1 /* written out: bcc rewrites map calls outside macros only */
    if (exact_admits(allow_exact_1.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#endif
#if FQDN_WORKERS > 2
    if (exact_admits(allow_exact_2.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#endif
#if FQDN_WORKERS > 3
    if (exact_admits(allow_exact_3.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#endif
#if FQDN_WORKERS > 4
    if (exact_admits(allow_exact_4.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#endif
#if FQDN_WORKERS > 5
    if (exact_admits(allow_exact_5.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#endif
#if FQDN_WORKERS > 6
    if (exact_admits(allow_exact_6.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#endif
#if FQDN_WORKERS > 7
    if (exact_admits(allow_exact_7.lookup(&ek), f, now, &reason))
        return REASON_PASS_ALLOWED;
#endif

    struct allow_key lk FQDN_KEY_ALIGNED;
    u64 *lw = (u64 *)&lk;
    lw[0] = (32 + 128) | (u64)endpoint_id << 32; /* prefixlen, endpoint_id */
    lw[1] = addr_word(f->daddr, 0);
    lw[2] = addr_word(f->daddr, 1);
    v = allow.lookup(&lk);
    if (v) {
        if (expired(v->expiry_ns, now)) {
            if (reason == REASON_DROP_NO_ENTRY)
                reason = REASON_DROP_EXPIRED;
        } else if (ranges_admit(v, f)) {
            return REASON_PASS_ALLOWED;
        } else if (reason == REASON_DROP_NO_ENTRY) {
            reason = REASON_DROP_PORT;
        }
    }
    return reason;
}

/* Spreads flows over `ct`'s buckets; collisions cost a re-judgement, not a verdict (see ct_key).
 * Four independent multiplies folded together: a few ns, where a 44-byte key cost ~15 ns more. */
static __always_inline u64 flow_addr_hash(struct flow *f)
{
    u64 *s = (u64 *)f->saddr, *d = (u64 *)f->daddr;
    u64 h = s[0] * 0x9e3779b97f4a7c15ULL ^ s[1] * 0xc2b2ae3d27d4eb4fULL ^
            d[0] * 0x165667b19e3779f9ULL ^ d[1] * 0xff51afd7ed558ccdULL;
    return h ^ (h >> 29);
}

/* Writes every byte of `key` (FQDN_KEY_ALIGNED), pad included, in words (see put_head_addr_key). */
static __always_inline void flow_key(struct ct_key *key, struct flow *f, u32 endpoint_id)
{
    u64 h = flow_addr_hash(f);
    u64 *w = (u64 *)key;
    w[0] = endpoint_id | h << 32;                                 /* endpoint_id, addr_hash[0] */
    w[1] = h >> 32 | (u64)f->sport << 32 | (u64)f->dport << 48; /* addr_hash[1], sport, dport */
    *(u32 *)(w + 2) = f->protocol | (u32)f->family << 8;          /* protocol, family, pad */
}

static __always_inline int same_addrs(struct ct_value *v, struct flow *f)
{
    u64 *a = (u64 *)v->saddr, *b = (u64 *)v->daddr;
    u64 *s = (u64 *)f->saddr, *d = (u64 *)f->daddr;
    return ((a[0] ^ s[0]) | (a[1] ^ s[1]) | (b[0] ^ d[0]) | (b[1] ^ d[1])) == 0;
}

/* 1 when the flow is in `ct` and not idle; refreshes its last-seen at most every REFRESH_NS. */
static __always_inline int established(struct ct_key *key, struct flow *f, u64 now)
{
    struct ct_value *seen = ct.lookup(key);
    if (!seen || !same_addrs(seen, f))
        return 0;
    s64 idle = f->protocol == IPPROTO_TCP ? FQDN_CT_TCP_IDLE_NS : FQDN_CT_OTHER_IDLE_NS;
    s64 age = (s64)(now - seen->last_seen_ns); /* signed: another CPU may have just written */
    if (age >= idle)
        return 0;
    if (age > (s64)FQDN_CT_REFRESH_NS)
        seen->last_seen_ns = now;
    return 1;
}

int fqdn_egress(struct __sk_buff *skb)
{
    struct flow f = {};
    int parsed = parse_l3(skb, &f);
    if (parsed == PARSE_NOT_IP)
        return TC_ACT_OK;
    if (parsed == PARSE_MALFORMED)
        return TC_ACT_SHOT; /* the IP stack would discard a truncated IP header anyway */

    struct endpoint_key epk FQDN_KEY_ALIGNED; /* family, pad (zero), addr */
    put_head_addr_key(&epk, f.family, f.saddr);
    struct endpoint_value *ep = endpoints.lookup(&epk);
    struct owner o;
    if (!ep) {
        u32 ifindex = skb->ifindex;
        struct iface_value *iv = ifaces.lookup(&ifindex);
        if (iv && (iv->flags & EP_ENFORCE_EGRESS)) {
            o.endpoint_id = iv->endpoint_id;
            o.flags = iv->flags;
            o.slot = iv->slot;
            if (link_local_control(skb, &f)) {
                count(o.slot, REASON_PASS_ICMP_CONTROL);
                return TC_ACT_OK;
            }
            return deny(skb, &f, &o, REASON_DROP_SPOOFED);
        }
        return TC_ACT_OK;
    }
    o.endpoint_id = ep->endpoint_id;
    o.flags = ep->flags;
    o.slot = ep->slot;
    if (ep->ifindex && ep->ifindex != skb->ifindex)
        return deny(skb, &f, &o, REASON_DROP_SPOOFED);
    if (!(o.flags & EP_ENFORCE_EGRESS)) {
        count(o.slot, REASON_PASS_UNENFORCED);
        return TC_ACT_OK;
    }
    if (parse_l4(skb, &f) != PARSE_OK)
        return deny(skb, &f, &o, REASON_DROP_MALFORMED);
    if (f.protocol == IPPROTO_ICMP || f.protocol == IPPROTO_ICMPV6) {
        int cls = classify_icmp(&f);
        if (cls == ICMP_CONTROL) {
            count(o.slot, REASON_PASS_ICMP_CONTROL);
            return TC_ACT_OK;
        }
        if (cls == ICMP_REFUSE)
            return deny(skb, &f, &o, REASON_DROP_ICMP);
    }

    u64 now = bpf_ktime_get_coarse_ns(); /* see FQDN_COARSE_SLACK_NS */
    struct ct_key key FQDN_KEY_ALIGNED;
    flow_key(&key, &f, o.endpoint_id);
    /* A packet passes when its flow is established OR the allow map admits it; the order only
     * decides which lookup is paid first. A TCP SYN (without ACK) starts a connection, so it is
     * judged first and `ct` is consulted only if the judgement fails; every other packet tries
     * `ct` first. Later fragments have no ports and are never in `ct`. */
    int tracked = !f.later_fragment;
    if (tracked && !f.tcp_syn && established(&key, &f, now)) {
        count(o.slot, REASON_PASS_ESTABLISHED);
        return TC_ACT_OK;
    }

    u32 reason = judge(o.endpoint_id, &f, now);
    if (reason == REASON_PASS_ALLOWED) {
#if FQDN_RECORD_FLOWS
        if (tracked) {
            struct ct_value fresh = {.last_seen_ns = now, .created_ns = now};
            __builtin_memcpy(fresh.saddr, f.saddr, 16);
            __builtin_memcpy(fresh.daddr, f.daddr, 16);
            ct.update(&key, &fresh); /* a colliding flow's record is replaced, as LRU would */
        }
#endif
        count(o.slot, REASON_PASS_ALLOWED);
        return TC_ACT_OK;
    }
    if (tracked && f.tcp_syn && established(&key, &f, now)) {
        count(o.slot, REASON_PASS_ESTABLISHED);
        return TC_ACT_OK;
    }

    if (f.protocol == IPPROTO_TCP || f.protocol == IPPROTO_UDP) {
        struct dns_key dk FQDN_KEY_ALIGNED;
        u32 head = f.family | (u32)f.protocol << 8 | (u32)f.dport << 16; /* family, protocol, port */
        put_head_addr_key(&dk, head, f.daddr);
        if (dns_targets.lookup(&dk)) {
            count(o.slot, REASON_PASS_DNS);
            return TC_ACT_OK;
        }
        /* The unspecified address (0.0.0.0, stored ::ffff:0.0.0.0, or ::) stands for any server
         * on this port: transparent mode, where the node redirects every query to the proxy,
         * which judges it against rules.dns. */
        u64 unspecified[2] = {0, f.family == 4 ? 0xffff0000ULL : 0}; /* see map_v4 */
        put_head_addr_key(&dk, head, (u8 *)unspecified);
        if (dns_targets.lookup(&dk)) {
            count(o.slot, REASON_PASS_DNS);
            return TC_ACT_OK;
        }
    }
    return deny(skb, &f, &o, reason);
}

/* --- layout checks: datapath/maps.py passes its own sizes and offsets ------------------------ */
#define FQDN_CHECK(expr) _Static_assert(expr, #expr)
FQDN_CHECK(sizeof(struct endpoint_key) == 20);
FQDN_CHECK(sizeof(struct endpoint_value) == 16);
FQDN_CHECK(sizeof(struct allow_value) == 16 + 8 * FQDN_MAX_PORT_RANGES);
FQDN_CHECK(sizeof(struct ct_key) == 20);
FQDN_CHECK(sizeof(struct ct_value) == 48);
FQDN_CHECK(sizeof(struct drop_event) == 64);
#ifdef FQDN_EXPECT_LAYOUT_VERSION
FQDN_CHECK(FQDN_LAYOUT_VERSION == FQDN_EXPECT_LAYOUT_VERSION);
#endif
#ifdef FQDN_EXPECT_REASON_MAX
FQDN_CHECK(REASON_MAX == FQDN_EXPECT_REASON_MAX); /* counters are indexed slot * REASON_MAX */
#endif
#ifdef FQDN_EXPECT_LAYOUT
/* FQDN_EXPECT_LAYOUT expands to a list of FQDN_EXPECT(struct, field, offset) and
 * FQDN_EXPECT_SIZE(struct, size) items, generated by datapath/maps.py. */
#define FQDN_EXPECT_SIZE(s, n) FQDN_CHECK(sizeof(struct s) == (n));
#define FQDN_EXPECT(s, field, off) FQDN_CHECK(__builtin_offsetof(struct s, field) == (off));
FQDN_EXPECT_LAYOUT
#endif
