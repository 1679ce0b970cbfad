"""RankConfig.from_env: torchrun's variables, rlmon's, and clear errors naming the bad key."""

from __future__ import annotations

import pytest

from rlmon.config import RankConfig
from rlmon.errors import ConfigError


def test_torchrun_environment_is_read():
    """RANK, LOCAL_RANK, WORLD_SIZE and RLMON_* land in the config."""
    config = RankConfig.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                  "RLMON_ENDPOINT": "tcp://127.0.0.1:5555", "RLMON_RUN_ID": "abc"})
    assert (config.rank, config.local_rank, config.world_size) == (3, 1, 4)
    assert config.endpoint == "tcp://127.0.0.1:5555" and config.run_id == "abc"
    assert not config.disabled


def test_defaults_for_a_plain_script():
    """Without torchrun: rank 0 of 1, no endpoint, a fresh run id."""
    config = RankConfig.from_env({})
    assert (config.rank, config.world_size, config.endpoint) == (0, 1, None)
    assert len(config.run_id) == 12


@pytest.mark.parametrize("value, disabled", [("1", True), ("true", True), ("YES", True),
                                             ("0", False), ("", False), ("no", False)])
def test_disable_flag(value, disabled):
    """RLMON_DISABLE accepts the usual truthy spellings."""
    assert RankConfig.from_env({"RLMON_DISABLE": value}).disabled is disabled


def test_torchelastic_placeholder_run_id_is_not_used():
    """torchrun's TORCHELASTIC_RUN_ID of "none" does not become a shared run id."""
    assert RankConfig.from_env({"TORCHELASTIC_RUN_ID": "none"}).run_id != "none"


@pytest.mark.parametrize("env, key", [
    ({"RANK": "x"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({"RLMON_FLUSH_INTERVAL": "0"}, "RLMON_FLUSH_INTERVAL"),
    ({"RLMON_FLUSH_INTERVAL": "fast"}, "RLMON_FLUSH_INTERVAL"),
    ({"RLMON_STOP_SYNC_EVERY": "-1"}, "RLMON_STOP_SYNC_EVERY"),
])
def test_bad_settings_name_their_key(env, key):
    """An invalid variable raises ConfigError naming it."""
    with pytest.raises(ConfigError) as caught:
        RankConfig.from_env(env)
    assert caught.value.key == key


def test_overrides_win_over_the_environment():
    """Keyword overrides replace environment values."""
    config = RankConfig.from_env({"RLMON_ENDPOINT": "tcp://a:1"}, endpoint="tcp://b:2")
    assert config.endpoint == "tcp://b:2"
