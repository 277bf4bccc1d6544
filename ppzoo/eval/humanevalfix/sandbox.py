"""Run untrusted programs (model-written code and its tests), one process each, isolated and limited.

Every program runs in a fresh temporary directory through `sandbox_runner.py` (see there for the order of
the steps), which gives it:
  * a CPU-time limit (RLIMIT_CPU), an address-space limit (RLIMIT_AS), a process limit (RLIMIT_NPROC,
    counted per sandbox: under root each sandbox runs as a user id of its own, otherwise in a user namespace
    of its own), a file-size limit and no core dumps;
  * a wall-clock timeout: the runner's whole process group is killed, and every process left in the
    program's PID namespace dies with it;
  * no network: an empty network namespace, Landlock TCP rules where the kernel has them, and an audit hook
    that refuses sockets and name lookups;
  * write access beneath its own directory only (Landlock); reading is allowed.

Which kernel features exist is checked once, explicitly (`capabilities()`: Landlock's ABI version, and a
probe that performs the privilege drop and the namespace unshare exactly as a run would). A missing feature
is a SandboxUnavailable error naming it; the sandbox never runs code with less isolation than it promises.
"""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ppzoo.errors import PpzooError

RUNNER = Path(__file__).with_name("sandbox_runner.py")
# Root runs each program under user id UID_BASE + the runner's pid: unused ids, unique among live sandboxes.
UID_BASE = 1 << 30
SETUP_FAILED_EXIT = 125  # the runner's exit code when isolation could not be set up


class SandboxUnavailable(PpzooError):
    """This machine cannot isolate programs as the sandbox requires."""


@dataclass
class SandboxLimits:
    timeout: float = 10.0  # wall-clock seconds per program
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space
    max_processes: int = 16  # processes of one sandbox at a time
    max_file_bytes: int = 16 << 20
    max_output_chars: int = 4000  # of stdout / stderr kept in the result


@dataclass
class RunResult:
    status: str  # passed | failed | timeout
    returncode: int
    seconds: float
    stdout: str
    stderr: str

    @property
    def passed(self):
        return self.status == "passed"


@functools.lru_cache(maxsize=None)
def capabilities():
    """What this machine offers (probed once per process): {root, landlock_abi, namespaces, error}."""
    if not sys.platform.startswith("linux"):
        return {"root": False, "landlock_abi": 0, "namespaces": False, "error": f"platform {sys.platform} is not Linux"}
    workdir = tempfile.mkdtemp(prefix="ppzoo-sandbox-probe-")
    try:
        done = subprocess.run([sys.executable, "-I", "-S", str(RUNNER), "--probe", str(UID_BASE), workdir],
                              capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if done.returncode != 0:
        return {"root": os.geteuid() == 0, "landlock_abi": 0, "namespaces": False,
                "error": f"the probe exited with {done.returncode}: {done.stderr.strip()[-500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def require_isolation():
    """The capabilities, or SandboxUnavailable naming what is missing and how to get it."""
    caps = capabilities()
    missing = []
    if not caps["namespaces"]:
        missing.append(
            f"user, network and PID namespaces ({caps['error']}); enable unprivileged user namespaces "
            "(sysctl user.max_user_namespaces=10000, and kernel.unprivileged_userns_clone=1 where it exists) "
            "or run in a container that allows unshare"
        )
    if caps["landlock_abi"] < 1:
        missing.append("Landlock, which confines writes to the program's directory (Linux 5.13+ booted with "
                       "landlock in lsm=)")
    if missing:
        raise SandboxUnavailable("The code sandbox cannot isolate programs on this machine: it needs "
                                 + "; and ".join(missing) + ". Untrusted code is not run without them.")
    return caps


def describe_isolation(caps=None):
    """One line saying which mechanism enforces what, for reports."""
    caps = caps or capabilities()
    network = "empty network namespace + audit-hook socket guard"
    if caps["landlock_abi"] >= 4:
        network += " + Landlock TCP rules"
    user = "own user id (dropped from root)" if caps["root"] else "own user namespace"
    return (f"per-program process in its own PID namespace ({user}); rlimits CPU/AS/NPROC/FSIZE; {network}; "
            f"Landlock ABI {caps['landlock_abi']} write confinement to a fresh temp dir")


def _read_tail(path, limit):
    with open(path, "rb") as handle:
        handle.seek(max(os.path.getsize(path) - 4 * limit, 0))
        return handle.read().decode("utf-8", errors="replace")[-limit:]


class Sandbox:
    def __init__(self, limits=None, workers=2):
        if workers < 1:
            raise PpzooError(f"the sandbox needs at least one worker, got {workers}")
        self.limits = limits or SandboxLimits()
        self.workers = workers
        self.caps = require_isolation()

    def run(self, program):
        """Run one program (Python source) in a fresh directory; passed means it exited with code 0."""
        workdir = tempfile.mkdtemp(prefix="ppzoo-sandbox-")
        os.chmod(workdir, 0o700)
        try:
            program_path = os.path.join(workdir, "program.py")
            with open(program_path, "w", encoding="utf-8") as handle:
                handle.write(program)
            spec_path = os.path.join(workdir, "spec.json")
            limits = {k: v for k, v in asdict(self.limits).items() if k not in ("timeout", "max_output_chars")}
            with open(spec_path, "w") as handle:
                json.dump({"workdir": workdir, "program": program_path, "uid_base": UID_BASE,
                           "landlock_abi": self.caps["landlock_abi"], "limits": limits}, handle)
            return self._execute(workdir, spec_path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _execute(self, workdir, spec_path):
        # Output goes to files in the work directory, so RLIMIT_FSIZE bounds it (a pipe would fill our memory).
        out_path, err_path = os.path.join(workdir, "stdout.txt"), os.path.join(workdir, "stderr.txt")
        started = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen([sys.executable, "-I", "-S", str(RUNNER), spec_path], stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=err, start_new_session=True,
                                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        try:
            process.wait(timeout=self.limits.timeout)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            # The runner is not reaped yet, so its process group id is still ours to kill. Its child (the PID
            # namespace's first process) dies with it, and the kernel then ends the whole namespace.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "timeout"
        seconds = time.perf_counter() - started
        keep = self.limits.max_output_chars
        stdout, stderr = _read_tail(out_path, keep), _read_tail(err_path, keep)
        if process.returncode == SETUP_FAILED_EXIT:
            raise SandboxUnavailable(f"the sandbox could not isolate a program: {stderr}")
        return RunResult(status, process.returncode, seconds, stdout, stderr)

    def run_many(self, programs):
        """Run programs on `workers` threads (each drives one sandboxed process); results in input order."""
        programs = list(programs)
        if self.workers == 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run, programs))
