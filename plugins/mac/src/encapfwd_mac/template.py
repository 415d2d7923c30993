"""MAC forwarding as a template: ``template(server, egress) -> Template``.

P' is sent unchanged (the dispatcher already decremented its TTL or hop limit) in an Ethernet frame from the
dispatcher's MAC to the next hop (the server's MAC; the core refuses MAC forwarding to a server that is not
on an attached network): an empty header and no fields. The ethertype follows the IP version of P'
(0x0800 or 0x86DD), as every engine does for an empty template.
"""

from encapfwd.records import Template

EMPTY = Template()


def template(server, egress) -> Template:
    return EMPTY
