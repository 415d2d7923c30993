// SPDX-License-Identifier: GPL-2.0-only
/* encapfwd's TC (sched_cls) data plane: the XDP program's source, built for socket buffers at tc ingress.
 * The context-specific parts are in encapfwd_ctx.h; everything else is encapfwd.bpf.c, shared. */
#define ENCAPFWD_TC 1
#include "encapfwd.bpf.c"
