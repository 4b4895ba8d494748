"""A real two-node Slurm cluster on this host, for tests: munge, MariaDB, slurmdbd, slurmctld, 2 x slurmd.

Why: `snakemake --profile slurm_h800 train` must work the first time on a real cluster,
so the cluster path is tested against real Slurm daemons, not a mock. Two logical nodes
(n1, n2) share this host (NodeAddr=127.0.0.1, own ports, `%n` in spool/pid/log paths),
each with 8 fake GPUs (gres files are symlinks to /dev/null). Accounting runs through
slurmdbd + a private MariaDB, so `sacct` (the executor plugin's default status command)
works. Every daemon is started in the foreground as our child and stopped by its PID.

Only one such cluster can run on a host at a time: jobs launched by the Snakemake
executor lose SLURM_CONF, so their `srun` reads /etc/slurm/slurm.conf, which this module
writes (and restores) under an exclusive lock file.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO_ROOT / "slurm_h800"

DAEMONS = ["munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd"]
CLIENTS = ["sinfo", "sbatch", "srun", "squeue", "sacct", "sacctmgr", "scontrol", "scancel", "mariadb"]
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
LOCK_PATH = Path(tempfile.gettempdir()) / "vlnflow-local-slurm.lock"
CONF_MARKER = "# written by vlnflow tests/slurm/cluster.py"


def find_binary(name: str) -> str | None:
    """Path of a Slurm/munge/MariaDB binary, also looking in sbin dirs a non-login PATH lacks."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def why_not_runnable() -> str | None:
    """None when a local cluster can start here, else the reason (used as the pytest skip reason)."""
    missing = [name for name in DAEMONS + CLIENTS if find_binary(name) is None]
    if missing:
        return f"local Slurm not installed (missing {', '.join(missing)}; run .ci/install-slurm as root)"
    if os.geteuid() != 0:
        return "local Slurm needs root (slurmd runs jobs as root and /etc/slurm/slurm.conf is written)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "local Slurm needs the 'munge' system user (installed by the munge package)"
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class LocalSlurm:
    """A local Slurm cluster rooted at `root`; `start()` brings it up, `stop()` tears it down by PID."""

    root: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    cpus_per_node: int = 4
    mem_mb_per_node: int = 4000
    gpus_per_node: int = 8
    partition: str = "debug"
    cluster_name: str = "vlnflowtest"
    lock_timeout_s: float = 1200.0
    # Step credential lifetime; also how long a requeued job waits before it may start again (default 120 s;
    # releasing it earlier by hand fails its launch: "Job credential revoked"). Short here for quick requeues.
    cred_expire_s: int = 15
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.conf_dir = self.root / "etc"
        self.conf_path = self.conf_dir / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.db_dir = self.root / "mariadb"
        self.db_socket = self.root / "mariadb.sock"
        self.hostname = socket.gethostname().split(".")[0]
        ports = free_ports(3 + len(self.nodes))
        self.db_port, self.dbd_port, self.ctld_port = ports[:3]
        self.node_ports = dict(zip(self.nodes, ports[3:]))
        self._lock_fh = None
        self._saved_system_conf: bytes | None = None
        self._wrote_system_conf = False

    # ----------------------------------------------------------------- public API
    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (and Snakemake) talking to this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf_path)
        sbin = ":".join(d for d in ("/usr/sbin", "/usr/local/sbin") if d not in env.get("PATH", ""))
        if sbin:
            env["PATH"] = env.get("PATH", "") + ":" + sbin
        return env

    def run(self, args: list[str], check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; on failure raise with its output."""
        proc = subprocess.run(args, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sacct(self) -> list[dict[str, str]]:
        """Every job allocation this cluster's accounting knows (one dict per job, sacct field names).

        Comment is what the Snakemake executor plugin sets per job: rule_<rule>[_wildcards_<values>].
        """
        fields = "JobID,JobName,State,NNodes,NodeList,ExitCode,AllocTRES,Comment"
        out = self.run(["sacct", "-a", "-X", "-P", "-S", "2000-01-01", "-o", fields]).stdout
        return list(csv.DictReader(io.StringIO(out), delimiter="|"))

    def node_states(self) -> dict[str, str]:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def write_profile(self, dest: Path, *, extra: dict | None = None) -> Path:
        """Write a Snakemake profile for this cluster into `dest` (a folder) and return it.

        It is the project's slurm_h800/config.yaml with only the site settings swapped:
        this cluster's partition, no account, small memory/runtime, no GPU requests
        (the test nodes' GPUs are fake), fast status polling. `extra` keys replace
        top-level profile keys. Use with `snakemake --profile <dest>`.
        """
        return write_test_profile(dest, partition=self.partition, extra=extra)

    def snakemake(self, workdir: Path, *args: str, timeout: float = 900, check: bool = True,
                  env: dict | None = None) -> subprocess.CompletedProcess:
        """Run this venv's `snakemake ARGS` in `workdir` against this cluster (PATH has the venv's bin first).

        With check=True a failure raises AssertionError carrying Snakemake's output, the
        Slurm job logs it kept and the tail of the daemon logs.
        """
        bin_dir = Path(sys.executable).parent
        run_env = {**self.env, "PATH": f"{bin_dir}{os.pathsep}{self.env['PATH']}", "OMP_NUM_THREADS": "1",
                   **(env or {})}
        cmd = [str(bin_dir / "snakemake"), *args]
        proc = subprocess.run(cmd, cwd=workdir, env=run_env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            job_logs = "\n".join(f"==> {p} <==\n{p.read_text(errors='replace')[-2000:]}"
                                 for p in sorted(Path(workdir).glob(".snakemake/slurm_logs/**/*.log")))
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}) in {workdir}:\n{proc.stdout[-6000:]}\n"
                                 f"{proc.stderr[-6000:]}\n{job_logs}\n{self.logs_tail(15)}")
        return proc

    def logs_tail(self, lines: int = 30) -> str:
        """Last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {log} <==\n" + "\n".join(text))
        return "\n".join(parts)

    def start(self, timeout_s: float = 90) -> "LocalSlurm":
        """Bring every daemon up and wait until all nodes are idle; on failure stop what started."""
        self._acquire_lock()
        try:
            self._make_dirs()
            self._write_configs()
            self._install_system_conf()
            self._start_munge()
            self._start_mariadb()
            self._start_slurmdbd()
            self._start_slurmctld()
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [find_binary("slurmd"), "-D", "-N", node, "-f", str(self.conf_path)])
            self._wait_nodes_idle(timeout_s)
        except BaseException:
            tail = self.logs_tail()
            self.stop()
            if tail:
                print(f"local Slurm failed to start; daemon logs:\n{tail}")
            raise
        return self

    def stop(self) -> None:
        """Cancel our jobs, stop every daemon we started (by PID, newest first), restore /etc/slurm."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--full", "-u", pwd.getpwuid(os.geteuid()).pw_name], check=False, timeout=20)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if not self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20).stdout.strip():
                        break
                    time.sleep(1)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in reversed(list(self.processes)):
            self._terminate(name, self.processes[name])
        self.processes.clear()
        self._kill_escaped_job_processes()
        self._restore_system_conf()
        self._release_lock()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- set-up steps
    def _acquire_lock(self) -> None:
        self._lock_fh = open(LOCK_PATH, "w")
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fh.write(f"{os.getpid()}\n")
                self._lock_fh.flush()
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another local Slurm test cluster holds {LOCK_PATH} "
                                       f"for more than {self.lock_timeout_s:.0f} s")
                time.sleep(2)

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _make_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged (user munge) must reach its socket dir
        for sub in ("etc", "log", "run", "state", "spool", "gpus", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(exist_ok=True)
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o755)  # munged wants its socket dir searchable by all
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        for i in range(self.gpus_per_node):
            dev = self.root / "gpus" / f"nvidia{i}"
            if not dev.exists():
                dev.symlink_to("/dev/null")

    def _write_configs(self) -> None:
        r = self.root
        node_lines = [
            f"NodeName={n} NodeHostname=vlnflow-{n} NodeAddr=127.0.0.1 Port={self.node_ports[n]} "
            f"CPUs={self.cpus_per_node} Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus_per_node} "
            f"ThreadsPerCore=1 RealMemory={self.mem_mb_per_node} Gres=gpu:{self.gpus_per_node} State=UNKNOWN"
            for n in self.nodes
        ]
        conf = f"""{CONF_MARKER} (pid {os.getpid()}) for the cluster in {r}
ClusterName={self.cluster_name}
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
GresTypes=gpu
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoragePass={self.munge_socket}
AccountingStoreFlags=job_comment
MailProg=/bin/true
JobCompType=jobcomp/none
{chr(10).join(node_lines)}
PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)
        (self.conf_dir / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName={','.join(self.nodes)} Name=gpu File={r}/gpus/nvidia[0-{self.gpus_per_node - 1}]\n"
        )
        dbd = self.conf_dir / "slurmdbd.conf"
        dbd.write_text(f"""AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={r}/run/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass=vlnflow-test
StorageLoc=slurm_acct_db
""")
        os.chmod(dbd, 0o600)

    def _install_system_conf(self) -> None:
        """Point /etc/slurm/slurm.conf at this cluster (srun inside executor jobs reads only that)."""
        if SYSTEM_CONF.exists():
            current = SYSTEM_CONF.read_bytes()
            if not current.startswith(CONF_MARKER.encode()):
                self._saved_system_conf = current  # a real site config: put it back at the end
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.conf_path, SYSTEM_CONF)
        self._wrote_system_conf = True

    def _restore_system_conf(self) -> None:
        if not self._wrote_system_conf:
            return
        if self._saved_system_conf is not None:
            SYSTEM_CONF.write_bytes(self._saved_system_conf)
        else:
            SYSTEM_CONF.unlink(missing_ok=True)
        self._wrote_system_conf = False

    def _start_munge(self) -> None:
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        munge = pwd.getpwnam("munge")
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        self._spawn("munged", [
            find_binary("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.munge_dir}/munged.pid", f"--log-file={self.munge_dir}/munged.log",
            f"--seed-file={self.munge_dir}/munged.seed",
        ], user="munge", group="munge")
        self._wait("munged socket", lambda: self.munge_socket.exists(), 20, "munged")

    def _start_mariadb(self) -> None:
        install = subprocess.run(
            [find_binary("mariadb-install-db"), "--no-defaults", f"--datadir={self.db_dir}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            capture_output=True, text=True, timeout=180,
        )
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{install.stdout}\n{install.stderr}")
        self._spawn("mariadbd", [
            find_binary("mariadbd"), "--no-defaults", f"--datadir={self.db_dir}", f"--socket={self.db_socket}",
            f"--port={self.db_port}", "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
            f"--pid-file={self.root}/run/mariadb.pid", f"--log-error={self.log_dir}/mariadb.log",
            "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=8M", "--performance-schema=OFF",
        ])
        self._wait("MariaDB", lambda: self.db_socket.exists() and port_open(self.db_port), 60, "mariadbd")
        sql = ("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'vlnflow-test'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        subprocess.run([find_binary("mariadb"), "--no-defaults", f"--socket={self.db_socket}", "-u", "root",
                        "-e", sql], check=True, capture_output=True, text=True, timeout=60)

    def _start_slurmdbd(self) -> None:
        self._spawn("slurmdbd", [find_binary("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: port_open(self.dbd_port), 60, "slurmdbd")
        # Register the cluster before slurmctld starts so its first jobs are accounted.
        self.run(["sacctmgr", "-i", "add", "cluster", self.cluster_name], check=False)

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-i", "-f", str(self.conf_path)])
        self._wait("slurmctld", lambda: port_open(self.ctld_port), 30, "slurmctld")

    def _wait_nodes_idle(self, timeout_s: float) -> None:
        def all_idle() -> bool:
            states = self.node_states()
            return all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes)

        self._wait(f"nodes {', '.join(self.nodes)} idle", all_idle, timeout_s, None)

    # ----------------------------------------------------------------- process helpers
    def _spawn(self, name: str, argv: list[str], **kwargs) -> None:
        log = open(self.log_dir / f"{name}.out", "ab")
        env = self.env
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, **kwargs,
        )
        log.close()
        with (self.root / "run" / "pids").open("a") as pids:  # for manual clean-up after a hard kill
            pids.write(f"{name} {self.processes[name].pid}\n")

    def _wait(self, what: str, ready, timeout_s: float, process: str | None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process and self.processes[process].poll() is not None:
                out = (self.log_dir / f"{process}.out").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{process} exited with {self.processes[process].returncode} "
                                   f"while waiting for {what}:\n{out}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def _kill_escaped_job_processes(self) -> list[int]:
        """SIGKILL what this cluster's jobs left running. proctrack/linuxproc follows parentage, so a job
        process whose parents died first (e.g. Snakemake inside a job that was requeued) is re-parented to
        init and escapes Slurm's own kill; it still carries the job's SLURM_CLUSTER_NAME and SLURM_JOB_ID."""
        mark = f"SLURM_CLUSTER_NAME={self.cluster_name}".encode()
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mark in environ and any(v.startswith(b"SLURM_JOB_ID=") for v in environ):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed.append(int(entry.name))
                except ProcessLookupError:
                    pass
        if killed:
            print(f"local Slurm: killed {len(killed)} process(es) its jobs left behind: {killed}")
        return killed

    @staticmethod
    def _terminate(name: str, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def write_test_profile(dest: Path, *, partition: str, extra: dict | None = None) -> Path:
    """Derive a local-cluster profile from slurm_h800/config.yaml (see LocalSlurm.write_profile)."""
    profile = yaml.safe_load((PROFILE_DIR / "config.yaml").read_text())
    resources = dict(profile.get("default-resources") or {})
    resources.pop("slurm_account", None)
    resources.update(slurm_partition=partition, mem_mb=400, runtime=30, cpus_per_task=1)
    profile["default-resources"] = resources
    profile["slurm-no-account"] = True
    # Fake GPUs: drop every GPU/exclusive/CPU/memory request the site profile makes per rule, and keep
    # the rules' own `gpu=N` (meant for local runs) from reaching sbatch as --gpus, as the site profile does.
    # Of slurm_extra only the warning signal and the log's open mode stay (issue 23's behaviour).
    site_only = {"gres", "gpu", "gpus", "slurm_extra", "constraint", "mem_mb", "cpus_per_task", "runtime"}
    profile["set-resources"] = {
        rule: {**{k: v for k, v in (res or {}).items() if k not in site_only}, "gpu": 0, **_kept_extra(res or {})}
        for rule, res in (profile.get("set-resources") or {}).items()
    }
    profile.update({"slurm-init-seconds-before-status-checks": 2, "latency-wait": 5, "jobs": 8})
    profile.update(extra or {})
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def _kept_extra(resources: dict) -> dict:
    """The --signal and --open-mode options of a rule's slurm_extra (quoted as the profile quotes it)."""
    tokens = [t for t in str(resources.get("slurm_extra", "")).strip("'\"").split() if t.startswith(("--signal", "--open-mode"))]
    return {"slurm_extra": "'" + " ".join(tokens) + "'"} if tokens else {}
