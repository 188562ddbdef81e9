"""Rows carry their (file, row) address from the read; the stages get them back in source order."""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import row_order

pytestmark = pytest.mark.ray


def _files(tmp_path, sizes):
    paths = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"f{i}.parquet"
        pq.write_table(pa.table({"v": [f"{i}:{r}" for r in range(n)]}), path, row_group_size=2)
        paths.append(str(path))
    return paths


def test_read_addresses_every_row_and_the_sorted_stream_restores_source_order(ray_session, tmp_path):
    """Files listed out of name order keep the listed order; blocks shuffled after the read come back
    sorted; an empty file has no rows and rows_by_file says so."""
    paths = _files(tmp_path, [5, 0, 3])
    paths = [paths[2], paths[1], paths[0]]  # the list order is the file index, not the name
    ds = row_order.read_addressed(paths, functools.partial(row_order.read_parquet_columns, columns=["v"]))
    rows = ds.take_all()
    assert sorted((r["_file_index"], r["_row"], r["v"]) for r in rows) == (
        [(0, r, f"2:{r}") for r in range(3)] + [(2, r, f"0:{r}") for r in range(5)])
    shuffled = ds.random_shuffle(seed=3)
    streamed = [v for b in row_order.in_source_order(shuffled, batch_size=2) for v in b.column("v").to_pylist()]
    assert streamed == [f"2:{r}" for r in range(3)] + [f"0:{r}" for r in range(5)]
    by_file = row_order.rows_by_file(shuffled, num_files=3)
    assert len(by_file) == 3 and by_file[1] is None
    assert by_file[0].column("v").to_pylist() == [f"2:{r}" for r in range(3)]
    assert by_file[2].column("_row").to_pylist() == list(range(5))
    with pytest.raises(RuntimeError, match=r"unknown files \[2\]"):
        row_order.rows_by_file(shuffled, num_files=2)
    assert list(row_order.in_source_order(ds.filter(lambda r: False))) == []


def test_write_in_source_order_breaks_ties_and_drops_the_address(ray_session, tmp_path):
    """Copies sharing an address are ordered by the tie-break column; files hold at most
    rows_per_file rows; the address columns are not written."""
    import ray

    table = pa.table({"_file_index": [1, 0, 0, 1, 0], "_row": [0, 1, 0, 0, 1], "row_id": ["c", "b#1", "a", "c#1", "b"]})
    ds = ray.data.from_arrow([table.slice(0, 2), table.slice(2)])
    assert row_order.write_in_source_order(ds, tmp_path, rows_per_file=2, tie_break=("row_id",)) == 5
    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert [pq.read_table(p).num_rows for p in parts] == [2, 2, 1]
    written = pa.concat_tables([pq.read_table(p) for p in parts])
    assert written.column_names == ["row_id"]
    assert written.column("row_id").to_pylist() == ["a", "b", "b#1", "c", "c#1"]

