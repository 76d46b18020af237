import pytest

from busagent.bus.topics import Stamper, matches


@pytest.mark.parametrize("pattern,name,ok", [
    ("libvirt.event.h1.domain.lifecycle", "libvirt.event.h1.domain.lifecycle", True),
    ("libvirt.event.h1.domain.lifecycle", "libvirt.event.h1.domain.reboot", False),
    ("libvirt.event.*.domain.lifecycle", "libvirt.event.h2.domain.lifecycle", True),
    ("libvirt.event.*.domain.lifecycle", "libvirt.event.h2.x.domain.lifecycle", False),
    ("libvirt.event.#", "libvirt.event.h1.domain.lifecycle", True),
    ("libvirt.event.#", "libvirt.event", True),
    ("libvirt.#.lifecycle", "libvirt.event.h1.network.lifecycle", True),
    ("libvirt.#.lifecycle", "libvirt.event.h1.network.refresh", False),
    ("#", "anything.at.all", True),
    ("#.lifecycle", "libvirt.event.h1.domain.lifecycle", True),
    ("#.lifecycle", "lifecycle", True),
    ("libvirt.*", "libvirt.event.h1", False),
    ("libvirt.ev*", "libvirt.event", False),
])
def test_matches(pattern, name, ok):
    assert matches(pattern, name) is ok


def test_stamper_sequences():
    s = Stamper()
    a, b, c = s.stamp("x"), s.stamp("y"), s.stamp("x")
    assert (a["seq"], b["seq"], c["seq"]) == (1, 2, 3)
    assert (a["kind_seq"], b["kind_seq"], c["kind_seq"]) == (1, 1, 2)
    assert a["epoch"] == c["epoch"] != Stamper().epoch
    assert s.position()["seq"] == 3
