"""Socket.IO packets' JSON (gateway.app.SafeJson): orjson where it reads and writes
what the json module would, the json module for everything else; and the packets'
check for binary data (gateway.app.CheckedPacket), as python-socketio's."""

from __future__ import annotations

import json
from typing import Any

import pytest
from socketio import packet

from gateway.app import CheckedPacket, SafeJson

DOCUMENTS = [
    '["chat",{"room":"lobby","text":"hello"}]',
    '["join",{"room":"é 🎉","history":5}]',
    '{"a":[1,-2,3.5,1e300,true,false,null],"b":{}}',
    '"\\u00e9\\n"',
    '["chat",{"room":"lobby","text":"\\ud800"}]',  # a lone surrogate: json reads it
    "[123456789012345678901234567890]",  # past 64 bits: exact, as json reads it
    "[9223372036854775807,-9223372036854775808]",
    "[NaN,Infinity,-Infinity]",  # not JSON, but json reads it
    '{"a":1,"a":2}',
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_a_document_reads_as_json_reads_it(text: str) -> None:
    ours, theirs = SafeJson.loads(text), json.loads(text)
    assert repr(ours) == repr(theirs)  # types too: an int stays an int
    assert SafeJson.loads(text.encode()) == ours or ours != ours  # NaN is not itself


@pytest.mark.parametrize("text", ["", "[", "[1,]", "{'a':1}", "[1] x", "nul"])
def test_bad_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        SafeJson.loads(text)


def test_a_document_nested_too_deep_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        SafeJson.loads("[" * 100_000 + "]" * 100_000)


VALUES: list[Any] = [
    ["chat", {"room": "lobby", "text": "hello", "from": "x", "id": "ab", "ts": 1}],
    {"ok": False, "error": "room must be valid Unicode text (\ud800)"},
    {1: "a non-str key"},
    [2**70, -(2**70)],
    {"text": "é 🎉"},
    [1.5, None, True],
]


@pytest.mark.parametrize("value", VALUES)
def test_what_is_written_reads_back_as_json_wrote_it(value: Any) -> None:
    ours = SafeJson.dumps(value, separators=(",", ":"))
    assert json.loads(ours) == json.loads(json.dumps(value, separators=(",", ":")))
    assert ", " not in ours and '": ' not in ours  # compact, as python-socketio asks


def test_other_options_are_json_s() -> None:
    assert SafeJson.dumps({"b": 1, "a": 2}, sort_keys=True, indent=1) == \
        json.dumps({"b": 1, "a": 2}, sort_keys=True, indent=1)


@pytest.mark.parametrize("data", [
    ["chat", {"room": "r", "text": "t", "ts": 1, "ok": True, "f": 1.5, "n": None}],
    None, 1, "s", b"x", bytearray(b"x"), [1, [2, {"a": b"x"}]], {"a": [1, {"b": bytearray()}]},
    (b"x",), [(b"x",)], {"k": {"j": []}}, [True, 1.5, None, "s", b""], [[[[]]]],
])
def test_binary_data_is_found_as_python_socketio_finds_it(data: Any) -> None:
    assert CheckedPacket.data_is_binary(data) == packet.Packet.data_is_binary(data)
