/* udp_blast: send PACKETS small UDP datagrams round-robin to the given addresses (all of one
 * family) with sendmmsg, and print the calling thread's CPU time per packet in ns.
 *
 *     udp_blast PACKETS ADDRESS...
 *
 * Thread CPU time (CLOCK_THREAD_CPUTIME_ID) counts the kernel work done in this thread's
 * sendmmsg calls (routing, netfilter hooks, the device's xmit) and not the time other processes
 * held the CPU, so a shared machine disturbs it less than wall time. Used by nft_compare.py. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 256
#define MAXDST 1024

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: udp_blast PACKETS ADDRESS...\n");
        return 2;
    }
    long packets = atol(argv[1]);
    int ndst = argc - 2 > MAXDST ? MAXDST : argc - 2;
    static struct sockaddr_storage dst[MAXDST];
    int family = strchr(argv[2], ':') ? AF_INET6 : AF_INET;
    socklen_t len = family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    for (int i = 0; i < ndst; i++) {
        memset(&dst[i], 0, sizeof dst[i]);
        if (family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&dst[i];
            a->sin6_family = AF_INET6;
            a->sin6_port = htons(443);
            if (inet_pton(AF_INET6, argv[2 + i], &a->sin6_addr) != 1) return 2;
        } else {
            struct sockaddr_in *a = (struct sockaddr_in *)&dst[i];
            a->sin_family = AF_INET;
            a->sin_port = htons(443);
            if (inet_pton(AF_INET, argv[2 + i], &a->sin_addr) != 1) return 2;
        }
    }
    int fd = socket(family, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    static char payload[32];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    long sent = 0, errors = 0;
    int next = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    while (sent < packets) {
        int n = packets - sent < BATCH ? (int)(packets - sent) : BATCH;
        for (int i = 0; i < n; i++) {
            iov[i].iov_base = payload;
            iov[i].iov_len = sizeof payload;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &dst[next];
            msgs[i].msg_hdr.msg_namelen = len;
            next = (next + 1) % ndst;
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r <= 0) { errors++; if (errors > 1000) { perror("sendmmsg"); return 1; } continue; }
        sent += r;
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    printf("%.2f\n", ns / (double)packets);
    return 0;
}
