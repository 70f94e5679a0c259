"""A one-node SLURM cluster on localhost for the launch-script tests: Debian's slurm-wlm and munge, installed when
missing (root only), their daemons started in the foreground under a temporary directory with their own munge key,
socket, ports and state, and stopped again by process id.

Settings that only make the test fast: a requeued job may start again after 5 s (cred_expire; SLURM's default
waits 120 s for old job credentials to expire) and the scheduler looks for startable jobs every second.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")


def unavailable() -> str | None:
    """Why a SLURM node cannot be stood up here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "standing up SLURM daemons needs root"
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it (Debian's packages are used)"
    return None


def install() -> None:
    """apt-get install slurm-wlm and munge unless they are there; RuntimeError with apt's last line if that fails."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", *PACKAGES], ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode == 0 and cmd[1] == "install":
            return
    raise RuntimeError(f"apt-get could not install {' '.join(PACKAGES)}: "
                       f"{(res.stderr.strip().splitlines() or ['no message'])[-1]}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


CONF = """\
ClusterName=attnlab-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock,cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_node(work: Path):
    """Start munged, slurmctld and slurmd for one node under `work`; yields the environment (SLURM_CONF) that SLURM's
    commands need. The daemons are stopped when the block ends."""
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (work / sub).mkdir(exist_ok=True)
    key = work / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    ctld_port, d_port = _free_ports(2)
    host = socket.gethostname()
    (work / "slurm.conf").write_text(CONF.format(host=host, ctld_port=ctld_port, d_port=d_port, dir=work,
                                                 cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(work / "slurm.conf")}
    procs: list[subprocess.Popen] = []
    try:
        for cmd in (["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={work}/munge.sock",
                     f"--pid-file={work}/munged.pid", f"--log-file={work}/munged.log", f"--seed-file={work}/munge.seed"],
                    ["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            procs.append(subprocess.Popen(cmd, env=env, stdout=open(work / f"{cmd[0]}.out", "w"),
                                          stderr=subprocess.STDOUT))
            if cmd[0] == "munged":
                _wait(lambda: (work / "munge.sock").exists(), 10, "munged did not create its socket", work)
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                               text=True).stdout, 30, "the node did not come up idle", work)
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(pred, timeout: float, what: str, work: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.2)
    logs = {p.name: p.read_text()[-500:] for p in work.glob("*.out")}
    raise RuntimeError(f"{what} within {timeout} s; daemon output: {logs}")


def job_state(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job` as {key: value} (JobState, Restarts, ...)."""
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)
