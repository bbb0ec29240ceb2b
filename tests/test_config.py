"""Configuration values: defaults, validation, immutability, environment."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import pytest

from tgi_adapter import AdapterConfig, RetryPolicy, TgiHttpAdapter, Timeouts
from tgi_adapter.config import config_from_env


def test_defaults_are_the_documented_ones() -> None:
    assert Timeouts() == Timeouts(connect=5.0, control=10.0, first_token=120.0, token_idle=30.0)
    assert RetryPolicy() == RetryPolicy(attempts=4, base=0.1, multiplier=2.0, cap=2.0, retry_after_cap=30.0)
    config = AdapterConfig()
    assert config.route == "native"
    assert config.verify is True
    assert config.max_frame_bytes == 1 << 20
    assert config.headers == {}
    assert (config.pool_id, config.replica_id) == (None, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connect": -1},
        {"control": 0},
        {"first_token": float("inf")},
        {"token_idle": float("nan")},
        {"connect": "5"},
        {"control": True},
    ],
)
def test_bad_timeouts_are_a_clear_value_error(kwargs: Dict[str, Any]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Timeouts.{name}"):
        Timeouts(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": 1.5},
        {"base": -0.1},
        {"multiplier": 0.5},
        {"cap": float("nan")},
        {"retry_after_cap": -1},
    ],
)
def test_bad_retry_policies_are_a_clear_value_error(kwargs: Dict[str, Any]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"RetryPolicy.{name}"):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"route": "grpc"},
        {"max_frame_bytes": 10},
        {"pool_maxsize": 0},
        {"verify": ""},
        {"verify": 1.0},
        {"headers": {"X-A": 1}},
        {"timeouts": {"connect": 1}},
        {"retry": 3},
        {"cert": ("a",)},
        {"info_ttl": -1},
        {"pool_id": 3},
    ],
)
def test_bad_adapter_configs_are_a_clear_value_error(kwargs: Dict[str, Any]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"AdapterConfig.{name}"):
        AdapterConfig(**kwargs)


def test_config_values_are_immutable() -> None:
    for value in (Timeouts(), RetryPolicy(), AdapterConfig()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.route = "x"  # type: ignore[union-attr]


def test_headers_are_copied_so_later_changes_do_not_leak_in() -> None:
    headers = {"X-Team": "a"}
    config = AdapterConfig(headers=headers)
    headers["X-Team"] = "b"
    assert config.headers == {"X-Team": "a"}


def test_config_repr_hides_credential_headers() -> None:
    config = AdapterConfig(headers={"Authorization": "Bearer s3cr3t-value", "X-API-Key": "k3y-value", "X-Team": "a"})
    text = repr(config)
    assert "s3cr3t-value" not in text and "k3y-value" not in text
    assert "X-Team" in text and "'a'" in text


def test_environment_overrides() -> None:
    env = {
        "TGI_ADAPTER_ROUTE": "openai-chat",
        "TGI_ADAPTER_POOL_ID": "pool-a",
        "TGI_ADAPTER_REPLICA_ID": "r1",
        "TGI_ADAPTER_VERIFY": "false",
        "TGI_ADAPTER_CONNECT_TIMEOUT": "1.5",
        "TGI_ADAPTER_TOKEN_IDLE_TIMEOUT": "7",
        "TGI_ADAPTER_RETRY_ATTEMPTS": "2",
    }
    config = config_from_env(env)
    assert config.route == "openai-chat"
    assert (config.pool_id, config.replica_id) == ("pool-a", "r1")
    assert config.verify is False
    assert config.timeouts.connect == 1.5 and config.timeouts.token_idle == 7.0
    assert config.timeouts.first_token == 120.0
    assert config.retry.attempts == 2
    assert config_from_env({"TGI_ADAPTER_VERIFY": "/etc/ca.pem"}).verify == "/etc/ca.pem"
    assert config_from_env({}) == AdapterConfig()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TGI_ADAPTER_CONNECT_TIMEOUT": "soon"}, "TGI_ADAPTER_CONNECT_TIMEOUT"),
        ({"TGI_ADAPTER_RETRY_ATTEMPTS": "many"}, "TGI_ADAPTER_RETRY_ATTEMPTS"),
        ({"TGI_ADAPTER_ROUTE": "carrier-pigeon"}, "AdapterConfig.route"),
        ({"TGI_ADAPTER_CONTROL_TIMEOUT": "-2"}, "Timeouts.control"),
    ],
)
def test_bad_environment_values_name_the_variable(env: Dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config_from_env(env)


def test_from_env_reads_url_and_token_but_never_an_ambient_hf_token() -> None:
    adapter = TgiHttpAdapter.from_env(
        {"TGI_ADAPTER_URL": "http://127.0.0.1:9/", "HF_TOKEN": "hf_ambientambientambient"}
    )
    try:
        assert "Authorization" not in adapter._headers
        assert adapter.base_url == "http://127.0.0.1:9"
    finally:
        adapter.close()
    adapter = TgiHttpAdapter.from_env({"TGI_ADAPTER_URL": "http://h:1/tgi/r3", "TGI_ADAPTER_TOKEN": "tok-123456"})
    try:
        assert adapter._headers["Authorization"] == "Bearer tok-123456"
        assert adapter.base_url == "http://h:1/tgi/r3"
        assert "tok-123456" not in repr(adapter)
    finally:
        adapter.close()
    with pytest.raises(ValueError, match="TGI_ADAPTER_URL"):
        TgiHttpAdapter.from_env({})


@pytest.mark.parametrize("url", ["", "127.0.0.1:3000", "ftp://h/", "http://", "http://h/?q=1", "http:///path"])
def test_unusable_base_urls_are_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        TgiHttpAdapter(url)


def test_credentials_in_the_url_stay_out_of_the_repr() -> None:
    adapter = TgiHttpAdapter("https://user:pa55word@gw.example/tgi")
    try:
        assert "pa55word" not in repr(adapter)
    finally:
        adapter.close()
