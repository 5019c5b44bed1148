"""postvern.toml: defaults, round trip, validation, environment overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from postvern import config


def test_render_round_trips_every_section(tmp_path: Path) -> None:
    settings = config.Settings(tmp_path, hostname="mx.example.org", primary_domain="example.org")
    settings.listen.imap = "127.0.0.1:1143"
    settings.dns.nameservers = ["127.0.0.1:5300"]
    settings.kdf.memory_kib = 131072
    text = config.render(settings)
    for section in ("listen", "tls", "dns", "kdf", "limits", "abuse", "filters", "mta", "log"):
        assert f"[{section}]" in text
    assert config.from_mapping(tmp_path, tomllib.loads(text)) == settings
    assert settings.nameservers == [("127.0.0.1", 5300)]


def test_env_overrides(tmp_path: Path) -> None:
    (tmp_path / config.CONFIG_NAME).write_text(config.render(config.Settings(tmp_path)))
    env = {
        "POSTVERN_LISTEN__IMAP": "127.0.0.1:9143",
        "POSTVERN_KDF__TIME_COST": "5",
        "POSTVERN_ABUSE__GREYLISTING": "true",
        "POSTVERN_DNS__NAMESERVERS": "127.0.0.1:53,[::1]:5353",
    }
    s = config.load(tmp_path, env)
    assert s.listen.imap == "127.0.0.1:9143"
    assert s.kdf.time_cost == 5 and s.abuse.greylisting is True
    assert s.nameservers == [("127.0.0.1", 53), ("::1", 5353)]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"listen": {"imap": "nohost"}}, "expected host:port"),
        ({"listen": {"imap": "h:99999"}}, "port out of range"),
        ({"kdf": {"time_cost": "x"}}, "expected a number"),
        ({"kdf": {"bogus": 1}}, "unknown setting"),
        ({"nonsense": 1}, "unknown setting"),
        ({"abuse": {"greylisting": "maybe"}}, "true or false"),
    ],
)
def test_invalid_values_are_named(tmp_path: Path, raw: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.from_mapping(tmp_path, raw)
