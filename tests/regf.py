"""A small writer of Windows registry hive files (REGF), for the tests.

The Windows tests need real SYSTEM, SOFTWARE and SAM hives and no Windows
installation can be had, so they are written here from the documented file
format: a 4096-byte base block (signature `regf`, sequence numbers, version
1.3, root cell offset, hive bins size, XOR checksum of its first 508 bytes),
then one hive bin (`hbin`) holding the cells: key nodes (`nk`), value keys
(`vk`), value lists, subkey index leaves (`lh`, with the name hash), one
security cell (`sk`) shared by every key, and data cells.  hivexget and
hivexsh read the result (the tests check that).

    hive = Key("ROOT", subkeys=[Key("Select", values=[dword("Current", 1)])])
    Path("SYSTEM").write_bytes(build_hive(hive))
"""

import struct
from dataclasses import dataclass, field

REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_MULTI_SZ = 7
REG_QWORD = 11

BASE_BLOCK_SIZE = 4096
HBIN_HEADER_SIZE = 32
NO_OFFSET = 0xFFFFFFFF
KEY_COMP_NAME = 0x0020
KEY_HIVE_ENTRY = 0x0004
KEY_NO_DELETE = 0x0008
VALUE_COMP_NAME = 0x0001
# A self-relative security descriptor with no owner, group or ACLs.
SECURITY_DESCRIPTOR = struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)


@dataclass
class Value:
    name: str
    type: int
    data: bytes


@dataclass
class Key:
    name: str
    values: list = field(default_factory=list)
    subkeys: list = field(default_factory=list)


def string(name, text, kind=REG_SZ):
    return Value(name, kind, (text + "\0").encode("utf-16-le"))


def dword(name, number):
    return Value(name, REG_DWORD, struct.pack("<I", number))


def binary(name, data):
    return Value(name, REG_BINARY, bytes(data))


def name_hash(name):
    """The `lh` hash of a key name."""
    value = 0
    for char in name.upper():
        value = (value * 37 + ord(char)) & 0xFFFFFFFF
    return value


def _encode_name(name):
    try:
        return name.encode("ascii"), True
    except UnicodeEncodeError:
        return name.encode("utf-16-le"), False


class _Cells:
    """Cells laid out one after the other from the start of the hive bins."""

    def __init__(self):
        self.data = bytearray()

    def allocate(self, payload_size):
        size = (payload_size + 4 + 7) & ~7
        offset = HBIN_HEADER_SIZE + len(self.data)
        self.data += struct.pack("<i", -size) + bytes(size - 4)
        return offset

    def put(self, offset, payload):
        start = offset - HBIN_HEADER_SIZE + 4
        self.data[start:start + len(payload)] = payload

    def add(self, payload):
        offset = self.allocate(len(payload))
        self.put(offset, payload)
        return offset


def _write_key(cells, key, parent, security, flags=KEY_COMP_NAME):
    name, compressed = _encode_name(key.name)
    nk_offset = cells.allocate(76 + len(name))
    value_offsets = []
    for value in key.values:
        value_name, value_compressed = _encode_name(value.name)
        if len(value.data) <= 4:
            data_size = len(value.data) | 0x80000000
            data_offset = struct.unpack("<I", value.data.ljust(4, b"\0"))[0]
        else:
            data_size = len(value.data)
            data_offset = cells.add(value.data)
        value_offsets.append(cells.add(
            b"vk" + struct.pack("<HIIIHH", len(value_name), data_size, data_offset, value.type,
                                VALUE_COMP_NAME if value_compressed else 0, 0) + value_name))
    values_list = cells.add(b"".join(struct.pack("<I", o) for o in value_offsets)) \
        if value_offsets else NO_OFFSET
    children = sorted(key.subkeys, key=lambda k: k.name.upper())
    child_offsets = [_write_key(cells, child, nk_offset, security) for child in children]
    if child_offsets:
        subkey_list = cells.add(b"lh" + struct.pack("<H", len(children)) + b"".join(
            struct.pack("<II", offset, name_hash(child.name))
            for offset, child in zip(child_offsets, children)))
    else:
        subkey_list = NO_OFFSET
    max_subkey_name = max((len(c.name) * 2 for c in children), default=0)
    max_value_name = max((len(v.name) * 2 for v in key.values), default=0)
    max_value_data = max((len(v.data) for v in key.values), default=0)
    cells.put(nk_offset, b"nk" + struct.pack(
        "<HQ15IHH",
        (flags & ~KEY_COMP_NAME) | (KEY_COMP_NAME if compressed else 0),
        0, 0, parent, len(children), 0, subkey_list, NO_OFFSET, len(key.values), values_list,
        security, NO_OFFSET, max_subkey_name, 0, max_value_name, max_value_data, 0,
        len(name), 0) + name)
    return nk_offset


def build_hive(root, file_name="snf-image-test"):
    """The bytes of a hive file whose root key is `root`."""
    cells = _Cells()
    security = cells.allocate(20 + len(SECURITY_DESCRIPTOR))
    cells.put(security, b"sk" + struct.pack("<HIIII", 0, security, security, 0,
                                            len(SECURITY_DESCRIPTOR)) + SECURITY_DESCRIPTOR)
    root_offset = _write_key(cells, root, NO_OFFSET, security,
                             KEY_COMP_NAME | KEY_HIVE_ENTRY | KEY_NO_DELETE)
    key_count = _count_keys(root)
    cells.put(security, b"sk" + struct.pack("<HIIII", 0, security, security, key_count,
                                            len(SECURITY_DESCRIPTOR)) + SECURITY_DESCRIPTOR)
    used = HBIN_HEADER_SIZE + len(cells.data)
    bin_size = (used + 4095) // 4096 * 4096
    free = bin_size - used
    body = bytes(cells.data)
    if free:
        body += struct.pack("<i", free) + bytes(free - 4)
    hbin = b"hbin" + struct.pack("<IIQQI", 0, bin_size, 0, 0, 0) + body
    base = bytearray(BASE_BLOCK_SIZE)
    struct.pack_into("<4sIIQIIIIIII", base, 0, b"regf", 1, 1, 0, 1, 3, 0, 1,
                     root_offset, bin_size, 1)
    name = file_name.encode("utf-16-le")[:64]
    base[48:48 + len(name)] = name
    checksum = 0
    for (word,) in struct.iter_unpack("<I", bytes(base[:508])):
        checksum ^= word
    if checksum == 0xFFFFFFFF:
        checksum = 0xFFFFFFFE
    elif checksum == 0:
        checksum = 1
    struct.pack_into("<I", base, 508, checksum)
    return bytes(base) + hbin


def _count_keys(key):
    return 1 + sum(_count_keys(child) for child in key.subkeys)
