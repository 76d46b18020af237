"""libvirt errors as data, with their constant names beside the numbers."""
from __future__ import annotations

import re
from typing import Any

import libvirt

from busagent.api.apixml import load_api

# libvirt quotes the offending line of a bad XML document in its message: mask the values of
# attributes that hold secrets (VNC/SPICE passwd, LUKS passphrases, keys) before they travel.
_SECRET_ATTR = re.compile(r"""\b(passwd|password|passphrase|secret|key)(\s*=\s*)(['"])(.*?)\3""", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with the values of secret-holding XML attributes replaced by ``***``."""
    return _SECRET_ATTR.sub(lambda m: f"{m[1]}{m[2]}{m[3]}***{m[3]}", text) if "=" in text else text


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
        "message": mask_secrets(err.get_error_message() or str(err)),
    }
    for key in ("str1", "str2", "str3", "int1", "int2"):
        value = getattr(err, f"get_{key}")()
        if value not in (None, -1, ""):
            data[key] = mask_secrets(value) if isinstance(value, str) else value
    return data
