"""Runs one untrusted program inside the sandbox. Started by ppzoo.eval.humanevalfix.sandbox as

    python -I -S sandbox_runner.py SPEC.json        run the program the spec names
    python -I -S sandbox_runner.py --probe UID_BASE DIR   try the isolation steps, print what works (JSON)

This file imports only the standard library (it runs with -S, before any project code could help or hurt)
and does, in order:

1. unshare a network and a PID namespace (without root: inside a new user namespace of our own, which also
   makes the kernel count RLIMIT_NPROC over this sandbox's processes only). The network namespace has only
   a loopback device that is down: no connection goes anywhere. Under root, pick a user id of our own for
   the program (BASE + this process's pid, unique among live sandboxes) and give it the work directory;
2. fork: the child is process 1 of the new PID namespace. When it exits or is killed, the kernel kills every
   process left in the namespace, so a fork bomb's children die with it, whatever sessions or process
   groups they made. The child dies with the runner (PR_SET_PDEATHSIG), so killing the runner's process
   group on a wall-clock timeout ends everything;
3. in the child: resource limits (CPU seconds, address space, processes, file size, no core dumps), a
   Landlock ruleset that allows writing only beneath the work directory (and to /dev/null) and, where the
   kernel's Landlock has network rules (ABI 4+), forbids TCP connect and bind, and a Python audit hook that
   refuses socket creation, connection and name lookup (audit hooks cannot be removed);
4. under root: import the standard-library modules the program imports (root's Python may be readable by
   root alone), then switch to the program's user id, which has neither root's exemption from RLIMIT_NPROC
   nor its file permissions; every process of the program has that id;
5. run the program as __main__ with the work directory as cwd; the exit code is 0 only if it ran through.
A program that imports a module dynamically (importlib, __import__) under root finds only modules Python
can read as an unprivileged user.
"""
import ast
import ctypes
import importlib
import json
import os
import resource
import select
import signal
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# Landlock (linux/landlock.h). The syscall numbers are the same on x86-64 and arm64.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_WRITE_FILE = 1 << 1
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_ALL = sum(1 << bit for bit in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

# Imported on the program's behalf only when it asks; these act on import (a browser, a window, printing).
NEVER_PRELOADED = {"antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "webbrowser"}

BLOCKED_AUDIT_EVENTS = ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                        "socket.getnameinfo")

_libc = ctypes.CDLL(None, use_errno=True)


class IsolationError(Exception):
    pass


def _check(result, what):
    if result < 0:
        errno = ctypes.get_errno()
        raise IsolationError(f"{what} failed: {os.strerror(errno)} (errno {errno})")
    return result


def landlock_abi():
    result = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                           ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(result), 0)


def sandbox_user(workdir, uid_base):
    """As root: a fresh user id for this sandbox (BASE + the runner's pid), given the work directory.
    None for other users, who keep their own id inside their own user namespace."""
    if os.geteuid() != 0:
        return None
    uid = uid_base + os.getpid()
    for directory, dirnames, filenames in os.walk(workdir):
        for name in [directory] + [os.path.join(directory, n) for n in dirnames + filenames]:
            os.chown(name, uid, uid)
    return uid


def enter_namespaces():
    """Unshare network and PID namespaces; without root, inside a new user namespace of our own."""
    if os.geteuid() == 0:
        _check(_libc.unshare(ctypes.c_int(CLONE_NEWNET | CLONE_NEWPID)), "unshare(net, pid)")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)), "unshare(user, net, pid)")
    # Map our own ids into the new user namespace (allowed without privileges once setgroups is denied).
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as handle:
            handle.write(text)


def drop_to(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def imported_stdlib_modules(source):
    """The standard-library modules `source` imports (top-level names), minus ones with side effects."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if n in sys.stdlib_module_names and n not in NEVER_PRELOADED)


def set_limits(limits):
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"], limits["max_file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def restrict_filesystem_and_network(workdir, abi):
    """Landlock: writes only beneath workdir (and to /dev/null); no TCP connect or bind where ABI >= 4."""
    if abi < 1:
        raise IsolationError("the kernel has no Landlock (Linux 5.13+ with landlock in the lsm= list)")
    write_rights = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_ALL
    if abi >= 2:
        write_rights |= FS_REFER
    if abi >= 3:
        write_rights |= FS_TRUNCATE
    attr = _RulesetAttr(handled_access_fs=write_rights)
    size = 8  # ABI 1-3 know only handled_access_fs; the struct grew with each ABI
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    file_rights = FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)
    for path, rights in ((workdir, write_rights), ("/dev/null", file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                             ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule({path})")
        os.close(fd)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
           "landlock_restrict_self")
    os.close(ruleset)


def _refuse_network(event, args):
    if event in BLOCKED_AUDIT_EVENTS:
        raise PermissionError(f"network access is disabled in the sandbox ({event})")


def run_child(spec, source, runner_alive, uid):
    """Process 1 of the new PID namespace: limit, restrict, then run the program. Never returns.

    `runner_alive` is the read end of a pipe whose write end only the runner holds: it reads as end-of-file
    once the runner is gone (getppid() cannot tell: it is 0 for a namespace's first process)."""
    code = 1
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        if select.select([runner_alive], [], [], 0)[0]:  # the runner died before the death signal was armed
            os._exit(1)
        os.close(runner_alive)
        set_limits(spec["limits"])
        restrict_filesystem_and_network(spec["workdir"], spec["landlock_abi"])
        os.chdir(spec["workdir"])
        os.environ.update(HOME=spec["workdir"], TMPDIR=spec["workdir"])
        sys.addaudithook(_refuse_network)
        if uid is not None:
            # Root's Python may live where only root can read (e.g. under /root), so the modules the program
            # imports are loaded now, already confined, before the switch to the sandbox's own user id.
            for name in imported_stdlib_modules(source):
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001  (the program's own import will raise it again)
                    pass
            drop_to(uid)
    except Exception:
        traceback.print_exc()
        sys.stderr.write("sandbox: isolation setup failed\n")
        sys.stderr.flush()
        os._exit(125)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001  (anything the program raises is its failure)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit codes above 124 are the runner's own (125: setup failed; 128 + n: killed by signal n).
    os._exit(code if 0 <= code <= 124 else 1)


def run(spec_path):
    with open(spec_path) as handle:
        spec = json.load(handle)
    with open(spec["program"]) as handle:
        source = handle.read()
    try:
        uid = sandbox_user(spec["workdir"], spec["uid_base"])
        enter_namespaces()
    except (OSError, IsolationError) as exc:
        sys.stderr.write(f"sandbox: isolation setup failed: {exc}\n")
        return 125
    alive_read, alive_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(alive_write)
        run_child(spec, source, alive_read, uid)
    os.close(alive_read)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def probe(uid_base, workdir):
    """Try the isolation steps as a real run would (in a throwaway `workdir`); print what works as JSON."""
    report = {"root": os.geteuid() == 0, "landlock_abi": landlock_abi(), "namespaces": None, "error": None}
    try:
        sandbox_user(workdir, uid_base)
        enter_namespaces()
        report["namespaces"] = True
    except (OSError, IsolationError) as exc:
        report["namespaces"] = False
        report["error"] = str(exc)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        sys.exit(probe(int(sys.argv[2]), sys.argv[3]))
    if len(sys.argv) != 2:
        sys.stderr.write("usage: sandbox_runner.py SPEC.json | --probe UID_BASE WORKDIR\n")
        sys.exit(2)
    sys.exit(run(sys.argv[1]))
