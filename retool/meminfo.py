"""Host memory figures from /proc/meminfo (Linux), read without psutil."""
from __future__ import annotations


def meminfo_bytes(key: str = "MemAvailable") -> int | None:
    """A /proc/meminfo figure (MemTotal, MemAvailable ...) in bytes, or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
