"""A real dir storage pool through the bus: volumes created, cloned, resized, wiped and deleted.

The files are real (qcow2 and raw, made by qemu-img and libvirt's storage backend) in a
directory of the set-up; the pool's lifecycle and refresh events are checked in order.
"""
from __future__ import annotations

from pathlib import Path

from realkit import about, event_view

MIB = 1 << 20


def test_dir_pool_volumes(hv):
    ev = hv.events
    name = "bv-store"
    target = Path(hv.env["dir"]) / "store"
    pool = {"name": name}
    xml = f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>"
    try:
        m = ev.mark()
        hv.call("virStoragePoolDefineXML", xml=xml, flags=0)
        hv.call("virStoragePoolBuild", pool=pool, flags=0)
        assert target.is_dir()
        hv.call("virStoragePoolCreate", pool=pool, flags=0)
        info = hv.call("virStoragePoolGetInfo", pool=pool)
        assert info["state_name"] == "VIR_STORAGE_POOL_RUNNING" and info["capacity"] > 0

        # a qcow2 volume, a raw clone of it, a resize, a wipe
        q = hv.call("virStorageVolCreateXML", pool=pool, flags=0, xmlDesc=(
            "<volume><name>q.qcow2</name><capacity unit='MiB'>16</capacity>"
            "<target><format type='qcow2'/></target></volume>"))
        assert q["name"] == "q.qcow2"
        qpath = hv.call("virStorageVolGetPath", vol={"pool": pool, "name": "q.qcow2"})
        assert qpath == str(target / "q.qcow2") and Path(qpath).read_bytes()[:4] == b"QFI\xfb"
        qinfo = hv.call("virStorageVolGetInfo", vol={"path": qpath})
        assert qinfo["capacity"] == 16 * MIB and qinfo["allocation"] < 16 * MIB  # sparse

        hv.call("virStorageVolCreateXMLFrom", pool=pool, clonevol={"path": qpath}, flags=0, xmlDesc=(
            "<volume><name>clone.raw</name><capacity unit='MiB'>16</capacity>"
            "<target><format type='raw'/></target></volume>"))
        clone = {"pool": pool, "name": "clone.raw"}
        cpath = hv.call("virStorageVolGetPath", vol=clone)
        assert Path(cpath).stat().st_size == 16 * MIB
        assert "<format type='raw'/>" in hv.call("virStorageVolGetXMLDesc", vol=clone, flags=0)

        hv.call("virStorageVolResize", vol=clone, capacity=32 * MIB, flags=0)
        assert hv.call("virStorageVolGetInfo", vol=clone)["capacity"] == 32 * MIB
        assert Path(cpath).stat().st_size == 32 * MIB
        hv.call("virStorageVolResize", vol={"path": qpath}, capacity=24 * MIB, flags=0)
        assert hv.call("virStorageVolGetInfo", vol={"path": qpath})["capacity"] == 24 * MIB

        with open(cpath, "r+b") as f:
            f.write(b"busagent" * 512)
        hv.call("virStorageVolWipe", vol=clone, flags=0)
        with open(cpath, "rb") as f:
            assert f.read(4096) == b"\0" * 4096

        vols = sorted(v["name"] for v in hv.call("virStoragePoolListAllVolumes", pool=pool, flags=0))
        assert vols == ["clone.raw", "q.qcow2"]
        hv.call("virStoragePoolRefresh", pool=pool, flags=0)

        hv.call("virStorageVolDelete", vol=clone, flags=0)
        hv.call("virStorageVolDelete", vol={"path": qpath}, flags=0)
        assert not Path(cpath).exists() and not Path(qpath).exists()
        assert hv.call("virStoragePoolNumOfVolumes", pool=pool) == 0

        hv.call("virStoragePoolDestroy", pool=pool)
        hv.call("virStoragePoolDelete", pool=pool, flags=0)
        assert not target.exists()
        hv.call("virStoragePoolUndefine", pool=pool)
        ev.expect(m, about("storage_pool", name), [
            ("storage_pool.lifecycle", "DEFINED", None),
            ("storage_pool.lifecycle", "CREATED", None),  # virStoragePoolBuild made its directory
            ("storage_pool.lifecycle", "STARTED", None),
            ("storage_pool.refresh",),
            ("storage_pool.lifecycle", "STOPPED", None),
            ("storage_pool.lifecycle", "DELETED", None),
            ("storage_pool.lifecycle", "UNDEFINED", None)], event_view)
    finally:
        for method, args in (("virStoragePoolDestroy", {}), ("virStoragePoolDelete", {"flags": 0}),
                             ("virStoragePoolUndefine", {})):
            try:
                hv.call(method, pool=pool, **args)
            except Exception:  # noqa: BLE001 - already gone
                pass
