"""The machine a run is on, and how busy the rest of it was meanwhile."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path


def machine_info() -> dict[str, str]:
    import sqlite3

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
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "RAM": ram,
        "Python": platform.python_version(),
        "Celery": f"{celery.__version__} (kombu {kombu.__version__})",
        "redis-py": redis_py.__version__,
        "server": server,
        "database": f"SQLite {sqlite3.sqlite_version} (SQLAlchemy {sqlalchemy.__version__}), WAL",
    }


def cpu_busy_s() -> float | None:
    """Seconds of CPU the whole machine spent busy (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU used by this process and every child it has waited for (Redis, the workers and their pools)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)
