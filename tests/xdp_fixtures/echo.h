/* Shared by echo.c and its test (tests/test_xdp_libbpf.py mirrors these numbers). */
#ifndef ECHO_H
#define ECHO_H

#define ECHO_CNT_PACKETS 0   /* every frame xdp_echo saw */
#define ECHO_CNT_TX 1        /* IPv4 frames sent back */
#define ECHO_CNT_PASS 2      /* other frames passed to the stack */
#define ECHO_CNT_SEEN 3      /* frames xdp_count_pass saw */
#define ECHO_NCOUNTERS 4

#define ECHO_TABLE_SIZE 65537
#define ECHO_PREPEND 4

struct echo_config {
	__u32 prepend;   /* non-zero: prepend ECHO_PREPEND bytes to IPv4 frames */
	__u32 tag;       /* first 2 of them (network order); the next 2: inner map slot 0 */
};

#endif
