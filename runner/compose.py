"""The composition root: the one place concrete parts are chosen and wired.

`engine` builds the host's network, the VM backend named by ``vm.backend``
and the engine over them; `daemon` adds the job sources the config enables.
Nothing else constructs a hypervisor or a job source.
"""

from __future__ import annotations

import functools
import pwd
from typing import TYPE_CHECKING

from runner.config import Settings
from runner.engine import Engine
from runner.errors import ConfigError
from runner.gpu import GpuAllocator, Sysfs, make_source
from runner.net import NetConfig
from runner.net.config import instance_id
from runner.net.dns import Resolvers, host_resolvers
from runner.net.manager import NetworkManager
from runner.vm import load_backend
from runner.vm.backend import BackendContext

if TYPE_CHECKING:
    from runner.service.daemon import Daemon
    from runner.service.notify import Notifier


def engine(settings: Settings) -> Engine:
    """The engine for ``settings``: network, VM backend and all (use ``async with``)."""
    instance = instance_id(settings.paths.state_dir)
    net: NetworkManager | None = None
    resolvers = Resolvers(tuple(settings.net.dns or ()), "config")
    if settings.net.enabled:
        if settings.net.dns is None:
            resolvers = host_resolvers()
        net = NetworkManager(
            NetConfig(
                instance=instance,
                pool=settings.net.host_pool,
                nameservers=resolvers.nameservers,
                allow_host_ports=tuple(sorted(set(settings.net.allow_host_ports))),
            )
        )
    _check_run_as(settings.vm.run_as)
    factory = load_backend(settings.vm.backend)
    hypervisor = factory(
        BackendContext(settings.vm, settings.paths.state_dir / "vms", net, instance=instance)
    )
    return Engine(settings, hypervisor, resolvers, gpus=gpu_allocator(settings))


def gpu_allocator(settings: Settings, sysfs: Sysfs | None = None) -> GpuAllocator | None:
    """The host's GPU allocator, or None when `[gpu]` hands out nothing."""
    gpu = settings.gpu
    if not (gpu.devices or gpu.edu_devices):
        return None
    source = make_source(gpu, sysfs or Sysfs())
    return GpuAllocator(source, settings.paths.state_dir / "gpu-leases.json")


def daemon(settings: Settings, *, notifier: Notifier | None = None) -> Daemon:
    """The daemon with the job sources ``settings`` enable."""
    from runner.api.server import LocalApi
    from runner.forge.github.scaleset_source import ScaleSetSource
    from runner.forge.github.source import GitHubSource
    from runner.forge.gitlab.source import GitLabSource, SlotClaims
    from runner.forge.gitlab_helper import check_image
    from runner.service.daemon import Daemon
    from runner.service.leases import LeaseBook

    built = Daemon(settings, engine(settings), notifier=notifier)
    leases = LeaseBook(
        built,
        allowed_profiles=settings.gitlab.allowed_profiles,
        default_profile=settings.default_profile,
        shell=settings.gitlab.shell,
        check_image=functools.partial(check_image, settings),
    )
    built.add_source(leases)
    built.add_source(LocalApi(built, leases))
    if settings.github is not None and settings.github.mode == "scaleset":
        built.add_source(ScaleSetSource(settings.github, built))
    elif settings.github is not None:
        built.add_source(GitHubSource(settings.github, built))
    claims = SlotClaims()  # one for all runners: two never ask for the same free slot
    for runner in settings.gitlab.runners:
        built.add_source(GitLabSource(runner, built, claims=claims))
    return built


def _check_run_as(user: str | None) -> None:
    if user is None:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            "vm.run_as",
            f"user {user!r} does not exist: create it (scripts/install.sh does: "
            f"useradd --system {user}) or set vm.run_as",
        ) from None
