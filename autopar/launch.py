"""Multi-controller jobs (``jax.distributed``): bounded-time initialization and a local launcher.

:func:`initialize` is ``jax.distributed.initialize`` with every timeout set, so a process
that never joins or dies mid-run stops the others with an error instead of a hang: joining
waits ``timeout_s``; a process whose heartbeats stop for ``timeout_s`` is declared dead and
the coordination service then terminates every other process (non-zero exit, the reason on
stderr).

:func:`launch_local` starts N copies of a command on 127.0.0.1, each told its rank through
the environment (``AUTOPAR_COORDINATOR``, ``AUTOPAR_NUM_PROCESSES``, ``AUTOPAR_PROCESS_ID``)
with the CPU devices split among them; ``autopar run … --train --processes N`` uses it.
On a real cluster start one process per node yourself (SLURM, ssh) with the same variables
(see the README): the rendezvous is ``jax.distributed``'s.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

ENV_COORDINATOR, ENV_NUM, ENV_ID = "AUTOPAR_COORDINATOR", "AUTOPAR_NUM_PROCESSES", "AUTOPAR_PROCESS_ID"
ENV_TIMEOUT = "AUTOPAR_TIMEOUT_S"


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout_s: int = 60) -> None:
    """``jax.distributed.initialize`` with bounded waits (see the module docstring). When not
    all processes join within ``timeout_s`` this process exits with code 1 and says so."""
    import jax
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id must be in [0, {num_processes}), got {process_id=}")
    if timeout_s < 1:
        raise ValueError(f"timeout_s must be ≥ 1 second, got {timeout_s=}")
    joined = threading.Event()

    def watchdog():  # jax's own deadline (a few seconds later) aborts with a terse RPC status
        if not joined.wait(timeout_s):
            print(f"autopar: error: process {process_id}: not all {num_processes} processes joined the job at "
                  f"{coordinator} within {timeout_s} s; start every process with this coordinator address and "
                  f"number of processes, and process ids 0..{num_processes - 1}", file=sys.stderr, flush=True)
            os._exit(1)
    threading.Thread(target=watchdog, daemon=True).start()
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s + 5, heartbeat_timeout_seconds=timeout_s,
                               shutdown_timeout_seconds=timeout_s)
    joined.set()


def initialize_from_env(*, default_timeout_s: int = 60) -> bool:
    """:func:`initialize` from the ``AUTOPAR_*`` variables (``AUTOPAR_TIMEOUT_S`` if set, else
    ``default_timeout_s``); False (nothing done) when ``AUTOPAR_COORDINATOR`` is unset."""
    if ENV_COORDINATOR not in os.environ:
        return False
    try:
        num, pid = int(os.environ[ENV_NUM]), int(os.environ[ENV_ID])
        timeout_s = int(os.environ.get(ENV_TIMEOUT, default_timeout_s))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{ENV_COORDINATOR} is set, so {ENV_NUM} and {ENV_ID} must be integers "
                         f"({ENV_TIMEOUT} too, if set): {err}") from None
    initialize(os.environ[ENV_COORDINATOR], num, pid, timeout_s=timeout_s)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Gloo prints "[Gloo] Rank R is connected to N peer ranks. Expected number of connected peer
# ranks is : M" on stdout once per communicator, one unbuffered write per piece, from several
# threads at once, so the pieces of two messages interleave within and across lines (seen in CI:
# "1[Gloo] Rank 1 is connected to 1" on one line, " peer ranks. Expected … : 3" on the next).
_GLOO_PIECES = re.compile(r"\[Gloo\] Rank | ?is connected to | ?peer ranks\. ?|Expected number of connected peer ranks is"
                          r"|^\s*:\s*\d+\s*$")


def drop_gloo_chatter(line: str) -> str | None:
    """``line`` without gloo's connection messages, or None when nothing else was on it (a
    line of only their pieces and the numbers between them)."""
    rest = _GLOO_PIECES.sub("", line)
    if rest == line:
        return line
    if not rest.strip(" \t\r\n:0123456789"):
        return None
    return rest.lstrip(" :0123456789")


def _pump(proc, rank: int, out) -> None:
    for line in proc.stdout:
        if (line := drop_gloo_chatter(line)) is None:
            continue
        out.write(f"[{rank}] {line}" if rank else line)
        out.flush()


def launch_local(argv: list[str], num_processes: int, devices: int, *, timeout_s: int = 60,
                 wall_s: float | None = None) -> int:
    """Run ``argv`` as ``num_processes`` processes on 127.0.0.1 sharing ``devices`` CPU devices
    (``devices / num_processes`` each). Process 0's output is printed as is, the others' with
    a ``[rank]`` prefix (gloo's connection messages dropped). Returns the first non-zero exit
    code (0 when all succeed); once one process fails the others get ``timeout_s`` + 30 s to
    stop on their own, then are killed.
    ``wall_s`` bounds the whole job (killed past it: exit code 124)."""
    if num_processes < 1 or devices % num_processes:
        raise ValueError(f"--processes must divide the devices: {devices} devices over {num_processes} processes")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({ENV_COORDINATOR: f"127.0.0.1:{free_port()}", ENV_NUM: str(num_processes),
                ENV_TIMEOUT: str(timeout_s), "JAX_NUM_CPU_DEVICES": str(devices // num_processes),
                "JAX_PLATFORMS": "cpu"})
    procs, pumps = [], []
    for rank in range(num_processes):
        p = subprocess.Popen(argv, env={**env, ENV_ID: str(rank)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        pumps.append(threading.Thread(target=_pump, args=(p, rank, sys.stdout), daemon=True))
        pumps[-1].start()
    start, failed_at = time.monotonic(), None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        late = failed_at is not None and now - failed_at > timeout_s + 30
        if late or (wall_s is not None and now - start > wall_s):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    for t in pumps:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if wall_s is not None and time.monotonic() - start > wall_s and any(c < 0 for c in codes):
        return 124
    return next((c if c > 0 else 1 for c in codes if c != 0), 0)
