"""Supervision of the AF_PACKET workers: fork them, talk to them, start again the one that dies.

:class:`WorkerPool` is a :class:`~encapfwd.executor.LiveExecutor` of the controller: it receives the plan
and nothing else. Each worker, once forked, runs the plan in its own
:class:`~encapfwd.datapath.dispatcher.Dispatcher` (the plan is compiled already: workers call no plugin);
a new plan goes to every worker over its channel (``install``).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time
from typing import Callable, Dict, List, Optional

from encapfwd.runtime.afpacket.messaging import recv_msg, send_msg
from encapfwd.runtime.afpacket.worker import worker_main
from encapfwd.runtime.common import LiveError, log
from encapfwd.runtime.netlink import Interface


class WorkerPool:
    """N worker processes, each with its own rings, in one PACKET_FANOUT group (one worker: no group)."""

    kind = "afpacket"

    def __init__(
        self,
        iface: Interface,
        nworkers: int,
        fanout_group: int,
        *,
        cpus: Optional[List[int]] = None,
        answer_arp: bool = False,
        qdisc_bypass: bool = False,
        in_child: Optional[Callable[[], None]] = None,
        registry=None,
        flow_sink=None,
    ):
        self.iface = iface
        self.nworkers = nworkers
        self.fanout_group = fanout_group
        self.cpus = cpus
        self.answer_arp = answer_arp
        self.qdisc_bypass = qdisc_bypass
        self.in_child = in_child  # run in a new worker right after fork: drop the controller's descriptors
        self.workers: Dict[int, dict] = {}  # number -> {pid, channel}
        self.restarts = 0
        #: what a worker's dispatcher needs beside the plan: the plugins (selection algorithms of plugins),
        #: and the kernel's flow table for the flows it places (the XDP and TC engines' slow path)
        self.registry = registry
        self.flow_sink = flow_sink
        self.plan = None
        #: ``on_message(number, kind, payload)``: told the workers' messages that answer no pending request
        #: (flow synchronisation's asynchronous answers: engines/flowsync_workers.py); None: ignored
        self.on_message = None
        #: ``on_pressure(number, payload)``: told a worker's ``pressure`` messages (overload triage on, off or
        #: its shed ports changed: runtime/afpacket/triage.py); handled apart from :attr:`on_message`
        self.on_pressure = None
        #: the kernel program's pressure mode, followed by the workers' dispatchers (``set-pressure``): a worker
        #: started again is told too
        self.pressure = False

    # -- the executor interface

    def __len__(self) -> int:
        return len(self.workers)

    def start(self, plan) -> None:
        self.plan = plan
        for number in range(self.nworkers):
            self._spawn(number)

    def fds(self) -> List[int]:
        return [worker["channel"].fileno() for worker in self.workers.values()]

    def owns(self, fd: int) -> bool:
        return any(worker["channel"].fileno() == fd for worker in self.workers.values())

    def on_readable(self, fd: int) -> bool:
        """A worker's channel is readable: a late reply (ignored) or its death (started again)."""
        for number, worker in list(self.workers.items()):
            channel = worker["channel"]
            if channel.fileno() != fd:
                continue
            if not select.select([channel], [], [], 0)[0]:
                return True  # nothing there (a stale event)
            try:
                self._unsolicited(number, recv_msg(channel))
                # every message waiting (bounded): answers are read as fast as the requests go out
                for _ in range(64):
                    if not select.select([channel], [], [], 0)[0]:
                        break
                    self._unsolicited(number, recv_msg(channel))
                return True  # an unsolicited message (an asynchronous answer, or a late reply)
            except (EOFError, OSError):
                pass
            channel.close()
            try:
                _, status = os.waitpid(worker["pid"], 0)
            except ChildProcessError:
                status = -1
            del self.workers[number]
            self.restarts += 1
            self._unsolicited(number, ("pressure", {"on": False, "why": "the worker exited"}))
            log(f"worker {number} (pid {worker['pid']}) exited (status {status}); starting it again")
            try:
                self._spawn(number)
            except Exception as exc:  # noqa: BLE001 - reported; the controller stops
                log(f"cannot restart worker {number}: {exc}")
                return False
            if self.pressure:
                try:
                    send_msg(self.workers[number]["channel"], ("set-pressure", True))
                except OSError:
                    pass
            return True
        return True

    def tell_all(self, message) -> None:
        """Send *message* to every worker without waiting for an answer (none is given)."""
        if message[0] == "set-pressure":
            self.pressure = bool(message[1])
        for worker in list(self.workers.values()):
            try:
                send_msg(worker["channel"], message)
            except OSError:
                pass

    def install(self, plan) -> Dict[str, Optional[str]]:
        answers = self._ask_all(("reload", plan), "reloaded")
        self.plan = plan
        return {f"worker {n}": error for n, error in answers.items()}

    def report(self) -> List[dict]:
        answers = self._ask_all(("report",), "report")
        return [answers[n] for n in sorted(answers)]

    def close(self) -> List[dict]:
        finals: Dict[int, dict] = {}
        for worker in self.workers.values():
            try:
                send_msg(worker["channel"], ("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for number, worker in list(self.workers.items()):
            channel = worker["channel"]
            channel.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while True:
                    kind, payload = recv_msg(channel)
                    if kind == "stopped":
                        finals[number] = payload
                        break
            except (EOFError, OSError, socket.timeout):
                pass
            channel.close()
            try:
                pid, _ = os.waitpid(worker["pid"], os.WNOHANG)
                if pid == 0:
                    os.kill(worker["pid"], signal.SIGTERM)
                    time.sleep(0.2)
                    pid, _ = os.waitpid(worker["pid"], os.WNOHANG)
                    if pid == 0:
                        os.kill(worker["pid"], signal.SIGKILL)
                        os.waitpid(worker["pid"], 0)
            except (ChildProcessError, ProcessLookupError):
                pass
        self.workers.clear()
        return [finals[n] for n in sorted(finals)]

    def close_in_child(self) -> None:
        for worker in self.workers.values():
            worker["channel"].close()

    # -- inside

    def _spawn(self, number: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cpu = self.cpus[number % len(self.cpus)] if self.cpus else None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                parent_end.close()
                if self.in_child is not None:
                    self.in_child()
                self.close_in_child()
                signal.set_wakeup_fd(-1)
                from encapfwd.datapath.dispatcher import Dispatcher

                code = worker_main(
                    number,
                    self.iface,
                    self.plan.config,
                    Dispatcher(self.plan, self.registry, flow_sink=self.flow_sink),
                    child_end,
                    # one worker needs no fanout group: a group hashes every frame of the interface (the flow
                    # dissector) before any filter runs, even the frames a TC program goes on to forward
                    self.fanout_group if self.nworkers > 1 else 0,
                    cpu,
                    self.answer_arp,
                    self.qdisc_bypass,
                )
            except BaseException as exc:  # noqa: BLE001
                try:
                    log(f"worker {number} failed: {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        child_end.close()
        try:
            message = recv_msg(parent_end)
        except (EOFError, OSError) as exc:
            message = ("error", f"worker {number} died while starting ({type(exc).__name__})")
        if message[0] != "ready":
            os.waitpid(pid, 0)
            parent_end.close()
            raise LiveError(message[1])
        self.workers[number] = {"pid": pid, "channel": parent_end}

    def _ask_all(self, message, reply_kind: str, timeout: float = 5.0) -> Dict[int, object]:
        answers = {}
        for worker in list(self.workers.values()):
            try:
                send_msg(worker["channel"], message)
            except OSError:
                continue
        for number, worker in list(self.workers.items()):
            channel = worker["channel"]
            channel.settimeout(timeout)
            try:
                while True:
                    kind, payload = recv_msg(channel)
                    if kind == reply_kind:
                        answers[number] = payload
                        break
                    self._unsolicited(number, (kind, payload))
            except (EOFError, OSError, socket.timeout):
                pass
            finally:
                channel.settimeout(None)
        return answers

    ask_all = _ask_all

    def _unsolicited(self, number: int, message) -> None:
        try:
            kind, payload = message
            if kind == "pressure":
                if self.on_pressure is not None:
                    self.on_pressure(number, payload)
                return
            if self.on_message is None:
                return
            self.on_message(number, kind, payload)
        except Exception as exc:  # noqa: BLE001 - never stops the controller
            log(f"worker {number}: message not handled: {type(exc).__name__}: {exc}")
