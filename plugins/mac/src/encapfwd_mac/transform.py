"""MAC forwarding per-server transform: ``build(server, egress)`` → ``transform(p_prime) -> frame``.

P' is sent unchanged (the dispatcher already decremented its TTL or hop limit) in an Ethernet frame from the
dispatcher's MAC to the next hop (the server's MAC; the core refuses MAC forwarding to a server that is not
on an attached network). The ethertype follows the IP version of P': 0x0800 or 0x86DD.
"""

from encapfwd.packet import mac_bytes


def build(server, egress):
    macs = mac_bytes(egress.dst_mac) + mac_bytes(egress.src_mac)
    eth4 = macs + b"\x08\x00"
    eth6 = macs + b"\x86\xdd"

    def transform(p: bytes) -> bytes:
        try:
            if p[0] >> 4 == 6:
                return eth6 + p
        except IndexError:
            pass
        return eth4 + p

    return transform
