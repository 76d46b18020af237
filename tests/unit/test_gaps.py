from busagent.client.gaps import GapTracker


def doc(n, topic="t1", epoch="e1", host="h"):
    return {"host": host, "topic": topic, "epoch": epoch, "kind_seq": n}


def test_in_order_no_gap():
    g = GapTracker()
    assert [g.observe(doc(i)) for i in (1, 2, 3)] == [None, None, None]


def test_skip_is_a_gap():
    g = GapTracker()
    g.observe(doc(1))
    gap = g.observe(doc(4))
    assert gap.missed == 2 and gap.topic == "t1" and not gap.restarted


def test_topics_are_independent():
    g = GapTracker()
    assert g.observe(doc(5, "a")) is None  # first sight of a topic: no baseline
    assert g.observe(doc(9, "b")) is None
    assert g.observe(doc(6, "a")) is None


def test_new_epoch_is_a_restart():
    g = GapTracker()
    g.observe(doc(7))
    gap = g.observe(doc(1, epoch="e2"))
    assert gap.restarted


def test_seed_from_resync():
    g = GapTracker()
    g.seed("h", "e1", {"t1": 10})
    assert g.observe(doc(11)) is None
    assert g.observe(doc(13)).missed == 1
