"""A real one-node SLURM on localhost for the cluster tests (see ../shared/CLUSTER_TESTING.md).

Daemons are started once per test session with their state, spool, logs and pid files in a temporary folder, and
stopped by their PIDs (never by name). Clients and jobs find the cluster through SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
# KillWait: SLURM's own default (30 s) between SIGTERM and SIGKILL, as a cluster gives a job, rather than the 5 s of
# ../shared/CLUSTER_TESTING.md. With 5 s, a `run` slowed down on a busy 2-core CI machine was SIGKILLed before it
# could say it was terminated (seen once in a CI rehearsal: slurmd's "done with job" 4.7 s after the cancel, its
# SIGKILL time, 0.02 + 0.05 + 0.1 + 0.5 + 4 x 1 s of polling; a process ignoring SIGTERM ended the same 4.68 s after).
CONF = """ClusterName=wsitest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
InactiveLimit=0
KillWait=30
Waittime=0
SchedulerParameters=defer_batch
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "starting SLURM daemons needs root"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue") if not _which(b)]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    return None


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class LocalSlurm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.backup = root / "system-slurm.conf.orig"
        self.started_munge = False

    def start(self, timeout_s: float = 60) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(root=self.root))
        os.environ["SLURM_CONF"] = str(self.conf)
        # Steps inside jobs (srun, as Snakemake's SLURM executor uses) read the standard location, not SLURM_CONF.
        if SYSTEM_CONF.exists() and not self.backup.exists():
            shutil.copy2(SYSTEM_CONF, self.backup)
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.conf, SYSTEM_CONF)
        if not _alive(_pid(Path("/run/munge/munged.pid"))):
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
            subprocess.run(
                ["install", "-d", "-o", "munge", "-g", "munge", "-m", "0700", "/var/log/munge", "/var/lib/munge"],
                check=True,
            )
            subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True, timeout=30)
            self.started_munge = True
        subprocess.run([_which("slurmctld"), "-f", str(self.conf), "-c"], check=True, timeout=30)
        subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", "localhost"], check=True, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
            if done.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not become idle in {timeout_s} s; see {self.root}/slurmctld.log")

    def stop(self) -> None:
        pids = [_pid(self.root / "slurmd.pid"), _pid(self.root / "slurmctld.pid")]
        if self.started_munge:
            pids.append(_pid(Path("/run/munge/munged.pid")))
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.backup.exists():
            shutil.copy2(self.backup, SYSTEM_CONF)
        else:
            SYSTEM_CONF.unlink(missing_ok=True)
