"""Waiting, through the guest agent, until a VM's guest has taken its devices.

QEMU's ``device_add`` returns once the device is on the virtual bus; the guest
still has to notice the hot-plug (pciehp), enumerate the device and bind a
driver. `expect` says what the guest must show for a lease's units, `script`
is the shell loop the agent runs (only shell builtins between polls, so a poll
costs no fork), and `verdict` reads its output. `wait_for_devices` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.agent.messages import Command
from runner.errors import GpuError, SnapfleetError
from runner.gpu.sysfs import GpuUnit

if TYPE_CHECKING:
    from runner.vm.backend import Machine, Session

NVIDIA = "10de"
EXIT_MISSING = 3
EXIT_NVIDIA_SMI = 4
POLL_S = 0.01


@dataclass(frozen=True)
class Expectation:
    """What the guest must show: ``count`` functions of each ``vendor:device`` model."""

    models: tuple[tuple[str, int], ...]
    driver: bool  # each must be bound to a guest driver (not just enumerated)

    @property
    def nvidia(self) -> bool:
        return any(model.startswith(NVIDIA + ":") for model, _ in self.models)


@dataclass(frozen=True)
class GuestDevice:
    """One function as the guest's sysfs shows it."""

    address: str
    model: str
    driver: str | None


@dataclass(frozen=True)
class Verdict:
    """What the wait saw: the matching functions, and why it failed (None: it did not)."""

    devices: tuple[GuestDevice, ...]
    failure: str | None
    smi: tuple[str, ...] = ()  # `nvidia-smi -L` lines, when it ran


def expect(units: Sequence[GpuUnit], *, driver: bool) -> Expectation:
    """Every function of ``units``: a passed-through function keeps its ids in the guest."""
    counts = Counter(fn.model for unit in units for fn in unit.functions)
    return Expectation(tuple(sorted(counts.items())), driver)


def script(expectation: Expectation, timeout_s: float) -> str:
    """A POSIX shell loop: poll ``/sys/bus/pci/devices`` until every expected function
    is there (and bound, when asked), then report; exit 3 at the deadline."""
    want = " ".join(f"{model}={count}" for model, count in expectation.models)
    need_driver = 1 if expectation.driver else 0
    smi = "1" if expectation.nvidia else "0"
    limit_cs = max(1, round(timeout_s * 100))
    return f"""\
want={shlex.quote(want)}; need_driver={need_driver}; smi={smi}
now() {{ read up _ < /proc/uptime; s=${{up%.*}}; f=${{up#*.}}; f=${{f#0}}; cs=$((s*100+f)); }}
scan() {{
  found=""
  for d in /sys/bus/pci/devices/*; do
    [ -r "$d/device" ] || continue
    read v < "$d/vendor"; read i < "$d/device"; m="${{v#0x}}:${{i#0x}}"
    case " $want " in *" $m="*) ;; *) continue ;; esac
    b=-; [ -e "$d/driver" ] && b=+
    found="$found $d=$m=$b"
  done
}}
ready() {{
  for w in $want; do
    m=${{w%=*}}; n=${{w#*=}}; c=0
    for x in $found; do
      case $x in *"=$m=+") c=$((c+1)) ;; *"=$m=-") [ $need_driver = 1 ] || c=$((c+1)) ;; esac
    done
    [ $c -ge $n ] || return 1
  done
}}
report() {{
  for x in $found; do
    d=${{x%%=*}}; r=${{x#*=}}; m=${{r%=*}}; drv=-
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "device ${{d##*/}} $m $drv"
  done
}}
now; deadline=$((cs+{limit_cs}))
while scan; ! ready; do
  now; if [ $cs -ge $deadline ]; then report; exit {EXIT_MISSING}; fi
  sleep {POLL_S}
done
report
if [ $smi = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  out=$(nvidia-smi -L 2>&1); rc=$?
  printf '%s\\n' "$out" | sed 's/^/smi /'
  [ $rc = 0 ] || exit {EXIT_NVIDIA_SMI}
fi
exit 0
"""


def verdict(expectation: Expectation, output: str, exit_code: int | None,
            timeout_s: float) -> Verdict:
    """Read the script's output and exit code into what the guest showed."""
    devices: list[GuestDevice] = []
    smi: list[str] = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "device":
            devices.append(GuestDevice(parts[1], parts[2], None if parts[3] == "-" else parts[3]))
        elif line.startswith("smi "):
            smi.append(line[4:])
    failure = None
    if exit_code == EXIT_MISSING:
        failure = _missing(expectation, devices, timeout_s)
    elif exit_code == EXIT_NVIDIA_SMI:
        said = "; ".join(smi)[-300:] or "no output"
        failure = f"the guest shows the GPU but `nvidia-smi -L` failed: {said}"
    elif exit_code != 0:
        failure = (f"the device check in the guest failed (exit {exit_code}):"
                   f" {output.strip()[-300:] or 'no output'}")
    return Verdict(tuple(devices), failure, tuple(smi))


def _missing(expectation: Expectation, seen: Sequence[GuestDevice], timeout_s: float) -> str:
    have = Counter(d.model for d in seen)
    bound = Counter(d.model for d in seen if d.driver is not None)
    problems = []
    for model, count in expectation.models:
        if have[model] < count:
            problems.append(f"{model}: {have[model]} of {count} present")
        elif expectation.driver and bound[model] < count:
            problems.append(f"{model}: present but {count - bound[model]} without a driver"
                            " (is the GPU driver in the image?)")
    return (f"the guest did not take the hot-plugged device(s) within {timeout_s:g}s: "
            + "; ".join(problems or ["nothing matched"]))


async def watch(machine: Machine, expectation: Expectation, timeout_s: float) -> Session:
    """Start the wait in the guest (before the plug, so it is already polling)."""
    return await machine.exec(Command(script=script(expectation, timeout_s),
                                      timeout=timeout_s + 5))


async def conclude(session: Session, expectation: Expectation, timeout_s: float) -> Verdict:
    """The wait's verdict; GpuError (one line) when the guest did not take the devices."""
    output = b""
    try:
        async with asyncio.timeout(timeout_s + 10):  # backstop: the guest enforces its own
            async for chunk in session:
                output += chunk.data
            status = await session.wait()
    except TimeoutError:
        with contextlib.suppress(SnapfleetError):
            await session.cancel(signal.SIGKILL)
        raise GpuError(f"the guest did not answer the device check within {timeout_s:g}s"
                       ) from None
    result = verdict(expectation, output.decode(errors="replace"), status.exit_code, timeout_s)
    if result.failure is not None:
        raise GpuError(result.failure)
    return result
