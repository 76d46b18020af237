"""Storage pools and volumes end to end through the bus (a ``dir`` pool in a temporary directory)."""
from __future__ import annotations

import pytest
from lxml import etree

from busagent.client import LibvirtError


@pytest.fixture
def pool(client, cleanup, uniq, tmp_path):
    """A defined, built and started dir pool: its reference (by name)."""
    name = uniq("pool")
    xml = f"<pool type='dir'><name>{name}</name><target><path>{tmp_path}</path></target></pool>"
    ref = client.call("virStoragePoolDefineXML", xml=xml)
    cleanup.add("virStoragePoolUndefine", pool={"name": name})
    cleanup.add("virStoragePoolDestroy", pool={"name": name})
    assert ref["name"] == name
    assert client.call("virStoragePoolBuild", pool={"name": name}) == 0
    assert client.call("virStoragePoolCreate", pool={"name": name}) == 0
    return {"name": name}


def vol_xml(name: str, mib: int = 10) -> str:
    return f"<volume><name>{name}</name><capacity unit='MiB'>{mib}</capacity></volume>"


def test_pool_lifecycle(client, cleanup, uniq, tmp_path):
    name = uniq("pool")
    xml = f"<pool type='dir'><name>{name}</name><target><path>{tmp_path}</path></target></pool>"
    ref = client.call("virStoragePoolDefineXML", xml=xml)
    cleanup.add("virStoragePoolUndefine", pool={"name": name})
    cleanup.add("virStoragePoolDestroy", pool={"name": name})
    assert client.call("virStoragePoolIsActive", pool=ref) == 0
    assert client.call("virStoragePoolIsPersistent", pool=ref) == 1
    assert client.call("virStoragePoolGetInfo", pool=ref)["state_name"] == "VIR_STORAGE_POOL_INACTIVE"
    assert name in client.call("virConnectListDefinedStoragePools")

    assert client.call("virStoragePoolBuild", pool=ref) == 0
    assert client.call("virStoragePoolCreate", pool=ref) == 0
    assert client.call("virStoragePoolRefresh", pool=ref) == 0
    info = client.call("virStoragePoolGetInfo", pool={"uuid": ref["uuid"]})
    assert info["state_name"] == "VIR_STORAGE_POOL_RUNNING" and info["state"] == 2
    assert info["capacity"] > 0 and info["capacity"] >= info["allocation"]
    assert name in client.call("virConnectListStoragePools")
    active = client.call("virConnectListAllStoragePools", flags=["VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE",
                                                                  "VIR_CONNECT_LIST_STORAGE_POOLS_DIR"])
    assert ref in active

    doc = etree.fromstring(client.call("virStoragePoolGetXMLDesc", pool=ref).encode())
    assert doc.findtext("name") == name and doc.findtext("target/path") == str(tmp_path)
    with pytest.raises(LibvirtError) as exc:  # not in the test driver
        client.call("virStoragePoolLookupByTargetPath", path=str(tmp_path))
    assert exc.value.code_name == "VIR_ERR_NO_SUPPORT"
    assert client.call("virStoragePoolLookupByUUIDString", uuidstr=ref["uuid"]) == ref
    assert client.call("virStoragePoolGetUUIDString", pool={"name": name}) == ref["uuid"]

    assert client.call("virStoragePoolSetAutostart", pool=ref, autostart=1) == 0
    assert client.call("virStoragePoolGetAutostart", pool=ref) == 1

    assert client.call("virStoragePoolDestroy", pool=ref) == 0
    assert client.call("virStoragePoolGetInfo", pool=ref)["state_name"] == "VIR_STORAGE_POOL_INACTIVE"
    assert client.call("virStoragePoolUndefine", pool=ref) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virStoragePoolLookupByName", name=name)
    assert exc.value.code_name == "VIR_ERR_NO_STORAGE_POOL"


def test_volume_create_lookup_info_delete(client, pool, tmp_path):
    vol = client.call("virStorageVolCreateXML", pool=pool, xmlDesc=vol_xml("disk1.img", 10))
    assert vol["name"] == "disk1.img" and vol["key"]

    path = client.call("virStorageVolGetPath", vol=vol)
    assert path == str(tmp_path / "disk1.img")
    by_key = client.call("virStorageVolLookupByKey", key=vol["key"])
    by_path = client.call("virStorageVolLookupByPath", path=path)
    by_name = client.call("virStorageVolLookupByName", pool=pool, name="disk1.img")
    assert by_key == by_path == by_name == vol

    # the three ways of naming a volume in a request
    for ref in ({"key": vol["key"]}, {"path": path}, {"pool": pool, "name": "disk1.img"}):
        info = client.call("virStorageVolGetInfo", vol=ref)
        assert info["capacity"] == 10 * 1024 * 1024
        assert info["type_name"] == "VIR_STORAGE_VOL_FILE" and info["type"] == 0

    assert client.call("virStorageVolGetName", vol=vol) == "disk1.img"
    assert client.call("virStorageVolGetKey", vol={"path": path}) == vol["key"]
    doc = etree.fromstring(client.call("virStorageVolGetXMLDesc", vol=vol).encode())
    assert doc.findtext("name") == "disk1.img" and doc.findtext("target/path") == path
    assert client.call("virStoragePoolLookupByVolume", vol=vol)["name"] == pool["name"]
    assert client.call("virStoragePoolNumOfVolumes", pool=pool) == 1
    assert client.call("virStoragePoolListVolumes", pool=pool) == ["disk1.img"]
    assert client.call("virStoragePoolListAllVolumes", pool=pool) == [vol]

    assert client.call("virStorageVolDelete", vol=vol) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virStorageVolLookupByKey", key=vol["key"])
    assert exc.value.code_name == "VIR_ERR_NO_STORAGE_VOL"
    assert client.call("virStoragePoolListAllVolumes", pool=pool) == []


def test_volume_clone(client, pool):
    src = client.call("virStorageVolCreateXML", pool=pool, xmlDesc=vol_xml("base.img", 20))
    clone = client.call("virStorageVolCreateXMLFrom", pool=pool, xmlDesc=vol_xml("clone.img", 20),
                        clonevol={"pool": pool, "name": "base.img"})
    assert clone["name"] == "clone.img" and clone["key"] != src["key"]
    assert client.call("virStorageVolGetInfo", vol=clone)["capacity"] == 20 * 1024 * 1024
    names = sorted(v["name"] for v in client.call("virStoragePoolListAllVolumes", pool=pool))
    assert names == ["base.img", "clone.img"]
    # a clone of a volume that does not exist: the reference fails to resolve, as libvirt says
    with pytest.raises(LibvirtError) as exc:
        client.call("virStorageVolCreateXMLFrom", pool=pool, xmlDesc=vol_xml("c2.img"),
                    clonevol={"pool": pool, "name": "missing.img"})
    assert exc.value.code_name == "VIR_ERR_NO_STORAGE_VOL"
    for v in (clone, src):
        assert client.call("virStorageVolDelete", vol={"key": v["key"]}) == 0


def test_volume_calls_the_test_driver_lacks(client, pool):
    vol = client.call("virStorageVolCreateXML", pool=pool, xmlDesc=vol_xml("w.img"))
    for method, extra in (("virStorageVolWipe", {}), ("virStorageVolResize", {"capacity": 20 << 20})):
        with pytest.raises(LibvirtError) as exc:
            client.call(method, vol=vol, **extra)
        assert exc.value.code_name == "VIR_ERR_NO_SUPPORT", method
    assert client.call("virStorageVolDelete", vol=vol) == 0


def test_stock_pool_through_proxy(host):
    pool = host.storage_pool(name="default-pool")
    assert pool.isActive() == 1
    assert pool.getInfo()["state_name"] == "VIR_STORAGE_POOL_RUNNING"
    assert etree.fromstring(pool.getXMLDesc().encode()).findtext("name") == "default-pool"
