"""megatron_trillion.data.jsonl: the JSONL reader of tokenizer training and the consistency
evaluation; every mistake names its file and line."""

import gzip

import pytest

from megatron_trillion.data.jsonl import read_jsonl
from megatron_trillion.errors import UserError


def test_records_with_their_file_and_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n\n  \n[2, "é"]\n', encoding="utf-8")
    assert list(read_jsonl(str(path))) == [(f"{path}:1", {"x": 1}), (f"{path}:4", [2, "é"])]


def test_gzip_files_are_read_decompressed(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"one"\n"two"\n')
    assert [record for _, record in read_jsonl(str(path))] == ["one", "two"]


def test_bad_json_names_file_and_line_and_what_was_expected(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"x": 1}\n{"x": \n')
    with pytest.raises(UserError, match=r"b\.jsonl:2: not valid JSON \(.*\); expected logs$"):
        list(read_jsonl(str(path), "; expected logs"))


def test_invalid_utf8_names_its_own_line_far_into_the_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' * 5000 + b'{"text": "bad \xff"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:5001: invalid UTF-8 at byte 14$"):
        list(read_jsonl(str(path)))


def test_a_file_that_cannot_be_opened_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"missing\.jsonl: cannot open"):
        list(read_jsonl(str(tmp_path / "missing.jsonl")))
