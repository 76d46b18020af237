import pytest

from busagent.xmlsafe import UnsafeXML, check_xml

BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<domain>&lol2;</domain>"""
XXE = """<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain>&x;</domain>"""


def test_plain_xml_passes():
    check_xml("<domain type='test'><name>a</name><memory>1024</memory></domain>")


def test_malformed_is_left_to_libvirt():
    check_xml("<a><b></a>")
    check_xml("not xml")
    check_xml("<a>&undefined;</a>")


@pytest.mark.parametrize("text", [BOMB, XXE, "<a>" * 100 + "</a>" * 100,
                                  "<a>" + "x" * (2 << 20) + "</a>"])
def test_refused(text):
    with pytest.raises(UnsafeXML):
        check_xml(text)
