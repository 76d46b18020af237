"""libvirt errors as data, with their constant names beside the numbers."""
from __future__ import annotations

from typing import Any

import libvirt

from busagent.api.apixml import load_api


def libvirt_error_data(err: libvirt.libvirtError) -> dict[str, Any]:
    """Every field of a libvirt error (code, domain, level and their names, message, extras)."""
    api = load_api()
    code, domain, level = err.get_error_code(), err.get_error_domain(), err.get_error_level()
    data: dict[str, Any] = {
        "kind": "libvirt",
        "code": code,
        "code_name": api.enum_name("virErrorNumber", code) if code is not None else None,
        "domain": domain,
        "domain_name": api.enum_name("virErrorDomain", domain) if domain is not None else None,
        "level": level,
        "level_name": api.enum_name("virErrorLevel", level) if level is not None else None,
        "message": err.get_error_message() or str(err),
    }
    for key in ("str1", "str2", "str3", "int1", "int2"):
        value = getattr(err, f"get_{key}")()
        if value not in (None, -1, ""):
            data[key] = value
    return data
