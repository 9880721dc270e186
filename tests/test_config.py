"""Configuration: defaults, file + environment layering, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.cli import main
from runner.config import load_settings
from runner.errors import ConfigError


def test_defaults_need_no_file() -> None:
    settings = load_settings()
    assert settings.vm.accel == "auto"
    assert settings.profile().memory_mib == 512
    assert settings.paths.cache_dir == Path("/var/cache/snapfleet")


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[vm]\naccel = "kvm"\n[profiles.big]\nvcpus = 4\nmemory_mib = 2048\n[profiles.default]\n'
    )
    assert load_settings(cfg).vm.accel == "kvm"
    monkeypatch.setenv("SNAPFLEET_VM__ACCEL", "tcg")
    settings = load_settings(cfg)
    assert settings.vm.accel == "tcg"
    assert settings.profile("big").vcpus == 4


def test_every_bad_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[vm]\naccel = "fast"\nboot_timeout_s = -1\n[profiles.x]\nvcpus = 0\n[nonsense]\na = 1\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    keys = {key for key, _ in info.value.problems}
    assert keys == {"vm.accel", "vm.boot_timeout_s", "profiles.x.vcpus", "nonsense"}


def test_unknown_profile_lists_known() -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'gpu' \(known: default\)"):
        load_settings().profile("gpu")


def test_default_profile_must_exist(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('default_profile = "small"\n')
    with pytest.raises(ConfigError, match="default_profile 'small' is not in"):
        load_settings(cfg)


def test_own_kernel_needs_all_parts(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[profiles.default]\nrootfs = "/srv/root.ext4"\n')
    with pytest.raises(ConfigError, match="kernel, initramfs and rootfs must be given together"):
        load_settings(cfg)


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[vm\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[vm]\naccel = 'tcg'\n")
    bad.write_text("[vm]\naccel = 'warp'\n")
    assert main(["config", "check", str(good)]) == 0
    assert main(["config", "check", str(bad)]) == 125
    assert (
        "config error: vm.accel: Input should be 'auto', 'kvm' or 'tcg'" in capsys.readouterr().err
    )


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config.example.toml"
    settings = load_settings(example)
    assert settings == load_settings()


def test_secrets_come_from_credential_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    # systemd's LoadCredential= puts one file per secret in $CREDENTIALS_DIRECTORY.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "github__token").write_text("ghp_from_a_file")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[github]\nscopes = ["org/repo"]\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(cfg)
    assert settings.github is not None
    assert settings.github.token is not None
    assert settings.github.token.get_secret_value() == "ghp_from_a_file"
    assert "ghp_from_a_file" not in repr(settings)


GH = {"scopes": ["octo-org"], "token": "t"}
LABELLED = {"default": {}, "gh": {"labels": ["self-hosted", "linux"]}}


@pytest.mark.parametrize(("github", "profiles", "key", "says"), [
    ({**GH, "mode": "scaleset"}, {"default": {}}, "", "no profile has labels"),
    ({**GH, "mode": "scaleset", "webhook_secret": "s"}, LABELLED, "github",
     "webhook_secret, webhook_url and poll_repos are for mode = \"webhook\""),
    ({**GH, "mode": "scaleset", "runner_group_id": 3}, LABELLED, "github",
     "set runner_group (a name)"),
    ({**GH, "runner_group": "ci"}, LABELLED, "github", "are for mode = \"scaleset\""),
    ({**GH, "mode": "scaleset", "scale_sets": {"gpu": {}}}, LABELLED, "",
     "github.scale_sets names unknown profiles: ['gpu']"),
    ({**GH, "mode": "scaleset", "scale_sets": {"default": {}}}, LABELLED, "",
     "profiles ['default'] have no labels"),
    ({**GH, "mode": "scaleset", "scale_sets": {"gh": {"name": "a/b"}}}, LABELLED,
     "github.scale_sets.gh", "scale set name 'a/b'"),
    ({**GH, "mode": "scaleset", "scale_sets": {"gh": {"max_runners": 0}}}, LABELLED,
     "github.scale_sets.gh.max_runners", "greater than or equal to 1"),
    ({**GH, "mode": "poll"}, LABELLED, "github.mode", "'webhook' or 'scaleset'"),
])
def test_github_mode_settings_are_checked_once_with_a_clear_reason(
    github: dict[str, object], profiles: dict[str, object], key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, github=github, profiles=profiles)
    problems = dict(info.value.problems)
    assert says in problems.get(key, "") or says in problems.get("(top level)", ""), problems


def test_scale_set_mode_serves_the_labelled_profiles_with_per_host_names() -> None:
    settings = load_settings(None, github={**GH, "mode": "scaleset", "host": "h1"},
                             profiles=LABELLED)
    assert settings.github is not None
    assert settings.github.runner_group == "default"
    labels = {n: p.labels for n, p in settings.profiles.items()}
    assert settings.github.scale_set_profiles(labels) == ["gh"]
    assert settings.github.scale_set_name("gh", "h1") == "snapfleet-h1-gh"
    named = load_settings(None, github={**GH, "mode": "scaleset",
                                        "scale_sets": {"gh": {"name": "big-boxes"}}},
                          profiles=LABELLED)
    assert named.github is not None
    assert named.github.scale_set_name("gh", "h1") == "big-boxes"
    assert load_settings(None, github=GH).github.mode == "webhook"  # type: ignore[union-attr]
