/* New flows for bench/flowsync.py --forwarding: runs the loaded encapfwd program (BPF_PROG_TEST_RUN) on TCP
 * SYNs of random clients at a steady rate, so that the program itself places each flow (flow table entry,
 * and with flow synchronisation on, a record in its new_flows ring), as a flood of new connections would.
 *
 *   flow_placer PROG_FD RATE FRAME_HEX COUNTER_FD
 *
 * PROG_FD: the program (inherited); FRAME_HEX: an Ethernet/IPv4/TCP SYN frame addressed to the dispatcher
 * (its IPv4 source and TCP source port are replaced per frame, the IPv4 checksum recomputed); COUNTER_FD: a
 * shared memory file whose u64 at offset 144 counts the frames run (the bench's counter slot 3). Runs until
 * SIGTERM. Built by the bench with the system's C compiler; only the UAPI header linux/bpf.h. */
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_random(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

static void ip_checksum(uint8_t *ip)
{
    uint32_t sum = 0;
    ip[10] = ip[11] = 0;
    for (int i = 0; i < 20; i += 2)
        sum += (ip[i] << 8) | ip[i + 1];
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    sum = ~sum & 0xFFFF;
    ip[10] = sum >> 8;
    ip[11] = sum & 0xFF;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: flow_placer PROG_FD RATE FRAME_HEX COUNTER_FD\n");
        return 2;
    }
    int prog = atoi(argv[1]);
    double rate = atof(argv[2]);
    const char *hex = argv[3];
    size_t len = strlen(hex) / 2;
    uint8_t frame[2048], out[4096];
    if (len < 54 || len > sizeof(frame)) {
        fprintf(stderr, "flow_placer: the frame must be 54 to 2048 bytes\n");
        return 2;
    }
    for (size_t i = 0; i < len; i++)
        sscanf(hex + 2 * i, "%2hhx", &frame[i]);
    uint64_t *counter = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, atoi(argv[4]), 0);
    if (counter == MAP_FAILED) {
        perror("flow_placer: mmap");
        return 2;
    }
    signal(SIGTERM, on_term);
    rng ^= (uint64_t)getpid() << 32 ^ (uint64_t)(now_s() * 1e9);
    union bpf_attr attr;
    uint64_t done = 0, errors = 0;
    double started = now_s();
    while (!stop) {
        uint64_t due = (uint64_t)((now_s() - started) * rate);
        if (due <= done) {
            struct timespec pause = {0, 200000}; /* 0.2 ms */
            nanosleep(&pause, NULL);
            continue;
        }
        for (; done < due && !stop; done++) {
            uint32_t r = next_random();
            memcpy(frame + 26, &r, 4);                /* IPv4 source */
            uint16_t sport = 1024 + (next_random() % 64000);
            frame[34] = sport >> 8;
            frame[35] = sport & 0xFF;
            ip_checksum(frame + 14);
            memset(&attr, 0, sizeof(attr));
            attr.test.prog_fd = prog;
            attr.test.data_in = (uint64_t)(uintptr_t)frame;
            attr.test.data_size_in = len;
            attr.test.data_out = (uint64_t)(uintptr_t)out;
            attr.test.data_size_out = sizeof(out);
            attr.test.repeat = 1;
            if (syscall(__NR_bpf, BPF_PROG_TEST_RUN, &attr, sizeof(attr)))
                errors++;
            counter[18] = done + 1;   /* offset 144: the bench's slot 3, first word */
        }
    }
    if (errors)
        fprintf(stderr, "flow_placer: %llu test runs failed\n", (unsigned long long)errors);
    return 0;
}
