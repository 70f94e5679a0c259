"""Starting one training run as several processes (hosts): how this process learns its place, and the few
agreements the processes must reach outside the compiled step.

Where the place comes from, first match wins:
  1. `attnlab train --coordinator HOST:PORT --num-processes N --process-id I` (all three);
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (all three);
  3. a SLURM job step with more than one task (SLURM_NTASKS > 1), or a TPU pod slice with more than one worker
     (TPU_WORKER_HOSTNAMES lists several): jax's own cluster detection fills in everything;
  4. otherwise one process, and `jax.distributed` is not started.

Every process runs the same loop on the same global mesh and takes the same decisions; process 0 alone holds the
run directory's lock and writes config.yaml, data.json, metrics.jsonl, W&B and the heatmaps. Checkpoints are
written by all processes together (each its shards). The processes must see one shared run directory.
Every multi-process run first meets on the coordinator's PORT+1 (`rendezvous`; for SLURM and TPU pods the
coordinator, count and id come from jax's cluster detection first), so that a missing or misconfigured process is
a one-line error rather than an abort inside jax's runtime. The connections stay open for the run (`_Links`): when
a process dies, the others learn it at once (TCP keepalive finds a host that went down) and each prints one line,
which process is gone, the last checkpoint and to rerun all processes, and exits with EXIT_PEER_LOST, before
jax's runtime would abort them with pages of gRPC errors. A process that stops with an error says so; the others
give it FAIL_GRACE_S to be the same error everywhere (each then prints its own) before they stop too, and process
0, whose exit ends jax's coordination service under the others, waits as long for them to end first.
On CPU, cross-process collectives go through gloo, and `--cpu-devices N` gives each process N host devices
(how the tests build a 2-process x 4-device mesh on one machine).
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import threading
import time
from typing import Mapping

import numpy as np


class LaunchError(ValueError):
    """The multi-process settings are incomplete or inconsistent; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in the run. `source` says where it came from: flags, env, slurm, tpu or single."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cpu_devices: int | None = None
    timeout_s: int = 300

    @property
    def multi(self) -> bool:
        return self.source != "single"


_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_HOST_PORT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:(\d+)$")


def resolve(coordinator: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None, *, cpu_devices: int | None = None, timeout_s: int = 300,
            environ: Mapping[str, str] = os.environ) -> Launch:
    """This process's `Launch` from the flags, else the environment (see the module docstring)."""
    if cpu_devices is not None and cpu_devices < 1:
        raise LaunchError(f"--cpu-devices must be at least 1, got {cpu_devices}")
    if timeout_s < 1:
        raise LaunchError(f"--init-timeout must be at least 1 second, got {timeout_s}")
    flags = (coordinator, num_processes, process_id)
    if any(v is not None for v in flags):
        return _explicit("flags", ("--coordinator", "--num-processes", "--process-id"), flags, cpu_devices, timeout_s)
    env = tuple(environ.get(k) or None for k in _ENV)
    if any(v is not None for v in env):
        return _explicit("env", _ENV, env, cpu_devices, timeout_s)
    if _int_or_none(environ.get("SLURM_NTASKS")) not in (None, 0, 1) and environ.get("SLURM_JOB_ID"):
        return Launch("slurm", cpu_devices=cpu_devices, timeout_s=timeout_s)
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return Launch("tpu", cpu_devices=cpu_devices, timeout_s=timeout_s)
    return Launch("single", cpu_devices=cpu_devices, timeout_s=timeout_s)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _explicit(source: str, names: tuple[str, str, str], values: tuple, cpu_devices, timeout_s) -> Launch:
    missing = [n for n, v in zip(names, values) if v is None]
    if missing:
        raise LaunchError(f"{', '.join(missing)} missing: a multi-process run needs all of {', '.join(names)}")
    coordinator, n_text, i_text = values
    if not _HOST_PORT.match(str(coordinator)) or not 0 < int(_HOST_PORT.match(str(coordinator)).group(1)) < 65536:
        raise LaunchError(f"{names[0]} {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234, the address of "
                          f"process 0 and a free port)")
    n, i = _int_or_none(str(n_text)), _int_or_none(str(i_text))
    if n is None or n < 1:
        raise LaunchError(f"{names[1]} must be a positive integer, got {n_text!r}")
    if i is None or not 0 <= i < n:
        raise LaunchError(f"{names[2]} must be an integer in 0..{n - 1} for {n} processes, got {i_text!r}")
    return Launch(source, str(coordinator), n, i, cpu_devices, timeout_s)


def initialize(launch: Launch) -> None:
    """Set up jax for `launch`; before anything touches a device. Raises LaunchError when the processes do not
    meet within the timeout."""
    import jax

    if launch.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", launch.cpu_devices)
    if not launch.multi:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.source in ("slurm", "tpu"):
        launch = detected(launch)
    # jax's runtime aborts the process (a C++ stack trace, no exception) when the processes do not all register in
    # time; meeting first on PORT+1 turns that into a one-line error that names who is missing.
    global _links
    _links = _Links(launch.process_id, launch.num_processes, rendezvous(launch))
    _links.start()
    # The preemption notices (SIGTERM handling is lm.stop's) would only add log lines when a process is lost.
    jax.config.update("jax_enable_preemption_service", False)
    # A watcher that hears of a lost process takes the GIL at once: the runtime hears of it at the same moment.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    try:
        # Detection is off: jax's would give a SLURM process one GPU (SLURM_LOCALID) where ours owns its node's.
        jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                   initialization_timeout=launch.timeout_s, cluster_detection_method="deactivate")
    except Exception as e:  # jax raises its runtime's errors (unavailable, ...) as plain exceptions
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LaunchError(f"jax.distributed could not start at {launch.coordinator}: {first}") from None


def detected(launch: Launch) -> Launch:
    """`launch` (source slurm or tpu) with the coordinator, process count and id jax's cluster detection finds."""
    from jax._src.clusters import ClusterEnv

    try:
        coordinator, n, me, _ = ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, launch.timeout_s)
    except Exception as e:  # the metadata server or the scheduler's variables: whatever failed, say it once
        raise LaunchError(f"{launch.source} detection failed: {type(e).__name__}: {e}") from None
    if coordinator is None or n is None or me is None:
        raise LaunchError(f"{launch.source} detection found no coordinator; pass --coordinator, --num-processes "
                          f"and --process-id")
    host, port = _split(coordinator)
    if port == 65535:  # the rendezvous needs PORT+1 (SLURM's port is derived from the job id, up to 65535)
        coordinator = f"{host}:{port - 1}"
    return dataclasses.replace(launch, coordinator=coordinator, num_processes=int(n), process_id=int(me))


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def rendezvous(launch: Launch) -> dict[int, socket.socket]:
    """All `launch.num_processes` processes meet on the coordinator's host at PORT+1 before jax starts: process
    0 listens, the others connect (retrying until the timeout) and say their id and process count. Raises
    LaunchError on every process when they do not all arrive in time, or disagree. Returns the open connections
    (process 0: one per other process; the others: the one to process 0), by the process at the other end."""
    host, port = _split(launch.coordinator)
    n, me, deadline = launch.num_processes, launch.process_id, time.monotonic() + launch.timeout_s
    if n == 1:
        return {}
    if me == 0:
        return _serve(host, port, n, deadline, launch.timeout_s)
    return {0: _join(host, port, n, me, deadline, launch.timeout_s)}


def _serve(host: str, port: int, n: int, deadline: float, timeout_s: int) -> dict[int, socket.socket]:
    for p in (port, port + 1):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", p))
            except OSError as e:
                raise LaunchError(f"process 0 cannot listen on port {p} ({e.strerror}): the coordinator needs "
                                  f"PORT and PORT+1 free; pick another --coordinator port") from None
    peers: dict[int, socket.socket] = {}
    problem = None
    with socket.create_server(("", port + 1), reuse_port=False) as server:
        while len(peers) < n - 1 and problem is None:
            server.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                missing = sorted(set(range(1, n)) - set(peers))
                problem = (f"only {len(peers) + 1} of {n} processes arrived within {timeout_s} s (missing process "
                           f"id(s) {', '.join(map(str, missing))}); start them with --coordinator {host}:{port} "
                           f"--num-processes {n}, or raise --init-timeout")
                break
            conn.settimeout(10)
            try:
                their_id, their_n = (int(x) for x in conn.recv(64).decode().split())
            except (OSError, ValueError):
                conn.close()
                continue
            if their_n != n:
                problem = f"process {their_id} was started with {their_n} processes, process 0 with {n}"
            elif their_id in peers or not 0 < their_id < n:
                problem = f"two processes claim process id {their_id}" if their_id in peers else \
                    f"a process claims id {their_id}, outside 1..{n - 1}"
            peers.setdefault(their_id, conn)
            if conn is not peers[their_id]:
                conn.sendall(f"error {problem}".encode())
                conn.close()
    for conn in peers.values():
        try:
            conn.sendall((f"error {problem}" if problem else "ok").encode())
        except OSError:
            pass
        if problem:
            conn.close()
    if problem:
        raise LaunchError(problem)
    return peers


def _join(host: str, port: int, n: int, me: int, deadline: float, timeout_s: int) -> socket.socket:
    while True:
        try:
            conn = socket.create_connection((host, port + 1), timeout=max(min(deadline - time.monotonic(), 5), 0.001))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise LaunchError(f"process 0 did not answer at {host}:{port + 1} within {timeout_s} s; start it with "
                                  f"--coordinator {host}:{port} --num-processes {n} --process-id 0, or raise "
                                  f"--init-timeout") from None
            time.sleep(0.2)
    conn.sendall(f"{me} {n}".encode())
    conn.settimeout(max(deadline - time.monotonic(), 0.001) + 5)
    try:
        reply = conn.recv(2).decode()  # "ok", or the start of "error ..."
        if reply != "ok":
            reply += conn.recv(1024).decode()
    except OSError:
        reply = ""
    if reply != "ok":
        conn.close()
        raise LaunchError(reply.removeprefix("error ") if reply.startswith("error ")
                          else f"process 0 at {host}:{port + 1} went away before all {n} processes arrived")
    return conn


EXIT_PEER_LOST = 4  # the exit status of a process whose run lost another process
FAIL_GRACE_S = 10.0  # how long the others wait for a process that stopped with an error to be joined by theirs
PROGRESS_EVERY_S = 60.0  # at most one progress line per process in this long
_links: _Links | None = None
_progress: dict[str, int | None] = {"step": None, "checkpoint": None}
_last_progress_line = -float("inf")


GONE = "is gone (its process ended or its host went down)"
FAILED = "stopped with an error (its own output says which)"


class _Links:
    """The rendezvous connections of one process, kept open while the run lasts, each watched by a thread.

    Messages, one per line: `bye` (the sender ends normally), `fail` (it stops with an error), `gone K` (process 0
    tells the others that process K is gone). A connection that ends without `bye` or `fail` is a process that
    died; process 0 passes that on to the rest.
    """

    def __init__(self, me: int, n: int, conns: dict[int, socket.socket]):
        self.me, self.n, self.conns = me, n, conns
        self.ended: set[int] = set()  # processes that said bye or fail
        self.trouble: tuple[int, str] | None = None  # the first other process that failed or is gone, and how
        self.lock = threading.Lock()
        self.closing = False
        self.failed = False  # this process's part ended with an error
        for conn in conns.values():
            conn.settimeout(None)
            _keepalive(conn)

    def start(self) -> None:
        for pid, conn in self.conns.items():
            threading.Thread(target=self._watch, args=(pid, conn), daemon=True, name=f"peer-{pid}").start()

    def _watch(self, pid: int, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(256)
            except OSError:
                data = b""
            if not data:
                if pid not in self.ended:
                    self._lost(pid, GONE)  # ends this process, unless it is ending already
                self.ended.add(pid)
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                word, _, arg = line.decode(errors="replace").partition(" ")
                if word == "bye":
                    self.ended.add(pid)
                elif word == "fail":  # nothing else comes from it; give this process time to end by itself
                    self.ended.add(pid)
                    self.trouble = self.trouble or (pid, FAILED)
                    time.sleep(FAIL_GRACE_S)
                    self._lost(pid, FAILED)
                    return
                elif word == "gone" and arg.isdigit():
                    self._lost(int(arg), GONE)

    def _lost(self, pid: int, how: str) -> None:
        self.trouble = self.trouble or (pid, how)
        with self.lock:
            if self.closing:
                return
            self.closing = True
        self._report(pid, how)

    def _report(self, pid: int | None, how: str) -> None:
        """The one line about process `pid` (None: `how` says it all), and the end of this process (process 0
        first tells the rest)."""
        if self.me == 0 and pid is not None:
            self._send(f"gone {pid}", skip=pid)
        step, ckpt = _progress["step"], _progress["checkpoint"]
        where = f"the last checkpoint is step {ckpt}" if ckpt is not None else "no checkpoint was saved yet"
        at = f" (this one, process {self.me}, was at step {step})" if step is not None else ""
        what = how if pid is None else f"process {pid} of {self.n} {how}"
        sys.stdout.flush()
        sys.stderr.write(f"error: {what}; {where}{at}: rerun all {self.n} processes to resume\n")
        exit_now(EXIT_PEER_LOST)

    def _send(self, message: str, skip: int | None = None) -> None:
        for pid, conn in self.conns.items():
            if pid != skip:
                try:
                    conn.sendall((message + "\n").encode())
                except OSError:
                    pass

    def close(self, ok: bool, blame_others: bool = False) -> None:
        """Tell the others this process ends (`ok`: normally; else with an error), and stop watching. With
        `blame_others`, an error that follows another process's failure or death reports that process instead."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
        if blame_others and self.trouble is not None:
            self._report(*self.trouble)
        self.failed = not ok
        self._send("bye" if ok else "fail")
        if not ok and self.me == 0:
            # Process 0 hosts jax's coordination service, whose end aborts every other process's runtime: wait
            # (at most FAIL_GRACE_S) for the others to end by themselves, each with its own line, most often the
            # same error.
            deadline = time.monotonic() + FAIL_GRACE_S
            while time.monotonic() < deadline and not self.ended >= set(self.conns):
                time.sleep(0.05)
        for conn in self.conns.values():
            conn.close()


def _keepalive(conn: socket.socket) -> None:
    """TCP keepalive probes every few seconds, so a host that went down (no FIN) ends the connection in ~30 s."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def finish(ok: bool, own_error: bool = True) -> None:
    """The end of this process's part in a multi-process run (a no-op otherwise): tell the others. An error that
    is not the process's own (not the user's input: a collective that failed, say) may follow another process's
    failure: then, after a moment for the watchers to hear of it, the line names that process instead."""
    if _links is None:
        return
    if not (ok or own_error):
        time.sleep(2.0)
    _links.close(ok, blame_others=not (ok or own_error))


def part_failed() -> bool:
    """Whether this process's part in a multi-process run ended with an error. Such a process must end with
    `exit_now`: jax's exit handler would wait in a shutdown barrier for processes that may never come and then abort
    with a C++ trace."""
    return _links is not None and _links.failed


def exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def note_progress(step: int | None = None, checkpoint: int | None = None) -> None:
    """Where this process is (the last step done, the last checkpoint saved), for the line a lost process prints;
    with several processes, a sparse `process I of N: step S` line (at most every PROGRESS_EVERY_S) shows it is
    alive in its own shell."""
    global _last_progress_line
    if checkpoint is not None:
        _progress["checkpoint"] = checkpoint
    if step is None:
        return
    _progress["step"] = step
    if _links is not None and time.monotonic() - _last_progress_line >= PROGRESS_EVERY_S:
        _last_progress_line = time.monotonic()
        print(f"process {_links.me} of {_links.n}: step {step}", flush=True)


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def agree(flag: int) -> int:
    """The largest of every process's `flag` (one small all-gather). With one process, `flag` itself, free."""
    import jax

    if jax.process_count() == 1:
        return int(flag)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(flag))))


def from_primary(flag: int) -> int:
    """Process 0's `flag`, on every process."""
    import jax

    if jax.process_count() == 1:
        return int(flag)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(flag)))
