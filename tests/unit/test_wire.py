import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qmpfd.api import wire
from qmpfd.errors import InvalidRequest, NotFound, QmpfdError


def split(chunks: list[bytes], limit: int = 1000) -> list[object]:
    s = wire.JsonSplitter(limit)
    out: list[object] = []
    for c in chunks:
        out += s.feed(c)
    return out


def test_back_to_back_objects_without_newlines() -> None:
    # qemu.qmp sends compact objects with no newline; each must come out whole.
    assert split([b'{"a":1}{"b":{"c":[1,2]}}']) == [b'{"a":1}', b'{"b":{"c":[1,2]}}']


def test_object_split_across_reads_and_braces_inside_strings() -> None:
    assert split([b'{"a":"}{\\"', b'x"}', b'\n']) == [b'{"a":"}{\\"x"}']


def test_newline_ends_a_malformed_line() -> None:
    out = split([b'{"execute": "x"\n', b'{"ok":1}\n'])
    assert out == [b'{"execute": "x"\n', b'{"ok":1}']
    with pytest.raises(wire.FrameError):
        wire.parse_request(out[0])  # type: ignore[arg-type]


def test_garbage_line_and_blank_lines() -> None:
    assert split([b"\n\n  hello world\n"]) == [b"  hello world\n"]


def test_oversized_is_reported_once_and_skipped_to_newline() -> None:
    out = split([b'{"a":"' + b"x" * 50, b"x" * 50 + b'"}\n{"b":2}'], limit=40)
    assert out == [wire.OVERSIZED, b'{"b":2}']


def test_check_request_envelope() -> None:
    assert wire.check_request({"execute": "x", "arguments": {"a": 1}, "id": 3}) == ("x",
                                                                                  {"a": 1})
    with pytest.raises(InvalidRequest, match="execute"):
        wire.check_request({"arguments": {}})
    with pytest.raises(InvalidRequest, match="arguments"):
        wire.check_request({"execute": "x", "arguments": [1]})
    with pytest.raises(InvalidRequest, match="bogus"):
        wire.check_request({"execute": "x", "bogus": 1})


def test_replies_echo_id_only_when_given() -> None:
    assert wire.return_reply(5, {"execute": "x"}) == {"return": 5}
    assert wire.return_reply(5, {"execute": "x", "id": None}) == {"return": 5, "id": None}
    err = wire.reply_for_error(NotFound("vm: gone"), {"execute": "x", "id": [1]})
    assert err == {"error": {"class": "NotFound", "desc": "vm: gone"}, "id": [1]}


def test_event_and_greeting_shapes() -> None:
    ev = wire.event("SLOT_ATTACHED", {"vm": "a"}, now=12.5)
    assert ev == {"event": "SLOT_ATTACHED", "data": {"vm": "a"},
                  "timestamp": {"seconds": 12, "microseconds": 500000}}
    g = wire.greeting()
    # QEMU's shape (contract v1.2): qemu.qmp's Greeting model and qmp-shell's banner read it.
    assert set(g["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    assert g["QMP"]["version"]["package"].startswith("qmpfd ")
    assert g["QMP"]["capabilities"] == []
    assert json.loads(wire.encode(g)) == g and wire.encode(g).endswith(b"\n")


def test_nesting_beyond_the_limit_is_named_and_the_stream_goes_on() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    msg = b'{"execute":"device-attach","arguments":{"vm":"a","functions":[{"id":"x",' \
          b'"properties":{"p":' + deep + b'}}]}}'
    s = wire.JsonSplitter(10_000_000)
    out = s.feed(msg + b'{"execute":"query-version"}')
    assert isinstance(out[0], wire.TooDeep)
    assert out[0].path() == "functions[0].properties.p" + "[0]" * (wire.MAX_DEPTH - 5)
    assert out[1] == b'{"execute":"query-version"}'      # the next request is intact


def test_nesting_within_the_limit_passes_and_strings_do_not_count() -> None:
    ok = b'{"execute":"x","arguments":{"a":' + b"[" * 20 + b'"[[[[{{{{"' + b"]" * 20 + b"}}"
    assert wire.JsonSplitter(10_000).feed(ok) == [ok]


def test_nul_bytes_are_found_with_their_path() -> None:
    assert wire.find_nul({"vm": "a", "functions": [{"id": "x\0y"}]}) == "functions[0].id"
    assert wire.find_nul({"qmp": "/run/a\0"}) == "qmp"
    assert wire.find_nul({"properties": {"k\0": 1}}) == "properties.k\\0"
    assert wire.find_nul({"vm": "a", "n": [1, 2]}) is None


def test_qmp_capabilities_refuses_what_it_does_not_offer_as_qemu_does() -> None:
    wire.check_capabilities({})
    wire.check_capabilities({"enable": []})
    with pytest.raises(QmpfdError, match="Capability 'oob' not available"):
        wire.check_capabilities({"enable": ["oob"]})
    with pytest.raises(QmpfdError, match=r"Parameter 'enable\[0\]' does not accept value 'x'"):
        wire.check_capabilities({"enable": ["x"]})
    with pytest.raises(QmpfdError, match="Parameter 'bogus' is unexpected"):
        wire.check_capabilities({"bogus": 1})


def test_greeting_parses_with_qemu_qmps_own_model() -> None:
    from qemu.qmp.models import Greeting

    Greeting(wire.greeting())      # raises on a shape qemu.qmp does not accept


class _ByteScanner(wire.JsonSplitter):
    """The splitter without its fast path: the reference the fast path must agree with."""

    def _idle(self) -> bool:
        return False


_PIECES = [b'{"execute":"query-vms"}', b'{"execute": "x", "arguments": {"a": [1, {"b": "}"}]}}',
           b"\n", b"  ", b'{"s":"a\\"b\\\\"}', b"garbage", b"]", b"{", b'"', b"[[[[", b"}}}}",
           b'{"x":"\xc3\xa9"}', b"[1,2]", b"{" * 40 + b"}" * 40, b'{"big":"' + b"y" * 300 + b'"}',
           b'{"nl":"a\nb"}', b"\r\n", b"{}{}"]


@settings(max_examples=400, deadline=None)
@example([b"  ", b"}}}}"], [2])      # blanks alone in a read: kept for the next message
@given(st.lists(st.sampled_from(_PIECES), max_size=12), st.lists(st.integers(1, 64),
                                                                max_size=8))
def test_the_fast_path_cuts_exactly_as_the_byte_scanner(pieces: list[bytes],
                                                       cuts: list[int]) -> None:
    stream = b"".join(pieces)
    chunks, at = [], 0
    for size in cuts:
        chunks.append(stream[at:at + size])
        at += size
    chunks.append(stream[at:])

    def run(splitter: wire.JsonSplitter) -> list[object]:
        got: list[object] = []
        for chunk in chunks:
            for m in splitter.feed(chunk):
                got.append(m.prefix if isinstance(m, wire.TooDeep) else m)
        return got
    assert run(wire.JsonSplitter(200)) == run(_ByteScanner(200))


@pytest.mark.parametrize("doc", [
    {"vm": "a", "functions": [{"id": "x\0y"}]},
    {"properties": {"k\0": 1}},
    {"qmp": "\0"},
])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_every_request_holding_a_nul_is_walked(doc: dict[str, object], encoding: str) -> None:
    """The byte check only ever skips requests without a NUL: every way JSON text can carry
    one (the escape, in any encoding the parser reads) is caught by it."""
    line = json.dumps(doc).encode(encoding)
    assert wire.find_nul(json.loads(line)) is not None
    assert wire.may_hold_nul(line)


def test_a_plain_request_is_not_walked() -> None:
    assert not wire.may_hold_nul(json.dumps({"vm": "a", "ids": ["b"], "x": "u0000"}).encode())
    assert wire.may_hold_nul(b'{"vm": "a\\\\u0000"}')   # an escaped backslash: walked, no NUL
    assert wire.find_nul(json.loads(b'{"vm": "a\\\\u0000"}')) is None


@given(st.dictionaries(st.text(), st.recursive(
    st.text() | st.integers(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=8)), st.booleans())
def test_the_byte_check_never_skips_a_nul(doc: dict[str, object], ascii_only: bool) -> None:
    line = json.dumps(doc, ensure_ascii=ascii_only).encode()
    if wire.find_nul(doc) is not None:
        assert wire.may_hold_nul(line)


def test_a_request_the_decoder_cut_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: a whole request cut by the JSON decoder carries its value, so parse_request
    decodes nothing; one cut by the byte scanner (split across reads) is parsed once."""
    parsed: list[bytes] = []
    real = json.loads
    monkeypatch.setattr(wire.json, "loads", lambda b, **k: parsed.append(b) or real(b, **k))
    s = wire.JsonSplitter(10_000)
    whole = s.feed(b'{"execute":"query-version","id":1} {"execute":"x"')
    assert whole == [b'{"execute":"query-version","id":1}']
    assert wire.parse_request(whole[0]) == {"execute": "query-version", "id": 1}
    assert parsed == []
    rest = s.feed(b"}")
    assert rest == [b' {"execute":"x"}'] and wire.parse_request(rest[0]) == {"execute": "x"}
    assert parsed == [b' {"execute":"x"}']
