"""Settings: defaults, file and environment, each bad value's message, secrets never shown."""

from __future__ import annotations

import logging

import pytest

from cluster.logs import SecretFilter, add_secrets, configure_logging
from cluster.settings import SettingsError, load_settings


def test_defaults_are_the_documented_limits():
    s = load_settings(use_file=False)
    r = s.risk
    assert (r.max_position_pct, r.max_risk_per_trade_pct, r.min_reward_risk) == (0.05, 0.01, 2.0)
    assert (r.confidence_threshold, r.max_daily_loss_pct, r.max_drawdown_pct) == (0.7, 0.02, 0.05)
    assert r.production is False
    z = s.resilience
    assert (z.retry_attempts, z.retry_base_delay_s, z.retry_multiplier) == (3, 1.0, 2.0)
    assert (z.breaker_failures, z.breaker_open_s, z.breaker_recovery_s) == (5, 60.0, 300.0)
    assert s.serve.host == "127.0.0.1"


def test_per_symbol_position_override():
    s = load_settings(use_file=False, risk={"max_position_pct_by_symbol": {"spy": 0.1}})
    assert s.risk.max_position_for("SPY") == 0.1
    assert s.risk.max_position_for("QQQ") == 0.05


def test_file_then_environment_override(tmp_path, monkeypatch):
    cfg = tmp_path / "raytrade.toml"
    cfg.write_text('[risk]\nmax_daily_loss_pct = 0.03\nconfidence_threshold = 0.8\n[serve]\nport = 9000\n')
    monkeypatch.setenv("RAYTRADE_RISK__MAX_DAILY_LOSS_PCT", "0.04")
    s = load_settings(cfg)
    assert s.risk.max_daily_loss_pct == 0.04  # the environment wins
    assert s.risk.confidence_threshold == 0.8  # the file's value stays
    assert s.serve.port == 9000


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"risk": {"max_daily_loss_pct": -0.1}}, "risk.max_daily_loss_pct=-0.1", "greater than 0"),
        ({"risk": {"confidence_threshold": 1.5}}, "risk.confidence_threshold=1.5", "less than or equal to 1"),
        ({"risk": {"max_position_pct": 0}}, "risk.max_position_pct=0", "greater than 0"),
        ({"resilience": {"retry_attempts": 0}}, "resilience.retry_attempts=0", "greater than or equal to 1"),
        ({"serve": {"port": 70000}}, "serve.port=70000", "less than or equal to 65535"),
        ({"store": {"uri": "ftp://x"}}, "store.uri='ftp://x'", "only local paths and s3://"),
        ({"feeds": {"sources": ["carrier-pigeon"]}}, "feeds.sources.0='carrier-pigeon'", "'replay', 'synthetic' or 'alpaca'"),
        ({"log": {"level": "LOUD"}}, "log.level='LOUD'", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ({"risk": {"allowed_symbols": ["SP Y"]}}, "risk.allowed_symbols", "letters/digits"),
        ({"risk": {"bogus": 1}}, "risk.bogus", "unknown setting"),
    ],
)
def test_bad_value_is_one_line_naming_field_value_and_rule(overrides, field, allowed):
    with pytest.raises(SettingsError) as e:
        load_settings(use_file=False, **overrides)
    msg = str(e.value)
    assert "\n" not in msg
    assert field in msg
    assert allowed in msg


def test_bad_environment_value_is_reported(monkeypatch):
    monkeypatch.setenv("RAYTRADE_RISK__MAX_DRAWDOWN_PCT", "lots")
    with pytest.raises(SettingsError, match=r"risk.max_drawdown_pct='lots'.*valid number"):
        load_settings(use_file=False)


def test_alpaca_keys_must_come_in_pairs():
    with pytest.raises(SettingsError, match="must be given together"):
        load_settings(use_file=False, alpaca={"api_key": "PKTESTKEY123"})


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_bad_toml_is_an_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[risk\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(f)


SECRET_KEY = "PK-super-secret-key-0001"
SECRET = "sk-very-secret-value-0002"
API_KEY = "admin-key-value-0003"


def _secret_settings():
    return load_settings(
        use_file=False,
        alpaca={"api_key": SECRET_KEY, "secret_key": SECRET},
        api_keys=[{"name": "ops", "key": API_KEY, "role": "admin"}],
        store={"uri": "s3://bucket/p", "access_key": "AKIA-secret-0004", "secret_key": "s3-secret-0005"},
    )


def test_secrets_never_in_repr_str_or_show():
    s = _secret_settings()
    secrets = [SECRET_KEY, SECRET, API_KEY, "AKIA-secret-0004", "s3-secret-0005"]
    for text in (repr(s), str(s), s.show(), repr(s.alpaca), str(s.redacted())):
        for secret in secrets:
            assert secret not in text
    assert '"api_key": "***"' in s.show()
    # The values are still there for the code that needs them.
    assert s.alpaca.api_key.get_secret_value() == SECRET_KEY
    assert sorted(s.secret_values()) == sorted(secrets)


def test_bad_secret_value_is_not_echoed():
    with pytest.raises(SettingsError) as e:
        load_settings(use_file=False, api_keys=[{"name": "x", "key": SECRET, "role": "god"}])
    assert SECRET not in str(e.value)


def test_secrets_scrubbed_from_logs(capsys):
    s = _secret_settings()
    configure_logging(s)
    log = logging.getLogger("raytrade.test")
    log.warning("connecting with key %s and secret %s", SECRET_KEY, SECRET)
    try:
        raise RuntimeError(f"auth failed for {API_KEY}")
    except RuntimeError:
        log.exception("boom")
    err = capsys.readouterr().err
    assert "connecting with key *** and secret ***" in err
    assert SECRET_KEY not in err and SECRET not in err and API_KEY not in err


def test_secret_filter_on_a_library_record():
    add_secrets(["lib-secret-xyz"])
    rec = logging.LogRecord("alpaca", logging.INFO, __file__, 1, "url?key=%s", ("lib-secret-xyz",), None)
    SecretFilter().filter(rec)
    assert rec.getMessage() == "url?key=***"
