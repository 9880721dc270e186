"""Configuration: a TOML file plus ``SNAPFLEET_*`` environment overrides.

Validated once at start into nested pydantic models and passed down; nothing
deeper reads settings. Environment variables use ``__`` for nesting, e.g.
``SNAPFLEET_VM__ACCEL=tcg`` or ``SNAPFLEET_PATHS__CACHE_DIR=/srv/cache``.
"""

from __future__ import annotations

import os
import tomllib
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from runner.errors import ConfigError
from runner.forge.github.config import GitHubConfig
from runner.forge.gitlab.config import GitLabRunnerConfig
from runner.gpu.config import GpuProfileFields, GpuSettings
from runner.limits import Timeout
from runner.net.policy import Allow, Egress, EgressPolicy

Accel = Literal["auto", "kvm", "tcg"]
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,31}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsSettings(_Section):
    """Where Snapfleet keeps things on the host."""

    cache_dir: Path = Path("/var/cache/snapfleet")
    """Built images and snapshots, keyed by their recipe (safe to delete; rebuilt on demand)."""
    state_dir: Path = Path("/var/lib/snapfleet")
    """Per-VM working directories (overlays, console logs) and daemon state."""
    recipes_dir: Path | None = None
    """Image recipes; default: the `images/` directory shipped with Snapfleet."""
    runtime_dir: Path = Path("/run/snapfleet")
    """What must outlive a daemon crash but never reach a disk: the GitLab source's
    journal of jobs in flight, which holds their job tokens (`gitlab/runner-<id>/`).
    tmpfs (/run): a host reboot forgets it (GitLab then times such a job out)."""


class VMSettings(_Section):
    """How VMs are run."""

    backend: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")] = "qemu"
    """The VMM backend: a module ``runner/vm/<backend>.py`` (``qemu``), or the dotted
    name of a module elsewhere that follows the same contract (see runner.vm.backend)."""
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img_binary: str = "qemu-img"
    accel: Accel = "auto"
    """`auto` picks KVM when it can boot a stock kernel (not on PVM hosts), else TCG."""
    tcg_tb_size_mib: Annotated[int, Field(ge=0, le=4096)] = 128
    """TCG translation cache per VM (0 = QEMU's default of 1 GiB); only used under TCG."""
    tcg_thp: bool = False
    """Let QEMU use transparent huge pages under TCG (the host's policy applies). Off, its
    translation cache and ROMs take 4 KiB pages as they are touched instead of 2 MiB
    ones: ~4 MiB less per idle clone (bench/density.py). Under KVM the host decides."""
    boot_timeout_s: Annotated[float, Field(gt=0)] = 180.0
    """Cold boot until the guest agent answers (TCG boots take seconds)."""
    restore_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Restore until the guest agent answers."""
    stop_timeout_s: Annotated[float, Field(gt=0)] = 3.0
    """How long each teardown step (QMP quit, SIGTERM) may take before escalating."""
    sandbox: bool = True
    """Run QEMU under its seccomp sandbox (`-sandbox on,spawn=deny,...`)."""
    run_as: str | None = "snapfleet-vmm"
    """Unprivileged user QEMU becomes once it has opened its files (`-runas`); it must
    exist (scripts/install.sh creates it). Unset = QEMU stays root (not recommended)."""
    cgroup: bool = True
    """Put each QEMU in a cgroup of its own with memory and pids limits."""
    cgroup_root: Path = Path("/sys/fs/cgroup")
    vmm_overhead_mib: Annotated[int, Field(ge=32)] = 256
    """QEMU's own memory on top of the guest's (the TCG translation cache comes on top)."""
    hot_max_age_s: Annotated[float, Field(gt=0)] = 600.0
    """A clone waiting in the hot pool longer than this is recycled for a fresh one."""
    console_max_bytes: Annotated[int, Field(ge=65536)] = 2**20
    """Cap on each VM's console.log (the guest's serial console); older output is dropped."""


class NetSettings(_Section):
    """Per-clone networking: a namespace, a tap, a veth to the host, NAT."""

    enabled: bool = True
    host_pool: IPv4Network = IPv4Network("10.241.0.0/16")
    """Host-side addresses: each clone takes one /30 of this pool for its veth pair."""
    egress: Egress = "internet"
    """What guests may reach beyond the host: `none`, `internet` (public addresses, not
    the host's private networks) or `all` (private networks too). The host itself and
    link-local addresses (cloud metadata) are never reachable. A profile may override it.
    `true`/`false` mean `internet`/`none`."""
    allow: list[Allow] = Field(default_factory=list)
    """Reachable whatever `egress` says: `[{cidr = "192.168.1.10/32", ports = [5000]}]`."""
    allow_host_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list)
    """Host ports (TCP and UDP) guests may reach, for a service you offer them on purpose
    (a cache, a registry mirror); a guest connects to its gateway (172.16.0.1) on that
    port and reaches the host. Everything else on the host is refused."""
    dns: list[IPv4Address] | None = None
    """Guest resolvers, set at every restore; unset = the host's upstream resolvers
    (through systemd-resolved's stub when the host uses it); `[]` = none."""

    @field_validator("egress", mode="before")
    @classmethod
    def _egress_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            return "internet" if value else "none"
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return "internet" if value.lower() == "true" else "none"
        return value


class CapacitySettings(_Section):
    """What this host lends to jobs at once."""

    vcpus: Annotated[int, Field(ge=1)] | None = None
    """vCPUs to hand out; unset = the host's CPU count."""
    memory_mib: Annotated[int, Field(ge=128)] | None = None
    """Guest memory to hand out; unset = 80% of the host's memory."""
    gpus: Annotated[int, Field(ge=0)] = 0
    """At most this many GPUs lent at once; 0 = every device `[gpu]` hands out."""
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    """Jobs running at once, whatever the capacity says."""


class DaemonSettings(_Section):
    """`snapfleet serve`."""

    api_socket: Path = Path("/run/snapfleet/api.sock")
    """Local control API (submit, jobs, logs, cancel, status)."""
    api_group: str | None = None
    """Group allowed to use the API (socket mode 0660); unset = root only (0600)."""
    metrics_listen: str = "127.0.0.1:9464"
    """Prometheus endpoint: `host:port`, `unix:/path`, or empty to disable."""
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 300.0
    """On SIGTERM, running jobs get this long to finish before they are cancelled."""
    reconcile_interval_s: Annotated[float, Field(gt=0)] = 60.0
    """How often the daemon compares its records with what exists on the host."""
    log_retention_days: Annotated[float, Field(gt=0)] = 14.0
    """Job logs (and records of finished jobs) older than this are deleted."""
    log_max_bytes: Annotated[int, Field(ge=1024)] = 64 * 2**20
    """Per-job log limit; output past it is dropped with a note."""


class GitLabSettings(_Section):
    """GitLab: the custom executor (`snapfleet gitlab-executor ...` in gitlab-runner's
    config) and the direct job source (`[[gitlab.runners]]`)."""

    allowed_profiles: list[str] = Field(default_factory=lambda: ["default"])
    """Profiles a job may ask for with the SNAPFLEET_PROFILE variable."""
    builds_dir: str = "/builds"
    cache_dir: str = "/cache"
    shell: str = "/bin/bash"
    """Shell that runs gitlab-runner's stage scripts in the VM."""
    require_helper: bool = True
    """The custom executor's `config` stage fails a job whose profile's image has no
    `gitlab-runner` binary (the stage scripts call it in the VM for artifacts and
    caches; see images/gitlab-runner). Off: for jobs that use neither."""
    runners: list[GitLabRunnerConfig] = Field(default_factory=list)
    """Runners the daemon serves itself over GitLab's runner API (`snapfleet gitlab
    register` prints one); each runs its jobs in the profile serving all its tags."""

    @field_validator("runners")
    @classmethod
    def _one_source_per_runner(cls, value: list[GitLabRunnerConfig]) -> list[GitLabRunnerConfig]:
        ids = [r.runner_id for r in value]
        if len(ids) != len(set(ids)):
            raise ValueError(f"a runner_id appears twice: {sorted(ids)}")
        return value


class Profile(GpuProfileFields, _Section):
    """A named VM shape that jobs run in."""

    image: str = "default"
    """Image recipe name (under recipes_dir), or a directory holding a built image."""
    vcpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Field(ge=128, le=262144)] = 512
    timeout_s: Timeout = 3600.0
    """Wall-clock limit for one job."""
    kernel: Path | None = None
    """Use this kernel (vmlinux with a PVH note) instead of the image's."""
    initramfs: Path | None = None
    rootfs: Path | None = None
    """Use this raw ext4 root filesystem instead of the image's."""
    labels: list[str] = Field(default_factory=list)
    """Job labels this profile serves (all of a job's labels must be here)."""
    warm: Annotated[int, Field(ge=0, le=64)] = 0
    """VMM processes kept started and waiting for a restore (the warm pool)."""
    hot: Annotated[int, Field(ge=0, le=64)] = 0
    """Clones kept restored, answering and under this profile's network policy, so a job
    starts with its first command (the hot pool). Each holds its guest memory."""
    egress: Egress | None = None
    """This profile's egress (`none`, `internet`, `all`); unset = `net.egress`."""
    allow: list[Allow] | None = None
    """This profile's allow-list; unset = `net.allow`."""

    def policy(self, net: NetSettings) -> EgressPolicy:
        """The network policy of this profile's clones."""
        return EgressPolicy(
            egress=self.egress or net.egress,
            allow=tuple(net.allow if self.allow is None else self.allow),
        )

    @model_validator(mode="after")
    def _own_parts_together(self) -> Profile:
        own = [self.kernel, self.initramfs, self.rootfs]
        if any(own) and not all(own):
            raise ValueError("kernel, initramfs and rootfs must be given together")
        return self


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="SNAPFLEET_",
        env_nested_delimiter="__",
        secrets_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    paths: PathsSettings = PathsSettings()
    vm: VMSettings = VMSettings()
    net: NetSettings = NetSettings()
    capacity: CapacitySettings = CapacitySettings()
    daemon: DaemonSettings = DaemonSettings()
    gitlab: GitLabSettings = GitLabSettings()
    gpu: GpuSettings = GpuSettings()
    """Host devices jobs may get by VFIO (`[gpu]`); profiles ask with `gpus`/`gpu`."""
    github: GitHubConfig | None = None
    """GitHub Actions JIT runners; unset = off."""
    profiles: dict[str, Profile] = Field(default_factory=lambda: {"default": Profile()})
    default_profile: str = "default"

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, value: dict[str, Profile]) -> dict[str, Profile]:
        import re

        for name in value:
            if not re.match(_NAME, name):
                raise ValueError(f"profile name {name!r} must match {_NAME}")
        return value

    @model_validator(mode="after")
    def _default_exists(self) -> Settings:
        if self.default_profile not in self.profiles:
            raise ValueError(f"default_profile {self.default_profile!r} is not in [profiles]")
        unknown = sorted(set(self.gitlab.allowed_profiles) - set(self.profiles))
        if unknown:
            raise ValueError(f"gitlab.allowed_profiles names unknown profiles: {unknown}")
        if self.github is not None:
            self.github.check_profiles({n: p.labels for n, p in self.profiles.items()})
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file, the file beats defaults.
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls),
            # Credential files are named by key alone (github__token), without the prefix.
            NestedSecretsSettingsSource(file_secret_settings, secrets_prefix=""),
        )

    def profile(self, name: str | None = None) -> Profile:
        """The named profile (or the default one); ConfigError when unknown."""
        key = name or self.default_profile
        try:
            return self.profiles[key]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise ConfigError("profile", f"unknown profile {key!r} (known: {known})") from None


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read, merge and validate the configuration; ConfigError names each bad key."""
    if path is not None:
        _check_toml(path)

    # Secrets as files: systemd's LoadCredential= puts them in $CREDENTIALS_DIRECTORY,
    # one file per key, e.g. `github__webhook_secret`.
    secrets = os.environ.get("CREDENTIALS_DIRECTORY")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path, secrets_dir=secrets)

    try:
        return Settings.model_validate(_FromFile(**overrides).model_dump())
    except ValidationError as exc:
        raise _config_error(exc) from None


def _check_toml(path: Path) -> None:
    try:
        tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None


def _config_error(exc: ValidationError) -> ConfigError:
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        problems.append((key, err["msg"]))
    key, reason = problems[0]
    return ConfigError(key, reason, problems=problems)
