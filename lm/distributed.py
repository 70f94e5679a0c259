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
Processes started from flags or the environment first meet on the coordinator's PORT+1 (`rendezvous`), so that
a missing or misconfigured process is a one-line error rather than an abort inside jax's runtime.
On CPU, cross-process collectives go through gloo, and `--cpu-devices N` gives each process N host devices
(how the tests build a 2-process x 4-device mesh on one machine).
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
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
    kwargs = {}
    if launch.source not in ("slurm", "tpu"):
        # jax's runtime aborts the process (a C++ stack trace, no exception) when the processes do not all
        # register in time; meeting first on PORT+1 turns that into a one-line error that names who is missing.
        rendezvous(launch)
        kwargs = dict(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                      process_id=launch.process_id)
    try:
        jax.distributed.initialize(initialization_timeout=launch.timeout_s, **kwargs)
    except Exception as e:  # jax raises its runtime's errors (unavailable, ...) as plain exceptions
        where = f" at {launch.coordinator}" if launch.coordinator else f" ({launch.source} detection)"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise LaunchError(f"jax.distributed could not start{where}: {first}") from None


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def rendezvous(launch: Launch) -> None:
    """All `launch.num_processes` processes meet on the coordinator's host at PORT+1 before jax starts: process
    0 listens, the others connect (retrying until the timeout) and say their id and process count. Raises
    LaunchError on every process when they do not all arrive in time, or disagree."""
    host, port = _split(launch.coordinator)
    n, me, deadline = launch.num_processes, launch.process_id, time.monotonic() + launch.timeout_s
    if n == 1:
        return
    if me == 0:
        _serve(host, port, n, deadline, launch.timeout_s)
    else:
        _join(host, port, n, me, deadline, launch.timeout_s)


def _serve(host: str, port: int, n: int, deadline: float, timeout_s: int) -> None:
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
        with conn:
            try:
                conn.sendall((f"error {problem}" if problem else "ok").encode())
            except OSError:
                pass
    if problem:
        raise LaunchError(problem)


def _join(host: str, port: int, n: int, me: int, deadline: float, timeout_s: int) -> None:
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
    with conn:
        conn.sendall(f"{me} {n}".encode())
        conn.settimeout(max(deadline - time.monotonic(), 0.001) + 5)
        try:
            reply = conn.recv(1024).decode()
        except OSError:
            reply = ""
    if reply != "ok":
        raise LaunchError(reply.removeprefix("error ") if reply.startswith("error ")
                          else f"process 0 at {host}:{port + 1} went away before all {n} processes arrived")


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
