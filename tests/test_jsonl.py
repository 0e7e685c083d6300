"""jsonl.py: records split on "\\n" only, errors naming file:line, a torn last line dropped only when asked."""
import json
import subprocess
import sys

import pytest

from jsonl import parse_jsonl, read_jsonl
from tests.conftest import ROOT


def test_reads_objects_with_line_numbers_skipping_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\r\n{"a": 3}', encoding="utf-8")  # CRLF and no final newline are fine
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]
    assert list(parse_jsonl(path.read_text(encoding="utf-8"), path)) == read_jsonl(path)


def test_line_separators_inside_strings_stay_in_their_record(tmp_path):
    rows = [{"text": "a\u2028b\u0085c\u2029d\x1ce\x0bf"}, {"text": "g"}]  # all of them line breaks to str.splitlines
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert [r for _, r in read_jsonl(path)] == rows


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("\n \n")
    assert read_jsonl(tmp_path / "e.jsonl") == [] and read_jsonl(tmp_path / "b.jsonl") == []
    assert read_jsonl(tmp_path / "e.jsonl", drop_torn_tail=True) == []
    with pytest.raises(FileNotFoundError, match=r"no JSONL file at .*missing\.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("content, match", [
    ('{"a": 1}\n{"a": 2,}\n{"a": 3}\n', r"bad\.jsonl:2: invalid JSON \(.*column 9\)"),
    ('{"a": 1}\n\n[1, 2]\n', r"bad\.jsonl:3: expected a JSON object, got list"),
    ('"text"\n', r"bad\.jsonl:1: expected a JSON object, got str"),
])
def test_bad_lines_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_jsonl(path)
    with pytest.raises(ValueError, match=match):
        list(parse_jsonl(content, path))


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')  # latin-1
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8"):
        read_jsonl(path)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')  # a byte-order mark
    assert read_jsonl(path) == [(1, {"a": 1})]


def test_torn_last_line_dropped_only_when_asked(tmp_path):
    path = tmp_path / "state.jsonl"
    whole = '{"a": 1}\n{"text": "x\u2028y"}\n'
    path.write_text(whole + '{"a": 3, "b', encoding="utf-8")  # a crash in the middle of a write
    with pytest.raises(ValueError, match=r"state\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    assert path.read_text(encoding="utf-8").endswith('"b')  # reading alone leaves the file as it was
    assert read_jsonl(path, drop_torn_tail=True) == [(1, {"a": 1}), (2, {"text": "x\u2028y"})]
    assert path.read_text(encoding="utf-8") == whole  # cut from the file: the next append starts on its own line
    assert read_jsonl(path, drop_torn_tail=True) == read_jsonl(path)
    path.write_text('{"a": 1}', encoding="utf-8")  # a single line, unfinished
    assert read_jsonl(path, drop_torn_tail=True) == [] and path.read_bytes() == b""


def test_only_the_last_line_counts_as_torn(tmp_path):
    path = tmp_path / "state.jsonl"
    content = '{"a": 1}\n{"a": 2, "b\n{"a": 3}\n'
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"state\.jsonl:2: invalid JSON"):
        read_jsonl(path, drop_torn_tail=True)
    path.write_text(content + "{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"state\.jsonl:2: invalid JSON"):
        read_jsonl(path, drop_torn_tail=True)
    path.write_text('{"a": 1}\n{"a": 2, "b\n', encoding="utf-8")  # ends with its newline: broken, not torn
    with pytest.raises(ValueError, match=r"state\.jsonl:2: invalid JSON"):
        read_jsonl(path, drop_torn_tail=True)
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"a": 2, "b\n'


def test_no_torch_needed():
    # scrape/ and selfinstruct/ read JSONL through this module and must run without torch
    code = "import sys, jsonl, scrape.corpus, selfinstruct.seeds, selfinstruct.store; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_writers_round_trip_and_leave_no_temporary_file(tmp_path):
    from jsonl import write_json, write_jsonl
    records = [{"text": "raw \u2028 inside", "n": 1}, {"text": "ünïcode", "n": 2}]
    assert write_jsonl(tmp_path / "a.jsonl", records) == tmp_path / "a.jsonl"
    assert [r for _, r in read_jsonl(tmp_path / "a.jsonl")] == records
    write_jsonl(tmp_path / "b.jsonl", records, ensure_ascii=True)
    assert (tmp_path / "b.jsonl").read_bytes().isascii()
    write_json(tmp_path / "c.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    from jsonl import write_jsonl

    def records():
        yield {"a": 1}
        raise RuntimeError("crash mid-write")
    path = write_jsonl(tmp_path / "a.jsonl", [{"old": True}])
    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert [r for _, r in read_jsonl(path)] == [{"old": True}]
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
