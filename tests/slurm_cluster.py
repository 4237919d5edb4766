"""A one-node Slurm cluster on this machine for the Slurm launcher's tests (Debian's slurm-wlm + munge).

``start()`` returns a handle to stop it, or raises ``Unavailable`` with the reason (not root,
no apt-get, install or start-up failed): the tests skip with that reason. A cluster that is
already answering ``sinfo`` is used as it is.

Several test sessions may share the one cluster (only one slurmctld can run): each session
registers itself in ``USERS`` while it holds a handle, and ``stop()`` stops the daemons only when
the last registered session lets go, and only daemons that a test session started (a cluster
someone started by hand is left running).

For the requeue test, two settings shorten the wait between a requeue and the job's restart:
``AuthInfo=cred_expire=10`` (a requeued job may start only ``cred_expire`` seconds after its
requeue; Slurm's default is 120 s) and ``SchedulerParameters=bf_interval=5,sched_interval=5``
(the schedulers look at pending jobs every 5 s instead of every 30 and 60 s).
"""

from __future__ import annotations

import contextlib
import fcntl
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


STATE = Path("/run/regablate-slurm")  # shared by the test sessions on this machine
USERS = STATE / "users"  # one file per session holding a handle, named by its pid
STARTED_BY_TESTS = STATE / "started_by_tests"  # present while the daemons running are a test session's


class Unavailable(Exception):
    """Slurm cannot be started here; the message says why."""


@contextlib.contextmanager
def _locked():
    """One session at a time starts, joins or stops the cluster."""
    USERS.mkdir(parents=True, exist_ok=True)
    with (STATE / "lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _other_users() -> list[int]:
    """Live sessions other than this one that hold a handle (stale files of dead sessions are removed)."""
    alive = []
    for path in USERS.glob("*"):
        pid = int(path.name) if path.name.isdigit() else -1
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, ValueError, OverflowError):
            path.unlink(missing_ok=True)
            continue
        except PermissionError:
            pass
        alive.append(pid)
    return alive


@dataclass
class LocalSlurm:
    started: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Let go of the cluster; the last session out stops the daemons a test session started."""
        with _locked():
            (USERS / str(os.getpid())).unlink(missing_ok=True)
            if _other_users() or not STARTED_BY_TESTS.exists():
                return
            for daemon in reversed(list(PID_FILES)):
                path = PID_FILES[daemon]
                if path.is_file():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(path.read_text().split()[0]), 15)
            STARTED_BY_TESTS.unlink(missing_ok=True)

    def _kill_started(self) -> None:
        """A failed start: stop the daemons this handle started, newest first."""
        for daemon in reversed(self.started):
            path = PID_FILES[daemon]
            if path.is_file():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(path.read_text().split()[0]), 15)


def _run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _node_in(states: tuple[str, ...]) -> bool:
    """Whether ``sinfo`` answers with a responding node in one of ``states`` (short names: idle, mix, ...)."""
    if shutil.which("sinfo") is None:
        return False
    result = _run("sinfo", "-h", "-o", "%t", timeout=10)
    return result.returncode == 0 and any(state.strip() in states for state in result.stdout.splitlines())


def _node_up() -> bool:
    """The cluster answers and its node takes jobs (idle, or busy with another session's)."""
    return _node_in(("idle", "mix", "alloc", "comp"))


def _node_idle() -> bool:
    return _node_in(("idle",))


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
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmUser=root
SelectType=select/cons_tres
SchedulerParameters=bf_interval=5,sched_interval=5
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
    """Join the running cluster, or install (apt-get), configure and start munged, slurmctld and slurmd."""
    if os.geteuid() != 0 and not _node_up():
        raise Unavailable("starting a local Slurm needs root")
    with _locked():
        cluster = LocalSlurm() if _node_up() else _start_daemons(timeout)
        (USERS / str(os.getpid())).touch()
    return cluster


def _start_daemons(timeout: float) -> LocalSlurm:
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
            cluster._kill_started()
            raise Unavailable(f"{daemon} did not start: {(result.stderr or result.stdout).strip()[-300:]}")
        cluster.started.append(daemon)
    deadline = time.monotonic() + timeout
    while not _node_idle():
        if time.monotonic() > deadline:
            cluster._kill_started()
            raise Unavailable(f"the local Slurm node is not idle after {timeout:.0f} s (see /var/log/slurm/)")
        time.sleep(0.5)
    STARTED_BY_TESTS.touch()
    return cluster
