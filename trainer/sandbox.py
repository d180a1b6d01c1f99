"""Run untrusted Python (a model's MBPP answer and its asserts) in a sandboxed subprocess.

Never in the caller's process: each run is a fresh interpreter in a fresh temporary directory with an empty
environment, started as its own session and killed, with every process it made, when its time is up.

Layers, each reported in :attr:`SandboxResult.isolation`:

- **always**: resource limits set between fork and exec (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``,
  ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` 0); stdout and stderr go to files (so ``RLIMIT_FSIZE``
  bounds them too) of which only the tail is read; an empty environment; the system interpreter in
  isolated mode (``python -I -B``: no ``PYTHON*`` variables, no user site, no bytecode written); a wall-clock
  timeout after which the whole process group is killed.
- **as root** (the grader runs as root in a container): the code runs as a fresh unprivileged uid picked per
  run, so ``RLIMIT_NPROC`` binds (the kernel exempts root from it), the code cannot read root's files (the
  grader's ``/proc/PID/environ`` included) or signal anyone else's processes, and one ``kill -KILL -1`` as
  that uid afterwards removes every process the run left, however it forked.
- **"bwrap"** (bubblewrap, the default where it works): new user, pid, network, IPC, UTS and cgroup
  namespaces; a filesystem of read-only ``/usr`` (and the ``/lib*``, ``/bin`` links), a private ``/proc``
  and ``/dev``, and a size-capped tmpfs as ``/tmp`` and working directory: nothing of the host is writable,
  no network but a downed loopback, no other process visible.
- **"unshare"** (util-linux ``unshare``, where bubblewrap is missing or refused): new user, network and pid
  namespaces; the host filesystem stays visible with the sandbox uid's permissions (world-writable folders
  such as ``/tmp`` are writable).
- **"rlimits"**: neither namespace tool works: the layers above only; the network is reachable.

``RLKV_SANDBOX=bwrap|unshare|rlimits`` forces a mode (``auto``, the default, takes the strongest that
works here; the probe runs once per process). Call from a single-threaded process (the grading workers are):
the resource limits are set in a ``preexec_fn``.
"""

from __future__ import annotations

import functools
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

MODES: tuple[str, ...] = ("bwrap", "unshare", "rlimits")
ENV_VAR = "RLKV_SANDBOX"

# outcomes
PASSED, FAILED, TIMEOUT, KILLED, ERROR = "passed", "failed", "timeout", "killed", "error"

# per-run uids (as root): far above any distribution's range of real accounts
_UID_LOW, _UID_HIGH = 1_500_000_000, 1_600_000_000
_SIGNAL_MEANINGS = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit",
                    signal.SIGKILL: "killed", signal.SIGSEGV: "segmentation fault"}


class SandboxError(RuntimeError):
    """No sandbox can be had (a forced mode that does not work here, no interpreter)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run.

    Fields:
        timeout_s: wall-clock limit; then the whole process tree is killed (outcome ``"timeout"``).
        cpu_s: ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL); default: the timeout rounded up, plus 1.
        memory_mb: ``RLIMIT_AS`` of each process (an allocation past it raises ``MemoryError``).
        max_processes: ``RLIMIT_NPROC``, counted per uid (a fork bomb gets ``BlockingIOError``).
        max_file_mb: ``RLIMIT_FSIZE`` (a larger write gets SIGXFSZ); bounds the captured output too.
        max_open_files: ``RLIMIT_NOFILE``.
        tmpfs_mb: size of the writable tmpfs (bwrap mode).
        output_chars: how much of the end of stdout and of stderr the result keeps.
    """

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    max_open_files: int = 256
    tmpfs_mb: int = 64
    output_chars: int = 4000

    def cpu_limit(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(self.timeout_s + 0.999) + 1


@dataclass(frozen=True)
class SandboxResult:
    """What one run did.

    Fields:
        outcome: ``"passed"`` (exit status 0), ``"failed"`` (another exit status: an assert, an exception),
            ``"timeout"`` (killed at ``timeout_s``), ``"killed"`` (a signal: CPU or file-size limit, a
            crash), ``"error"`` (the sandbox itself did not start; ``stderr`` says why).
        exit_code: the exit status, or ``-signal`` when a signal ended it; ``None`` on timeout / error.
        stdout, stderr: the tails of the program's output (``output_chars`` each).
        seconds: wall time.
        isolation: the mode used (:data:`MODES`).
        uid: the uid the code ran as (a fresh one per run as root, else the caller's).
        leftovers: processes of that uid still alive after the run ended and killed by the final sweep
            (a fork bomb's children; only counted as root).
    """

    outcome: str
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str
    uid: int
    leftovers: int = 0

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED

    def summary(self) -> str:
        """One line: outcome, mode and the last line of stderr (``"failed (bwrap): AssertionError"``)."""
        last = next((line.strip() for line in reversed(self.stderr.splitlines()) if line.strip()), "")
        if self.outcome == TIMEOUT:
            what = f"timeout after {self.seconds:.1f} s, process tree killed"
        elif self.outcome == KILLED and self.exit_code is not None:
            sig = -self.exit_code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            what = f"killed by {name} ({_SIGNAL_MEANINGS.get(sig, 'signal')})"
        else:
            what = self.outcome if self.exit_code in (0, None) else f"{self.outcome}, exit {self.exit_code}"
        text = f"{what} ({self.isolation})"
        if self.leftovers:
            text += f", {self.leftovers} leftover processes killed"
        return f"{text}: {last}"[:300] if last and self.outcome != PASSED else text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# what this machine offers


@functools.lru_cache(maxsize=None)
def sandbox_python() -> str:
    """The interpreter the code runs in: ours if any user can reach and run it, else the system one.

    A per-run uid cannot enter a root-only folder (``/root/.pyenv``), so as root a private interpreter is
    passed over for ``/usr/bin/python3`` (the code gets the standard library only either way: ``-I``).
    """
    ours = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return ours
    candidates = [ours, "/usr/bin/python3", "/usr/local/bin/python3"]
    for path in candidates:
        if os.path.isfile(path) and _world_runnable(path):
            return path
    raise SandboxError(f"no Python interpreter that an unprivileged uid can run: tried {', '.join(candidates)}")


def _inside_usr(path: str) -> bool:
    return path.startswith("/usr/")


def _world_runnable(path: str) -> bool:
    """Every folder on the way has o+x and the file o+rx."""
    st = os.stat(path)
    if (st.st_mode & 0o005) != 0o005:
        return False
    d = os.path.dirname(path)
    while True:
        if not os.stat(d).st_mode & 0o001:
            return False
        if d == "/":
            return True
        d = os.path.dirname(d)


def _bwrap_binds(python: str) -> list[str]:
    """Read-only binds: /usr, the merged-/usr links (or folders), the interpreter's prefix if outside /usr."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefix = os.path.dirname(os.path.dirname(python))
    if not _inside_usr(python) and prefix not in ("/", ""):
        args += ["--ro-bind", prefix, prefix]
    return args


def _command(mode: str, python: str, workdir: str, limits: SandboxLimits) -> list[str]:
    """argv for one run; the program is ``workdir/prog.py``; ``workdir`` is the cwd for the non-bwrap modes."""
    run = [python, "-I", "-B"]
    if mode == "bwrap":
        bwrap = shutil.which("bwrap") or "bwrap"
        return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--hostname", "sandbox",
                *_bwrap_binds(python), "--proc", "/proc", "--dev", "/dev",
                "--size", str(limits.tmpfs_mb << 20), "--tmpfs", "/tmp",
                "--ro-bind", os.path.join(workdir, "prog.py"), "/sandbox/prog.py",
                "--chdir", "/tmp", *run, "/sandbox/prog.py"]
    if mode == "unshare":
        unshare = shutil.which("unshare") or "unshare"
        return [unshare, "--user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", *run, "prog.py"]
    return [*run, "prog.py"]


@functools.lru_cache(maxsize=None)
def _mode_works(mode: str) -> tuple[bool, str]:
    """Run ``print(1)`` in ``mode``; (works, why not)."""
    try:
        result = _run(mode, "print(1)\n", SandboxLimits(timeout_s=20.0))
    except (OSError, SandboxError) as e:
        return False, f"{type(e).__name__}: {e}"
    if result.outcome == PASSED and result.stdout.strip() == "1":
        return True, ""
    return False, (result.stderr.strip().splitlines() or [result.outcome])[-1][:200]


def resolve_mode(mode: str | None = None) -> str:
    """The mode to use: ``mode``, else ``$RLKV_SANDBOX``, else ``auto`` (the first of :data:`MODES` that works).

    A forced mode that does not work here raises :class:`SandboxError` (one line, with the reason).
    """
    asked = (mode or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if asked not in ("auto",) + MODES:
        raise SandboxError(f"{ENV_VAR}={asked!r} is not a sandbox mode; allowed: auto, {', '.join(MODES)}")
    if asked != "auto":
        ok, why = _mode_works(asked)
        if not ok:
            raise SandboxError(f"sandbox mode {asked!r} does not work here: {why}")
        return asked
    for candidate in MODES:
        if _mode_works(candidate)[0]:
            return candidate
    raise SandboxError(f"no sandbox mode works here (rlimits: {_mode_works('rlimits')[1]})")


def describe(mode: str | None = None, limits: SandboxLimits | None = None) -> dict[str, Any]:
    """What a run here gets: ``{"mode", "python", "per_run_uid", "network_isolated", "filesystem",
    "limits"}``, for the eval's output."""
    chosen = resolve_mode(mode)
    limits = limits or SandboxLimits()
    return {
        "mode": chosen,
        "python": sandbox_python(),
        "per_run_uid": os.geteuid() == 0,
        "network_isolated": chosen in ("bwrap", "unshare"),
        "filesystem": {"bwrap": "read-only /usr, private tmpfs /tmp",
                       "unshare": "host, with the sandbox uid's permissions",
                       "rlimits": "host, with the sandbox uid's permissions"}[chosen],
        "limits": asdict(limits) | {"cpu_s": limits.cpu_limit()},
    }


# ---------------------------------------------------------------------------------------------------------
# one run


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), *, mode: str | None = None) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox; never raises for what the code does.

    ``mode``: see :func:`resolve_mode`. Raises :class:`SandboxError` only when no sandbox can be had.
    """
    return _run(resolve_mode(mode), code, limits)


def _tasks_of_uid(uid: int) -> int:
    """Live processes (threads included, as RLIMIT_NPROC counts them) whose /proc entry ``uid`` owns;
    zombies are left out (dead, waiting for their reaper: bwrap's monitor is reparented to init)."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
                if state not in (b"Z", b"X"):
                    count += len(os.listdir(f"/proc/{name}/task"))
            except (OSError, IndexError):
                continue
    return count


def _set_limits(limits: SandboxLimits, nproc: int) -> None:
    """preexec_fn: between fork and exec, after the uid change; lowering a limit needs no privilege."""
    mb = 1 << 20
    for which, value in ((resource.RLIMIT_CPU, limits.cpu_limit()), (resource.RLIMIT_AS, limits.memory_mb * mb),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, limits.max_file_mb * mb),
                         (resource.RLIMIT_NOFILE, limits.max_open_files), (resource.RLIMIT_CORE, 0)):
        _, hard = resource.getrlimit(which)
        # CPU: SIGXCPU at the soft limit, SIGKILL a second later; equal limits would be SIGKILL straight away
        soft_hard = (value, value + 1 if which == resource.RLIMIT_CPU else value)
        if hard != resource.RLIM_INFINITY:
            soft_hard = (min(soft_hard[0], hard), min(soft_hard[1], hard))
        resource.setrlimit(which, soft_hard)


def _kill_uid(uid: int) -> int:
    """Kill every process of ``uid`` (``kill -KILL -1`` run as that uid, repeated until none is left);
    returns how many were alive at the first look."""
    first = left = _tasks_of_uid(uid)
    for _ in range(50):
        if left == 0:
            break
        kill = shutil.which("kill") or "/bin/kill"
        subprocess.run([kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        time.sleep(0.02)
        left = _tasks_of_uid(uid)
    return first


def _tail(f: Any, chars: int) -> str:
    """The last ``chars`` characters of an open binary file."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * chars))
    return f.read().decode("utf-8", errors="replace")[-chars:]


def _run(mode: str, code: str, limits: SandboxLimits) -> SandboxResult:
    python = sandbox_python()
    as_root = os.geteuid() == 0
    uid = random.SystemRandom().randrange(_UID_LOW, _UID_HIGH) if as_root else os.getuid()
    # RLIMIT_NPROC counts the uid's processes everywhere: a fresh uid starts at 0, the caller's does not
    nproc = limits.max_processes + (0 if as_root else _tasks_of_uid(uid))
    workdir = tempfile.mkdtemp(prefix="rlkv-sandbox-")
    start = time.monotonic()
    proc: subprocess.Popen | None = None
    timed_out, leftovers = False, 0
    try:
        prog = os.path.join(workdir, "prog.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(prog, 0o644)
        if as_root:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        ids = dict(user=uid, group=uid, extra_groups=[]) if as_root else {}
        # output into anonymous root-held files: the code can neither swap them nor learn their names
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    _command(mode, python, workdir, limits), cwd=workdir, env={}, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, close_fds=True, start_new_session=True,
                    preexec_fn=functools.partial(_set_limits, limits, nproc), **ids)
            except OSError as e:
                return SandboxResult(ERROR, None, "", f"sandbox did not start: {e}", time.monotonic() - start,
                                     mode, uid)
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # also when the grading worker's own alarm interrupts the wait
                _kill_group(proc)
                if as_root:
                    leftovers = _kill_uid(uid)
            stdout, stderr = _tail(out, limits.output_chars), _tail(err, limits.output_chars)
        seconds = time.monotonic() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    code_ = None if timed_out else proc.returncode
    if mode == "bwrap" and code_ is not None and 128 < code_ < 128 + 65:
        code_ = 128 - code_  # bwrap exits 128 + n when a signal ended its child: report it as Popen would
    if timed_out:
        outcome = TIMEOUT
    elif code_ == 0:
        outcome = PASSED
    elif code_ is not None and code_ < 0:
        outcome = KILLED
    elif mode == "bwrap" and code_ == 1 and stderr.startswith("bwrap:"):
        outcome = ERROR  # bwrap's own failure, before the program ran
    else:
        outcome = FAILED
    return SandboxResult(outcome, code_, stdout, stderr, seconds, mode, uid, leftovers)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (its session) and reap the leader."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
