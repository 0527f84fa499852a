"""The compiled broker's C hash tables (``fastbackend/_keymap.pxi``), against a dict.

``ByteMap`` is the table the compiled core keeps its clients, agents and environments
in, and the same index finds its jobs by key; it must behave like the dict the
pure-Python core uses in its place, insertion order included (both cores walk their
peers in that order, and must send in the same order).  The smallest table has 16
slots and at most 8 entries, so random runs of inserts and deletes go through long
probe runs, wrap around the end of the array, shift entries back on deletion, and grow
and shrink the array.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

if os.environ.get("FASTBACKEND_NO_EXTENSIONS", "") not in ("", "0"):
    pytest.skip("the compiled core is not built in this run", allow_module_level=True)

from fastbackend._broker_c import ByteMap  # noqa: E402

# Few distinct keys (so that deletes and overwrites hit), of every length class around the
# hash's 8-byte blocks, empty and NUL bytes included.
KEYS = st.one_of(st.sampled_from([b"", b"\x00", b"\x00\x00", b"a" * 7, b"a" * 8, b"a" * 9, b"a" * 16]),
                 st.binary(max_size=3), st.binary(min_size=4, max_size=40))


class ByteMapAgainstDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.map = ByteMap()
        self.model: dict[bytes, int] = {}

    @rule(key=KEYS, value=st.integers(-(2**63), 2**63 - 1))
    def set(self, key: bytes, value: int) -> None:
        self.map[key] = value
        self.model[key] = value

    @rule(key=KEYS)
    def delete(self, key: bytes) -> None:
        if key in self.model:
            del self.map[key]
            del self.model[key]
        else:
            with pytest.raises(KeyError):
                del self.map[key]

    @rule(key=KEYS)
    def pop(self, key: bytes) -> None:
        assert self.map.pop(key, None) == self.model.pop(key, None)

    @rule(keys=st.lists(st.binary(min_size=1, max_size=12), min_size=20, max_size=200, unique=True))
    def burst(self, keys: list[bytes]) -> None:
        """Many keys at once, then most of them gone again: the array grows, then shrinks."""
        for i, key in enumerate(keys):
            self.map[key] = i
            self.model[key] = i
        for key in keys[: len(keys) * 7 // 8]:
            del self.map[key]
            del self.model[key]

    @rule(key=KEYS)
    def look_up(self, key: bytes) -> None:
        assert (key in self.map) == (key in self.model)
        assert self.map.get(key, -1) == self.model.get(key, -1)
        if key in self.model:
            assert self.map[key] == self.model[key]

    @invariant()
    def same_contents_in_insertion_order(self) -> None:
        assert len(self.map) == len(self.model)
        assert self.map.items() == list(self.model.items())
        assert list(self.map) == list(self.model)
        assert self.map.values() == list(self.model.values())
        assert self.map == self.model


TestByteMapAgainstDict = ByteMapAgainstDict.TestCase
TestByteMapAgainstDict.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


@given(st.lists(st.binary(max_size=20), unique=True, max_size=3000))
@settings(max_examples=30, deadline=None)
def test_every_key_is_found_after_growing_and_shrinking(keys: list[bytes]) -> None:
    table = ByteMap()
    for i, key in enumerate(keys):
        table[key] = i
    assert all(table[key] == i for i, key in enumerate(keys))
    for key in keys[::2]:
        del table[key]
    assert all(table.get(key) == (None if i % 2 == 0 else i) for i, key in enumerate(keys))
    assert len(table) == len(keys) // 2


def test_a_dict_like_face() -> None:
    table = ByteMap()
    table[b"a"] = 1
    assert table and table == {b"a": 1} and table != {b"a": 2} and repr(table) == "ByteMap({b'a': 1})"
    assert table.pop(b"a") == 1 and not table and table == {}
    with pytest.raises(KeyError):
        table.pop(b"a")
    with pytest.raises(KeyError):
        table[b"a"]
    assert table.get(b"a") is None and table.get(b"a", 7) == 7
