"""Rows that carry their address: read files with each row's (file, row), get them back in source order.

Ray Data does not promise row order through an actor pool or a write, even with `preserve_order`:
the reference stage once came back with rows swapped under load, and the data stage's output order
is the train stage's step order (step s is a function of row order).  So order is never trusted,
it is carried:

  [1] `read_addressed` reads files and gives every row `_file_index` (the position of its file in
      the list read) and `_row` (its 0-based position among the rows read from that file);
  [2] `in_source_order` sorts on that address with Ray Data's distributed sort and streams the
      sorted batches to the driver, checking the order as they arrive;
  [3] the data stage writes those batches as they come (`write_in_source_order`); the reference
      stage puts each file's values back on that file's rows (`rows_by_file` + `put_back`), where a
      file whose rows did not all come back exactly once is an error, never a misalignment.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

FILE_INDEX, ROW = "_file_index", "_row"
ADDRESS_COLUMNS = (FILE_INDEX, ROW)


# [1] The read ------------------------------------------------------------------------------------


def read_addressed(paths: Sequence[str], read_file: Callable[[Any, str], Iterator[Any]], *, filesystem=None):
    """A Ray Dataset of the rows of `paths`, each with its ADDRESS_COLUMNS (file index = position in `paths`).

    `read_file(stream, path)` yields the file's rows as pyarrow Tables in file order; a module-level
    function (or functools.partial of one) so Ray can ship it to the readers.  `filesystem`: a
    pyarrow/fsspec filesystem for non-local paths.
    """
    import ray.data

    datasource = _addressed_files_class()(list(paths), read_file=read_file, filesystem=filesystem)
    return ray.data.read_datasource(datasource)


def read_parquet_columns(stream, path: str, *, columns: Optional[Sequence[str]] = None) -> Iterator[Any]:
    """`read_file` for parquet: the record batches of `columns` (None: all), in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(pa.BufferReader(stream.read())).iter_batches(columns=columns):
        yield pa.Table.from_batches([batch])


@functools.cache
def _addressed_files_class():
    # Built on first use so a stage's `--help` does not import Ray; cloudpickle ships the class.
    import pyarrow as pa
    from ray.data.datasource import FileBasedDatasource

    class AddressedFiles(FileBasedDatasource):
        """The rows `read_file` yields plus each row's (file index, row)."""

        def __init__(self, paths: list[str], *, read_file, **kwargs):
            super().__init__(paths, **kwargs)
            # reversed: a spelling shared by two paths names the first
            self._index = {key: i for i, p in reversed(list(enumerate(paths))) for key in _path_keys(p)}
            self._unknown = len(paths)  # a path the filesystem reports differently: sorts after every file
            self._read_file = read_file

        def _read_stream(self, f, path: str):
            index = next((self._index[k] for k in _path_keys(path) if k in self._index), self._unknown)
            offset = 0
            for table in self._read_file(f, path):
                n = table.num_rows
                yield table.append_column(FILE_INDEX, pa.array([index] * n, pa.int64())).append_column(
                    ROW, pa.array(range(offset, offset + n), pa.int64()))
                offset += n

    return AddressedFiles


def _path_keys(path: str) -> list[str]:
    """The spellings one file may be reported under: as given, without file://, resolved."""
    bare = path.removeprefix("file://")
    keys = [path, bare, os.path.normpath(bare)]
    if os.path.isabs(bare):
        keys.append(str(Path(bare).resolve()))
    return keys


# [2] Back in source order -------------------------------------------------------------------------


def in_source_order(ds, *, tie_break: Sequence[str] = (), batch_size: Optional[int] = None) -> Iterator[Any]:
    """The rows of `ds` as pyarrow batches sorted by (ADDRESS_COLUMNS, *tie_break), checked on arrival
    (a RuntimeError if the sort did not hold).  `tie_break` orders rows that share an address (the data
    stage's resampled copies, by row_id)."""
    ds = ds.materialize()
    if ds.count() == 0:
        return
    keys, last = [*ADDRESS_COLUMNS, *tie_break], None
    for batch in ds.sort(keys).iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        if batch.num_rows == 0:
            continue
        order = list(zip(*(batch.column(k).to_pylist() for k in keys)))
        for a, b in zip([last] + order, order):
            if a is not None and b < a:
                raise RuntimeError(f"rows sorted by address came back out of order: {b} after {a}")
        last = order[-1]
        yield batch


def write_in_source_order(ds, directory: Path, *, rows_per_file: int, tie_break: Sequence[str] = ()) -> int:
    """Write `ds` in source order as directory/part-NNNNN.parquet (at most `rows_per_file` rows
    each, without the address columns), streamed by the driver; return the number of rows."""
    import pyarrow.parquet as pq

    rows = 0
    for index, batch in enumerate(in_source_order(ds, tie_break=tie_break, batch_size=rows_per_file)):
        pq.write_table(batch.drop_columns(list(ADDRESS_COLUMNS)), Path(directory) / f"part-{index:05d}.parquet")
        rows += batch.num_rows
    return rows


def rows_by_file(ds, num_files: int) -> list[Any]:
    """[the rows of file i in row order, or None when none came back, for i in range(num_files)]: the
    reference stage's few values per row, all on the driver; a RuntimeError for an unknown file index."""
    import pyarrow as pa
    import pyarrow.compute as pc

    batches = list(in_source_order(ds))
    if not batches:
        return [None] * num_files
    table = pa.concat_tables(batches)
    found = set(pc.unique(table.column(FILE_INDEX)).to_pylist())
    unknown = sorted(found - set(range(num_files)))
    if unknown:
        raise RuntimeError(f"rows came back from unknown files {unknown}")
    return [table.filter(pc.equal(table.column(FILE_INDEX), i)) if i in found else None for i in range(num_files)]


def put_back(table, values, *, columns: Mapping[str, Any], source: str, what: str = "values"):
    """`table` (a source file's rows) with `columns` (name -> pyarrow type) of `values` (that file's
    rows_by_file entry: ROW and `columns`, sorted by ROW, or None) appended.  A row without a value,
    or with two, is a RuntimeError naming `source` and `what`, never a silent misalignment."""
    import pyarrow as pa

    rows = [] if values is None else values.column(ROW).to_pylist()
    if rows != list(range(table.num_rows)):
        raise RuntimeError(f"{source} has {table.num_rows} rows but {len(rows)} {what} came back for it "
                           "(missing or repeated rows)")
    for name, kind in columns.items():
        column = pa.array([], kind) if values is None else values.column(name).cast(kind)
        table = table.append_column(name, column)
    return table
