"""The sandboxed interpreter's first steps, before model-written code runs (see sandbox.py).

The parent runs `python -I -S -B -u -c <this file's text> <settings json>`; this is not imported by the
trainer. Order matters: the network namespace needs root (or a new user namespace), so it comes before the
uid drop; the memory limit comes last so that the set-up itself never hits it. Whatever was enforced is
written as one JSON line to the status pipe, which is closed before the model's code runs (its children
must not inherit it). Stdlib only: the interpreter runs without site-packages.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Landlock filesystem rights that change the filesystem (reading stays allowed everywhere, for the stdlib).
FS_WRITE_FILE, FS_REMOVE_DIR, FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
FS_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def isolate_network(libc) -> str:
    """A fresh network namespace has only a down loopback: no connection goes anywhere."""
    if libc.unshare(CLONE_NEWNET) == 0:
        return "namespace"
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:  # unprivileged: needs user namespaces
        return "namespace"
    return ""


def confine_writes_landlock(libc, workdir: str, deny_tcp: bool) -> bool:
    """Writes anywhere but under `workdir` fail with EACCES, for this process and every child (irrevocable)."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        return False
    write = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE
    write |= FS_REFER if abi >= 2 else 0
    write |= FS_TRUNCATE if abi >= 3 else 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if deny_tcp and abi >= 4 else 0
    attr = _RulesetAttr(write, net)
    size = ctypes.sizeof(attr) if net else 8
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        for path, rights in ((workdir, write), ("/dev/null", FS_WRITE_FILE | (write & FS_TRUNCATE))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(rights, fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                ctypes.c_uint32(0)) != 0:
                    return False
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return False
        return libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def confine_writes_audit_hook(workdir: str) -> None:
    """Fallback without Landlock: refuse, inside this interpreter, writes outside `workdir` and the ways
    out of the hook (new processes do not inherit it; ctypes could call libc directly). Python code that
    is determined enough can still get around an audit hook: docs/agents.md says so."""
    root = os.path.realpath(workdir) + os.sep
    path_events = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
    refused = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.fork",
               "os.forkpty", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"}

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor: its opening was checked
        full = os.path.realpath(os.fsdecode(path))
        return full + os.sep == root or full.startswith(root) or full == "/dev/null"

    def hook(event: str, args: tuple) -> None:
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None:
            mode, flags = args[1] or "", args[2] or 0
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and not inside(args[0]):
                raise PermissionError(f"sandbox: writing outside the working directory: {args[0]!r}")
        elif event in path_events:
            for path in args[:2]:
                if isinstance(path, str | bytes | os.PathLike) and not inside(path):
                    raise PermissionError(f"sandbox: {event} outside the working directory: {path!r}")

    sys.addaudithook(hook)


def set_limit(which: int, soft: int, hard: int | None = None) -> None:
    resource.setrlimit(which, (soft, soft if hard is None else hard))


def in_own_pid_namespace(libc) -> bool:
    """Put the program under an init of its own: when the program ends (or the parent kills this tree),
    that init's exit makes the kernel kill and reap every process left in the namespace, so nothing the
    code forked outlives the run or stays a zombie (a container's PID 1 may never reap). Returns in the
    process that goes on to run the program; the two above it exit with its status."""
    if libc.unshare(CLONE_NEWPID) != 0:
        return False
    report_r, report_w = os.pipe()
    init = os.fork()
    if init:  # outside: wait for the namespace's init, then end exactly as the program ended
        os.close(report_w)
        os.waitpid(init, 0)
        with os.fdopen(report_r) as f:
            reported = f.read()
        exit_like(int(reported) if reported else 1 << 8)
    os.close(report_r)
    program = os.fork()
    if program:  # pid 1 of the namespace: reap everything until the program itself ends
        while True:
            pid, wait_status = os.wait()
            if pid == program:
                os.write(report_w, str(wait_status).encode())
                os._exit(0)
    os.close(report_w)
    return True


def exit_like(wait_status: int) -> None:
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else 1)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status: dict = {}
    libc = _libc()
    # No core files, also from the processes above the program that end the way it ended (SIGXCPU dumps).
    set_limit(resource.RLIMIT_CORE, 0)
    status["network"] = isolate_network(libc) if cfg["network_off"] else "allowed"
    status["pid_namespace"] = in_own_pid_namespace(libc)
    # SIGXCPU at the soft limit, SIGKILL one second later if the program ignores it.
    set_limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
    set_limit(resource.RLIMIT_FSIZE, cfg["file_size_bytes"])
    set_limit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    set_limit(resource.RLIMIT_NPROC, cfg["nproc"])
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        status["uid"] = os.getuid()
    os.chdir(cfg["workdir"])
    deny_tcp = cfg["network_off"] and not status["network"]
    if confine_writes_landlock(libc, cfg["workdir"], deny_tcp):
        status["writes"] = "landlock"
        if deny_tcp:
            status["network"] = "landlock-tcp"
    else:
        status["writes"] = "audit-hook"
    set_limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    with os.fdopen(cfg["status_fd"], "w") as out:
        out.write(json.dumps(status) + "\n")
    del libc
    if status["writes"] == "audit-hook":
        confine_writes_audit_hook(cfg["workdir"])
    path = os.path.join(cfg["workdir"], cfg["script"])
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, cfg["script"], "exec")
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except SystemExit:
        raise
    except BaseException as exc:  # the model's error, shown without this prelude's frame
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
