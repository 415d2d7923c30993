// SPDX-License-Identifier: GPL-2.0-only
/*
 * LD_PRELOAD shim for trafgen (Debian netsniff-ng), compiled by bench/live_helpers.py with gcc into a
 * temporary folder at bench time:  gcc -O2 -shared -fPIC -o shim.so trafgen_shim.c -ldl
 *
 * Why: inside a network namespace trafgen cannot raise net.core.wmem_default/max, so its packet socket keeps
 * the default 208 KiB send buffer. On a veth whose peer has a NAPI ring (GRO or an XDP program) the frames
 * wait in that ring still charged to the sender's socket; once 208 KiB wait there, the TX ring flush
 * (sendto) fails with EAGAIN and trafgen exits within a second. Giving every AF_PACKET socket a large buffer
 * with SO_SNDBUFFORCE (root: CAP_NET_ADMIN, not bounded by wmem_max) fixes it.
 *
 * socket(AF_PACKET, …) gets SO_SNDBUFFORCE = TRAFGEN_SHIM_SNDBUF bytes (environment, default 64 MiB) at
 * once; a later setsockopt(SOL_SOCKET, SO_SNDBUF) on such a socket is turned into SO_SNDBUFFORCE with the
 * larger of the two sizes, so that trafgen cannot shrink it again.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/socket.h>

#ifndef AF_PACKET
#define AF_PACKET 17
#endif
#ifndef SO_SNDBUFFORCE
#define SO_SNDBUFFORCE 32
#endif

#define MAX_FD 4096

static unsigned char packet_fd[MAX_FD];

static int wanted(void)
{
    const char *s = getenv("TRAFGEN_SHIM_SNDBUF");
    long v = s ? strtol(s, NULL, 0) : 0;
    if (v <= 0 || v > (1L << 30))
        v = 64L << 20;
    return (int)v;
}

static int (*real_setsockopt_fn(void))(int, int, int, const void *, socklen_t)
{
    static int (*real)(int, int, int, const void *, socklen_t);
    if (!real)
        real = (int (*)(int, int, int, const void *, socklen_t))dlsym(RTLD_NEXT, "setsockopt");
    return real;
}

int socket(int domain, int type, int protocol)
{
    static int (*real)(int, int, int);
    if (!real)
        real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = real(domain, type, protocol);
    if (fd >= 0 && domain == AF_PACKET) {
        int size = wanted();
        real_setsockopt_fn()(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size));
        if (fd < MAX_FD)
            packet_fd[fd] = 1;
    }
    return fd;
}

int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
{
    if (fd >= 0 && fd < MAX_FD && packet_fd[fd] && level == SOL_SOCKET && name == SO_SNDBUF &&
        value && len >= sizeof(int)) {
        int size = *(const int *)value;
        if (size < wanted())
            size = wanted();
        return real_setsockopt_fn()(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size));
    }
    return real_setsockopt_fn()(fd, level, name, value, len);
}

int close(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAX_FD)
        packet_fd[fd] = 0;
    return real(fd);
}
