"""config.py: YAML plus flags, validated, with messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fqdnproxy import cli, config


def test_defaults_are_valid() -> None:
    cfg = config.load(None)
    assert cfg.dns.listen == ("127.0.0.1:5353", "[::1]:5353")
    assert cfg.upstream.timeout == 2.0
    assert cfg.dns.max_in_flight == 10_000


def test_yaml_file_and_flags_on_top(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("dns:\n  listen: ['127.0.0.1:1053']\nupstream:\n  timeout: 500ms\n")
    cfg = config.load(path, {"upstream.servers": "192.0.2.1:53,[2001:db8::1]:53"})
    assert cfg.dns.listen == ("127.0.0.1:1053",)
    assert cfg.upstream.timeout == 0.5
    assert cfg.upstream.servers == ("192.0.2.1:53", "[2001:db8::1]:53")


@pytest.mark.parametrize("text, message", [
    ("dns:\n  lisen: []\n", "dns.lisen: unknown key"),
    ("dnss: {}\n", "dnss: unknown key"),
    ("dns:\n  listen: ['localhost:53']\n", "dns.listen[0]"),
    ("dns:\n  listen: ['::1:53']\n", "IPv6 address in brackets"),
    ("upstream:\n  servers: ['127.0.0.1:0']\n", "port must be 1..65535"),
    ("upstream:\n  timeout: soon\n", "upstream.timeout: expected a duration"),
    ("upstream:\n  timeout: -1\n", "upstream.timeout: must be greater than 0"),
    ("upstream:\n  timeout: .nan\n", "upstream.timeout: expected a finite duration"),
    ("upstream:\n  timeout: inf\n", "upstream.timeout: expected a duration"),
    ("upstream:\n  servers: ['[::ffff:127.0.0.1]:53']\n", "not its IPv4-mapped"),
    ("dns:\n  max_in_flight: many\n", "dns.max_in_flight: expected an integer"),
    ("dns:\n  tcp: maybe\n", "dns.tcp: expected true or false"),
    ("log_level: loud\n", "log_level: 'loud'"),
    ("- a list\n", "top level must be a mapping"),
    ("dns: [\n", "not valid YAML"),
    ("dns:\n  workers: 0\n", "dns.workers: must be 1..8, got 0"),
    ("dns:\n  workers: 9\n", "dns.workers: must be 1..8, got 9"),
    ("dns:\n  workers: 2\n  listen: ['127.0.0.1:53', '127.0.0.1:0']\n",
     "dns.listen[1]: port 0 with dns.workers above 1"),
    ("dns:\n  workers: 3\nmetrics:\n  listen: '127.0.0.1:65534'\n", "up to 65536: past 65535"),
])
def test_invalid_configuration_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as raised:
        config.load(path)
    assert message in str(raised.value)
    assert str(path) in str(raised.value)


def test_invalid_configuration_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("upstream:\n  sockets_per_server: 0\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    assert "upstream.sockets_per_server: must be greater than 0" in capsys.readouterr().err


def test_bad_flag_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--dns-listen", "nowhere"]) == 2
    assert "dns.listen[0]" in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    commands = next(a for a in cli.build_parser()._actions if a.dest == "==SUPPRESS==" and
                    getattr(a, "choices", None))
    assert "run" in commands.choices
    for name in commands.choices:
        assert f"    {name} " in out


def test_run_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for key, _, _ in config.describe():
        section, name = key.split(".")
        assert f"--{section}-{name.replace('_', '-')}" in out


@pytest.mark.parametrize("flag, key", [("--datapath-allow-max", "datapath.allow_max"),
                                       ("--datapath-ct-max", "datapath.ct_max")])
def test_map_sizes_must_be_positive_and_bounded(flag: str, key: str) -> None:
    for value in ("0", str((1 << 26) + 1)):
        with pytest.raises(config.ConfigError, match=key):
            config.from_args(cli.build_parser().parse_args(["run", flag, value]))
