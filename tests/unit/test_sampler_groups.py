"""Which domain statistics groups the sampler asks libvirt for (pure mapping, settings)."""
from __future__ import annotations

import libvirt
import pytest

from busagent import config
from busagent.config import ConfigError, Settings
from busagent.sampler import stats_flags, stats_groups


def test_groups_are_libvirts_own():
    groups = stats_groups()
    assert groups["cpu-total"] == libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    assert {"state", "balloon", "vcpu", "interface", "block"} <= set(groups)


def test_stats_groups_map_to_libvirt_flags():
    assert stats_flags(()) == 0
    assert stats_flags(("state", "cpu-total", "balloon")) == (
        libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON)
    with pytest.raises(ValueError, match="cpu-totl"):
        stats_flags(("cpu-totl",))
    with pytest.raises(ConfigError, match="unknown statistics group"):
        Settings(stats_groups=("nope",)).validate()
    s = config.load(None, env={"BUSAGENT_STATS_GROUPS": "state,block"})
    assert s.stats_groups == ("state", "block")
