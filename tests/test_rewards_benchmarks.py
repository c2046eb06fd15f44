"""Where benchmark files are read from: the packaged copies (checksum-verified on first read),
or a user's folder from ``data_dir`` / ``$OFFPOLICY_JAX_DATA``; and the errors of each.

The golds themselves (sizes, normalisations) are tested in tests/test_rewards_pool.py.
"""

import gzip
import hashlib
import json
import pathlib
import re

import pytest

from offpolicy_jax import rewards
from offpolicy_jax.rewards import benchmarks

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "offpolicy_jax" / "data" / "benchmarks"
AMC_ROW = {"id": 0, "problem": "p", "answer": 3.0}


@pytest.fixture
def fresh_verification(monkeypatch):
    """Forget which packaged files this process has already verified (restored afterwards)."""
    monkeypatch.setattr(benchmarks, "_VERIFIED", set())


def test_packaged_files_are_the_checksummed_ones():
    assert sorted(p.name for p in PACKAGED.glob("*.gz")) == sorted(
        f"{name}.gz" for name in benchmarks.SHA256)
    assert set(benchmarks._FILES.values()) == set(benchmarks.SHA256)
    for file_name, digest in benchmarks.SHA256.items():
        raw = (PACKAGED / f"{file_name}.gz").read_bytes()
        assert raw[4:8] == b"\0\0\0\0", f"{file_name}.gz: gzip header has a timestamp"
        assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == digest, file_name


def test_provenance_table_matches_the_code():
    text = (PACKAGED / "PROVENANCE.md").read_text()
    table = dict(re.findall(r"^\| `\w+` \| `([\w.]+)` \|.*\| `([0-9a-f]{64})` \|$", text, re.M))
    assert table == benchmarks.SHA256
    assert "MIT" in text


def test_packaged_data_is_used_without_env_or_data_dir(fresh_verification):
    assert benchmarks.default_data_dir() is None    # conftest removes $OFFPOLICY_JAX_DATA
    items = rewards.load_benchmark("amc23")
    assert len(items) == 40 and items[0]["gold"] == "27"
    resource = benchmarks.packaged_data_dir() / "amc23_test.jsonl.gz"
    assert pathlib.Path(str(resource)).resolve() == (PACKAGED / "amc23_test.jsonl.gz").resolve()
    assert benchmarks._VERIFIED == {str(resource)}


def test_env_overrides_packaged_and_data_dir_overrides_env(tmp_path, monkeypatch):
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    env_dir.mkdir()
    arg_dir.mkdir()
    (env_dir / "amc23_test.jsonl").write_text(json.dumps({**AMC_ROW, "answer": 5.0}) + "\n")
    (arg_dir / "amc23_test.jsonl").write_text(json.dumps({**AMC_ROW, "answer": 7.0}) + "\n")
    monkeypatch.setenv("OFFPOLICY_JAX_DATA", str(env_dir))
    assert [i["gold"] for i in rewards.load_benchmark("amc23")] == ["5"]
    assert [i["gold"] for i in rewards.load_benchmark("amc23", arg_dir)] == ["7"]
    assert [i["gold"] for i in rewards.load_benchmark("amc23", str(arg_dir))] == ["7"]


def test_user_folder_may_hold_gzipped_files(tmp_path):
    (tmp_path / "amc23_test.jsonl.gz").write_bytes(gzip.compress(
        (json.dumps(AMC_ROW) + "\n").encode()))
    assert rewards.load_benchmark("amc23", tmp_path) == [
        {"id": "amc23-0", "question": "p", "gold": "3"}]


def test_user_files_are_not_checksum_verified(tmp_path):
    """A user's copy may be a newer version: it is read as it is."""
    (tmp_path / "amc23_test.jsonl").write_text(json.dumps(AMC_ROW) + "\n")
    assert len(rewards.load_benchmark("amc23", tmp_path)) == 1


def test_unknown_benchmark_is_an_error():
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'; known: gsm8k_train, gsm8k"):
        rewards.load_benchmark("gsm9k")


def test_missing_user_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"benchmark 'math500': data folder {missing} (from --data_dir) does not exist")):
        rewards.load_benchmark("math500", missing)
    monkeypatch.setenv("OFFPOLICY_JAX_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"benchmark 'gsm8k': data folder {missing} (from $OFFPOLICY_JAX_DATA) does not exist")):
        rewards.load_benchmark("gsm8k")


def test_missing_file_in_user_folder_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPOLICY_JAX_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"benchmark 'aime24': file not found: {tmp_path / 'aime24_test.jsonl'}")):
        rewards.load_benchmark("aime24")


def test_checksum_mismatch_names_file_expected_and_got(fresh_verification, monkeypatch):
    actual = benchmarks.SHA256["aime24_test.jsonl"]
    monkeypatch.setitem(benchmarks.SHA256, "aime24_test.jsonl", "0" * 64)
    with pytest.raises(benchmarks.ChecksumError, match=re.escape(
            f"aime24_test.jsonl.gz fails its checksum: expected sha256 {'0' * 64} "
            f"(uncompressed), got {actual}")):
        rewards.load_benchmark("aime24")
    assert not benchmarks._VERIFIED


def test_corrupted_packaged_copy_is_refused(fresh_verification, monkeypatch, tmp_path):
    text = gzip.decompress((PACKAGED / "amc23_test.jsonl.gz").read_bytes())
    (tmp_path / "amc23_test.jsonl.gz").write_bytes(gzip.compress(text.replace(b"27.0", b"28.0")))
    monkeypatch.setattr(benchmarks, "packaged_data_dir", lambda: tmp_path)
    with pytest.raises(benchmarks.ChecksumError, match=re.escape(
            str(tmp_path / "amc23_test.jsonl.gz")) + ".*expected sha256 "
            + benchmarks.SHA256["amc23_test.jsonl"]):
        rewards.load_benchmark("amc23")
    with pytest.raises(FileNotFoundError, match="packaged file .*aime24_test.jsonl.gz is missing"):
        rewards.load_benchmark("aime24")
    (tmp_path / "math500_test.jsonl.gz").write_bytes(
        (PACKAGED / "math500_test.jsonl.gz").read_bytes()[:1000])    # truncated
    with pytest.raises(benchmarks.ChecksumError, match="math500_test.jsonl.gz is not a valid gzip"):
        rewards.load_benchmark("math500")


def test_verification_happens_once_per_process(fresh_verification, monkeypatch):
    rewards.load_benchmark("aime24")
    calls = []
    monkeypatch.setattr(benchmarks.hashlib, "sha256", lambda *a: calls.append(a))
    assert len(rewards.load_benchmark("aime24")) == 30
    assert calls == []
