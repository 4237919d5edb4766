"""A one-node Slurm cluster on this machine for the Slurm launcher's test (Debian's slurm-wlm + munge).

``start()`` returns a handle to stop it, or raises ``Unavailable`` with the reason (not root,
no apt-get, install or start-up failed): the test skips with that reason. A cluster that is
already answering ``sinfo`` is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by regablate's tests (tests/slurm_cluster.py)"
PID_FILES = {
    "slurmd": Path("/run/slurmd.pid"),
    "slurmctld": Path("/run/slurmctld.pid"),
    "munged": Path("/run/munge/munged.pid"),
}


class Unavailable(Exception):
    """Slurm cannot be started here; the message says why."""


@dataclass
class LocalSlurm:
    started: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the daemons this handle started, newest first, by their pid files."""
        for daemon in reversed(self.started):
            path = PID_FILES[daemon]
            if path.is_file():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(path.read_text().split()[0]), 15)


def _run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _node_idle() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = _run("sinfo", "-h", "-o", "%t", timeout=10)
    return result.returncode == 0 and any(state.strip().startswith("idle") for state in result.stdout.splitlines())


def install() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if shutil.which("apt-get") is None:
        raise Unavailable("slurm-wlm is not installed and apt-get is unavailable")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        if result.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}")


def write_config() -> None:
    if CONF.is_file() and MARK not in CONF.read_text():
        raise Unavailable(f"{CONF} exists and is not this test's; not touching a real cluster's config")
    host = socket.gethostname().split(".")[0]
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(
        f"""{MARK}
ClusterName=local
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmUser=root
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldPidFile={PID_FILES["slurmctld"]}
SlurmdPidFile={PID_FILES["slurmd"]}
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName={host} CPUs={os.cpu_count()} RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    )
    for folder in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
        Path(folder).mkdir(parents=True, exist_ok=True)


def start(timeout: float = 30) -> LocalSlurm:
    """Install (apt-get), configure and start munged, slurmctld and slurmd; wait for an idle node."""
    if _node_idle():
        return LocalSlurm()
    if os.geteuid() != 0:
        raise Unavailable("starting a local Slurm needs root")
    install()
    write_config()
    cluster = LocalSlurm()
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    steps = {
        "munged": ["runuser", "-u", "munge", "--", "munged"],
        "slurmctld": ["slurmctld"],
        "slurmd": ["slurmd"],
    }
    for daemon, command in steps.items():
        result = _run(*command)
        if result.returncode != 0:
            cluster.stop()
            raise Unavailable(f"{daemon} did not start: {(result.stderr or result.stdout).strip()[-300:]}")
        cluster.started.append(daemon)
    deadline = time.monotonic() + timeout
    while not _node_idle():
        if time.monotonic() > deadline:
            cluster.stop()
            raise Unavailable(f"the local Slurm node is not idle after {timeout:.0f} s (see /var/log/slurm/)")
        time.sleep(0.5)
    return cluster
