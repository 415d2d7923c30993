"""Engines feed frames to a :class:`~encapfwd.dispatcher.Dispatcher`: ``replay`` (pcap files) and ``live``
(Linux AF_PACKET). Import the one you need; this package imports nothing heavy."""
