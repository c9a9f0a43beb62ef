"""A file keystep writes is there whole or not at all (`write_atomic`): its readers glob finished files only."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.workspace import write_atomic


def test_write_atomic_writes_text_and_parquet_whole_and_leaves_no_temp_file(tmp_path):
    text = write_atomic(tmp_path / "a" / "summary.json", '{"ok": 1}\n')
    table = write_atomic(tmp_path / "b" / "part-0.parquet", pa.table({"x": [1, 2, 3]}))
    assert text.read_text() == '{"ok": 1}\n'
    assert pq.read_table(table).column("x").to_pylist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["part-0.parquet", "summary.json"]


def test_a_write_that_fails_leaves_the_previous_file_and_no_file_a_glob_finds(tmp_path):
    path = write_atomic(tmp_path / "results-0.parquet", pa.table({"x": [1]}))
    with pytest.raises(Exception):
        write_atomic(path, object())                       # not a table: the Parquet writer fails midway
    assert pq.read_table(path).column("x").to_pylist() == [1]
    assert [p.name for p in tmp_path.glob("results-*.parquet")] == ["results-0.parquet"]
