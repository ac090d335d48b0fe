"""Memory before work: what a job's tensors will take, what the device has, and a one-line refusal.

Every size a user gives (an expansion factor, a batch, a number of rows) is checked here before the tensors it
implies are allocated: :class:`MemoryPlan` adds up named items (weights, optimiser state, a batch, ...) and
:meth:`MemoryPlan.check` refuses, in one line naming the largest items, a plan that exceeds the memory the job
may use. That limit is the memory available on the device (``MemAvailable`` of ``/proc/meminfo`` on the CPU,
the free memory ``torch.cuda.mem_get_info`` reports on a GPU), or ``CIRCUITSAE_MEMORY_LIMIT`` (``"8G"``,
``"512M"``, bytes) when that is set.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from circuitsae.errors import CircuitSAEError

#: the environment variable that caps the memory a job may plan for (a size: ``"8G"``, ``"512M"``, bytes)
LIMIT_VARIABLE = "CIRCUITSAE_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, three significant figures: ``1.5 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` as bytes; a one-line error otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise CircuitSAEError(f"{text!r} is not a memory size (write e.g. 8G, 512M or a number of bytes)")
    n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(n) or n < 1:
        raise CircuitSAEError(f"{text!r} is not a memory size of at least one byte")
    return int(n)


def _meminfo_available() -> "int | None":
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available(device: Any = "cpu") -> int:
    """Bytes a job may still allocate on ``device`` (a ``torch.device`` or its name)."""
    name = str(device)
    if name.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            try:
                return int(torch.cuda.mem_get_info(torch.device(name))[0])
            except Exception:  # noqa: BLE001 - a device that cannot say (a test's fake CUDA): the host's memory
                pass
    if name == "meta":
        return 1 << 62
    found = _meminfo_available()
    if found is not None:
        return found
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def limit(device: Any = "cpu", override: "int | str | None" = None) -> tuple[int, str]:
    """The memory a job may plan for on ``device`` and where that number comes from."""
    if override is not None:
        return (parse_size(override) if isinstance(override, str) else int(override)), "the limit given"
    env = os.environ.get(LIMIT_VARIABLE)
    if env:
        return parse_size(env), LIMIT_VARIABLE
    return available(device), f"available on {device}"


@dataclass
class MemoryPlan:
    """Named memory items of one job (bytes each) and the check that they fit.

    ``MemoryPlan("training 8 SAEs").add("weights", n1).add("optimiser state", n2)``, then
    ``plan.check(device)`` before allocating any of them.
    """

    what: str
    items: list[tuple[str, int]] = field(default_factory=list)

    def add(self, name: str, nbytes: float) -> "MemoryPlan":
        self.items.append((name, int(nbytes)))
        return self

    def extend(self, items: Iterable[tuple[str, float]]) -> "MemoryPlan":
        for name, n in items:
            self.add(name, n)
        return self

    @property
    def total(self) -> int:
        return sum(n for _, n in self.items)

    def describe(self) -> str:
        """One line: ``weights 1.2 GiB + optimiser state 2.4 GiB = 3.6 GiB``."""
        parts = " + ".join(f"{name} {format_bytes(n)}" for name, n in self.items)
        return f"{parts} = {format_bytes(self.total)}" if len(self.items) > 1 else parts

    def check(self, device: Any = "cpu", override: "int | str | None" = None) -> None:
        """Refuse, in one line, a plan larger than the memory the job may use on ``device``."""
        cap, source = limit(device, override)
        if self.total > cap:
            biggest = sorted(self.items, key=lambda item: -item[1])[:3]
            shown = ", ".join(f"{name} {format_bytes(n)}" for name, n in biggest)
            raise CircuitSAEError(
                f"{self.what} would need {format_bytes(self.total)} of memory ({shown}), more than the "
                f"{format_bytes(cap)} {source}: choose smaller sizes"
                + ("" if source == LIMIT_VARIABLE or override is not None else f" (or set {LIMIT_VARIABLE})")
            )


__all__ = ["LIMIT_VARIABLE", "MemoryPlan", "available", "format_bytes", "limit", "parse_size"]
