"""The keywords the ``dscontrol``-style commands accept for each object, with a line of help each."""

EXECUTOR_KEYWORDS = {
    "nfa": "the dispatcher's own IPv4 address; default outer source of tunnels",
    "mac": "the dispatcher's MAC (source of frames it sends; live mode reads the interface's)",
    "interface": "the interface live mode listens and sends on",
    "networks": "comma-separated networks the dispatcher is attached to (e.g. 10.0.2.0/24,10.0.3.0/24)",
    "gateway": "next hop (router) for servers not on an attached network",
    "gatewaymac": "the gateway's MAC (offline replay, or to pin it)",
    "mtu": "egress MTU (default 1500)",
    "encapttl": "TTL of outer encapsulation headers (default 64)",
    "maxflows": "bound of the flow table (default 1000000; LRU eviction beyond it)",
    "newflowlimit": "new kernel flow entries per CPU per second (XDP, TC; default 125000, 0 = no limit); "
                    "beyond it new flows are forwarded but not remembered",
    "handuplimit": "new flows of wrr/wlc ports the kernel program hands up per CPU per second (XDP, TC; "
                   "default 20000, 0 = no limit); beyond it the kernel places them by the port's weighted table",
    "bgppeer": "the BGP peer (router) the cluster addresses are announced to (none: no BGP)",
    "bgpasn": "this dispatcher's AS number",
    "bgppeerasn": "the peer's AS number",
    "bgprouterid": "this speaker's BGP router ID (default nfa)",
    "bgpnexthop": "the next hop announced for the IPv4 cluster addresses (default nfa)",
    "bgpnexthop6": "the next hop announced for the IPv6 cluster addresses (required when there are any)",
    "bgpholdtime": "BGP hold time in seconds, 3 or more (default 9; keepalives every third of it)",
    "syncpeers": "comma-separated addresses of the other dispatchers flows are synchronised with (none: off)",
    "syncport": "UDP port of flow synchronisation, here and on the peers (default 7900)",
    "synckey": "file of the group's HMAC-SHA256 key for flow synchronisation (mode 0600)",
}
PORT_KEYWORDS = {
    "porttype": "tcp, udp or both (default both)",
    "selectionalgorithm": "maglev (default), wrr or wlc, or one a plugin provides",
    "stickytime": "seconds a client keeps its server after its last packet (0 = off)",
    "staletimeout": "seconds an idle flow is kept (default 300)",
}
ADVISOR_KEYWORDS = {
    "interval": "seconds between two probes of a server (default 5; e.g. 0.5)",
    "timeout": "seconds a probe may take in total, at most the interval (default 3)",
    "rise": "good probes in a row that mark a down server up (default 2)",
    "fall": "failed probes in a row that mark a server down (default 3)",
    "via": "address (default: probe the server's address) or forwarding (the cluster address, through "
           "the server's forwarding method; IPv4)",
    "hold": "least seconds between two state changes of one server (flap damping; default 2, 0 = none)",
}
SERVER_KEYWORDS = {
    "weight": "0-100 (default 1); 0 quiesces: no new flows, existing ones continue",
    "mac": "the server's MAC (required for servers on an attached network in replay mode)",
    "encapforward": "yes or no (default no): encapsulate instead of MAC forwarding",
    "encaptype": "ipip (default), gre, or one a plugin provides",
    "encapcond": "always (default) or auto (encapsulate only when not on an attached network)",
    "encapsource": "outer IPv4 source for this server's tunnel (default: executor nfa)",
    "grekey": "RFC 2890 GRE key, 0-4294967295 (GRE only)",
}
