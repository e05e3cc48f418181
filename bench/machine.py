"""The machine a run is on, and how busy it was meanwhile: load average, the cores other processes
used, and the CPU the hypervisor stole (a shared 2-core box moves every p99)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoadSample", "cpu_busy_s", "describe_database", "load_between", "load_text", "machine_info",
           "ncpu", "own_cpu_s", "sample_load"]


def ncpu() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict[str, str]:
    import celery
    import kombu
    import redis as redis_py
    import sqlalchemy

    from api.stack import redis_server_binary

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True,
                             timeout=10).stdout.split()
        server = " ".join(out[:3])
    except Exception as exc:  # noqa: BLE001
        server = f"unknown ({exc})"
    u = os.uname()
    return {
        "OS": f"{u.sysname} {u.release} {u.machine}",
        "CPU": cpu,
        "nproc": str(ncpu()),
        "RAM": ram,
        "Python": platform.python_version(),
        "Celery": f"{celery.__version__} (kombu {kombu.__version__})",
        "redis-py": redis_py.__version__,
        "server": server,
        "SQLAlchemy": sqlalchemy.__version__,
    }


def describe_database(url: str) -> str:
    """The server behind ``url``, as the figures' column heading says it (version, how it was run)."""
    from sqlalchemy import text

    from db.session import get_engine

    engine = get_engine(url)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            version = conn.execute(text("select sqlite_version()")).scalar()
            mode = conn.execute(text("pragma journal_mode")).scalar()
            return f"SQLite {version}, {str(mode).upper()}"
        version = conn.execute(text("show server_version")).scalar()
        fsync = conn.execute(text("show fsync")).scalar()
        sync = conn.execute(text("show synchronous_commit")).scalar()
        return f"PostgreSQL {version} (local, fsync={fsync}, synchronous_commit={sync}, as the tests run it)"


# -- load ----------------------------------------------------------------------------------------------


@dataclass
class LoadSample:
    """One reading of the machine's load: what ``load_between`` compares."""

    at: float  # time.monotonic()
    loadavg: tuple[float, float, float]
    busy_s: float | None  # CPU-seconds spent busy on all cores since boot (steal included)
    steal_s: float | None  # CPU-seconds the hypervisor ran someone else while we wanted to run
    total_s: float | None  # all CPU-seconds since boot (idle included)
    own_s: float  # this process's CPU and its waited-for children's


def _proc_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU-seconds from the first line of /proc/stat, or None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return (total - idle) / tick, steal / tick, total / tick


def cpu_busy_s() -> float | None:
    """Seconds of CPU the whole machine spent busy (all cores), from /proc/stat."""
    stat = _proc_stat()
    return stat[0] if stat else None


def own_cpu_s() -> float:
    """CPU used by this process and every child it has waited for (Redis, the workers and their pools)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def sample_load() -> LoadSample:
    stat = _proc_stat()
    return LoadSample(at=time.monotonic(), loadavg=os.getloadavg(), busy_s=stat[0] if stat else None,
                      steal_s=stat[1] if stat else None, total_s=stat[2] if stat else None, own_s=own_cpu_s())


def load_between(start: LoadSample, end: LoadSample, *, others: bool = False) -> dict:
    """How loaded the machine was from ``start`` to ``end``: the 1-minute load average at both ends,
    the cores busy on average (everything, the benchmark included), the share of CPU time stolen by
    the hypervisor, and — with ``others`` (only meaningful once the children are waited for) — the
    cores used by processes that are not this benchmark's."""
    wall = max(end.at - start.at, 1e-9)
    out: dict = {"seconds": round(wall, 1), "loadavg_1m": [round(start.loadavg[0], 2), round(end.loadavg[0], 2)],
                 "ncpu": ncpu(), "busy_cores": None, "steal_percent": None}
    if start.busy_s is not None and end.busy_s is not None:
        out["busy_cores"] = round((end.busy_s - start.busy_s) / wall, 2)
        total = end.total_s - start.total_s
        out["steal_percent"] = round(100 * (end.steal_s - start.steal_s) / total, 2) if total > 0 else 0.0
        if others:
            others_s = max(0.0, (end.busy_s - start.busy_s) - (end.own_s - start.own_s))
            out["others_cpu_s"] = round(others_s, 1)
            out["others_cores"] = round(others_s / wall, 2)
    return out


def load_text(load: dict) -> str:
    """One line for a load dict: ``load average 3.9 → 4.2, 1.8 of 2 cores busy, steal 0.1 %``."""
    a, b = load["loadavg_1m"]
    parts = [f"load average {a:.2f} → {b:.2f}"]
    if load.get("others_cores") is not None:
        parts.append(f"other processes used {load['others_cpu_s']:.0f} CPU-s (≈ {load['others_cores']:.2f} "
                     f"of {load['ncpu']} cores)")
    elif load.get("busy_cores") is not None:
        parts.append(f"{load['busy_cores']:.2f} of {load['ncpu']} cores busy")
    if load.get("steal_percent") is not None:
        parts.append(f"steal {load['steal_percent']:.1f} %")
    return ", ".join(parts)
