"""JSONL state that survives a crash, checked downloads, and seed-file validation."""
import hashlib
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfinstruct.seeds import SEED_SHA256, load_seed_tasks
from selfinstruct.store import append_jsonl, download, file_digests, read_jsonl


def test_torn_last_line_is_dropped_and_appends_continue(tmp_path):
    path = tmp_path / "state.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "b"')  # a crash in the middle of a write
    assert read_jsonl(path) == [{"a": 1}]
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="state.jsonl:2"):
        read_jsonl(path)


def test_line_separators_inside_strings_stay_in_their_record(tmp_path):
    path = tmp_path / "state.jsonl"
    rows = [{"text": "a\u2028b\u0085c\rd"}, {"text": "e"}]  # raw in the file: append_jsonl keeps non-ASCII as is
    for row in rows:
        append_jsonl(path, row)
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_jsonl(path) == rows
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "x\u2028y", "instances": [{"input": "", "output": "z"}], '
                     '"is_classification": false}\n', encoding="utf-8")
    assert load_seed_tasks(seeds)[0]["instruction"] == "x\u2028y"


def test_git_blob_id_matches_git(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"hello\nworld\n")
    digests = file_digests(path)
    assert digests["sha256"] == hashlib.sha256(b"hello\nworld\n").hexdigest()
    try:
        git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not available")
    assert digests["git_blob"] == git.strip()


class _Flaky(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.hits += 1
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        body = self.server.body if status == 200 else b""
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    httpd.hits, httpd.statuses, httpd.body = 0, [], b"payload\n"
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/f"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_retries_verifies_and_caches(tmp_path, flaky):
    sha = hashlib.sha256(b"payload\n").hexdigest()
    flaky.statuses = [429, 503]
    dest = download(flaky.url, tmp_path / "f", sha256=sha, backoff=0.01)
    assert dest.read_bytes() == b"payload\n" and flaky.hits == 3
    download(flaky.url, dest, sha256=sha)
    assert flaky.hits == 3  # verified cache: no request
    with pytest.raises(ValueError, match="checksum mismatch"):
        download(flaky.url, tmp_path / "g", sha256="0" * 64)
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.part").exists()
    flaky.statuses = [404]
    with pytest.raises(OSError, match="HTTP 404"):
        download(flaky.url, tmp_path / "h", sha256=sha)
    flaky.statuses = [500, 500]
    with pytest.raises(OSError, match="after 2 attempts"):
        download(flaky.url, tmp_path / "h", sha256=sha, retries=1, backoff=0.01)


def test_seed_files(tmp_path, shared_data):
    real = shared_data / "selfinstruct" / "seed_tasks.jsonl"
    assert file_digests(real)["sha256"] == SEED_SHA256
    tasks = load_seed_tasks(real)
    assert len(tasks) == 175 and sum(t["is_classification"] for t in tasks) == 26
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "x", "instances": [{"input": "", "output": "y"}]}\n')
    with pytest.raises(ValueError, match="seeds.jsonl:1: 'is_classification'"):
        load_seed_tasks(bad)
    with pytest.raises(FileNotFoundError, match="--seed-tasks"):
        load_seed_tasks(tmp_path / "none.jsonl")


def test_a_state_record_without_its_keys_names_file_line_and_key(tmp_path):
    path = tmp_path / "is_classification.jsonl"
    path.write_text('{"instruction": "a", "is_classification": true}\n{"instruction": "b"}\n')
    assert len(read_jsonl(path, ("instruction",))) == 2
    with pytest.raises(ValueError, match=r"is_classification.jsonl:2: state record lacks 'is_classification'"):
        read_jsonl(path, ("instruction", "is_classification"))


def test_a_broken_general_set_names_its_file_and_line(tmp_path):
    from selfinstruct.prepare import _records

    path = tmp_path / "alpaca_data.json"
    path.write_text('[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": ')
    with pytest.raises(ValueError, match=r"alpaca_data.json: invalid JSON at line 2"):
        _records(path)
    path.write_text('[{"instruction": "a", "input": "", "output": "b"}, 3]')
    with pytest.raises(ValueError, match=r"alpaca_data.json: record 1 lacks"):
        _records(path)
