"""The score table (raymimic.score_table): schema, file names, writer, readers, row count, score-only output."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymimic import score_table as st


def _rows(uids, step, epoch=0, rank=0, batch_size=4, **controls) -> dict:
    n = len(uids)
    rows = {"uid": list(uids), "step": np.full(n, step, np.int64), "epoch": np.full(n, epoch, np.int32), "rank": np.full(n, rank, np.int32),
            "score": np.linspace(-1, 1, n).astype(np.float32), "weight": np.full(n, 1 / n, np.float32),
            "batch_size": np.full(n, batch_size, np.int32)}
    rows.update({k: np.asarray(v, np.float32) for k, v in controls.items()})
    return rows


# ------------------------------------------------------------------ schema and names
def test_schema_constants_and_controls():
    assert st.COLUMNS == ("uid", "step", "epoch", "rank", "score", "weight", "batch_size")
    assert st.SCHEMA.names == list(st.COLUMNS) and "rank" not in st.STAGE2_COLUMNS
    schema = st.schema_for(["zero", "init", "zero", "ref_vit_b_32"])
    assert schema.names == [*st.COLUMNS, "score_zero", "score_init", "score_ref_vit_b_32"]
    assert all(schema.field(c).type == pa.float32() for c in ("score_zero", "score_init"))
    assert st.schema_for() == st.SCHEMA
    for bad in ("Zero", "", "a-b", "x y", None):
        with pytest.raises(ValueError, match="not valid"):
            st.control_column(bad)
    assert st.control_name("score_zero") == "zero" and st.control_name("score") is None and st.control_name("score_X") is None
    assert st.control_names(schema) == ["zero", "init", "ref_vit_b_32"]
    # the binarizers and the mimic filter's kernels use the owner's names, not copies
    from raymimic.select import binarize, kernels
    assert binarize.SCORE_COLUMNS is st.COLUMNS and kernels.SCORE_COLUMNS is st.COLUMNS


def test_check_schema_names_what_is_missing_and_the_contract():
    with pytest.raises(ValueError, match=r"run/scores/x\.parquet lacks column\(s\) \['weight', 'batch_size'\].*contract has uid string, "
                                         r"step int64.*batch_size int32.*score_<name>"):
        st.check_schema(["uid", "step", "epoch", "rank", "score"], "run/scores/x.parquet")
    with pytest.raises(ValueError, match="has column 'score' of type string where the contract has float32"):
        st.check_schema(pa.schema([(c, pa.string() if c in ("uid", "score") else pa.int64()) for c in st.COLUMNS]), "t")
    with pytest.raises(ValueError, match="'score_zero' of type string"):
        st.check_schema(st.SCHEMA.append(pa.field("score_zero", pa.string())), "t")
    st.check_schema(st.schema_for(["zero"]), "t")
    st.check_schema([c for c in st.COLUMNS if c != "rank"], "t", required=st.STAGE2_COLUMNS)
    st.check_schema(pa.schema([("uid", pa.large_string()), *[(c, pa.int64()) for c in st.COLUMNS[1:]], ("other", pa.string())]), "t")


def test_file_names_one_pattern():
    name = st.file_name(3, 17, 2)
    assert name == "steps-0000000003-0000000017-rank-00002.parquet"
    assert st.parse_file_name(name) == (3, 17, 2, "")
    part = st.file_name(-1, -1, 0, part="00ff")
    assert part == "steps--000000001--000000001-rank-00000-part-00ff.parquet"
    assert st.parse_file_name(part) == (-1, -1, 0, "00ff")
    for other in ("00000.parquet", ".tmp-abc-" + name + ".tmp", name + ".tmp", "steps-1-2-rank-0-part-XY.parquet"):
        assert st.parse_file_name(other) is None
    with pytest.raises(ValueError):
        st.file_name(5, 4, 0)
    with pytest.raises(ValueError):
        st.file_name(1, 1, 0, part="nothex")


# ------------------------------------------------------------------ writer
def test_writer_round_trip_and_discard_from_step(tmp_path):
    uri = str(tmp_path / "scores")
    writer = st.ScoreTableWriter(uri, rank=1)
    assert writer.flush() is None
    writer.add(["a", "b"], 0, 0, [0.5, -0.5], [0.7, 0.3], 4)
    writer.add(np.array(["c", "d"]), 1, 0, np.array([1.0, 2.0]), np.array([0.1, 0.9]), 4)
    assert writer.pending_rows == 4
    first = writer.flush()
    assert first.endswith("/steps-0000000000-0000000001-rank-00001.parquet") and writer.pending_rows == 0
    writer.add(["e"], 2, 1, [3.0], [1.0], 4)
    writer.flush()
    with pytest.raises(ValueError, match="one score and weight per uid"):
        writer.add(["x", "y"], 3, 1, [1.0], [1.0, 1.0], 4)
    (tmp_path / "scores" / ".tmp-dead-steps-0000000003-0000000003-rank-00001.parquet.tmp").write_bytes(b"partial")

    table = st.read_score_table(uri)
    assert table.schema == st.SCHEMA  # no control columns written: exactly the contract
    assert table.column("uid").to_pylist() == ["a", "b", "c", "d", "e"]
    assert table.column("step").to_pylist() == [0, 0, 1, 1, 2] and table.column("rank").to_pylist() == [1] * 5
    np.testing.assert_allclose(table.column("weight").to_numpy(), [0.7, 0.3, 0.1, 0.9, 1.0], rtol=1e-6)
    assert [(f.first_step, f.last_step, f.rank, f.part) for f in st.score_files(uri)] == [(0, 1, 1, ""), (2, 2, 1, "")]
    assert st.count_rows(uri) == 5

    removed = st.discard_from_step(uri, 1)  # steps >= 1: the first file holds step 1, so it goes too, and the temp file
    assert sorted(p.rsplit("/", 1)[-1][:5] for p in removed) == [".tmp-", "steps", "steps"]
    assert st.read_score_table(uri).num_rows == 0 and st.count_rows(uri) == 0
    assert st.read_score_table(str(tmp_path / "missing")).schema == st.SCHEMA and st.count_rows(str(tmp_path / "missing")) == 0
    assert st.discard_from_step(str(tmp_path / "missing"), 0) == []


def test_writer_control_columns(tmp_path):
    uri = str(tmp_path / "scores")
    writer = st.ScoreTableWriter(uri, rank=0, controls=["zero"])
    writer.add(["a", "b"], 0, 0, [1.0, 2.0], [0.5, 0.5], 2, extra={"score_zero": [0.1, 0.2], "score_init": [1.5, 2.5]})
    writer.add(["c", "d"], 1, 0, [1.0, 2.0], [0.5, 0.5], 2)  # declared control without values: null
    writer.flush()
    schema = pq.read_schema(st.score_files(uri)[0].path)
    assert schema.names == [*st.COLUMNS, "score_zero", "score_init"] and schema.field("score_init").type == pa.float32()
    frame = st.read_score_table(uri).to_pandas()
    np.testing.assert_allclose(frame["score_zero"], [0.1, 0.2, np.nan, np.nan], rtol=1e-6)
    np.testing.assert_allclose(frame["score_init"], [1.5, 2.5, np.nan, np.nan], rtol=1e-6)
    with pytest.raises(ValueError, match="not named score_<name>"):
        writer.add(["e"], 2, 0, [1.0], [1.0], 1, extra={"zero": [0.0]})
    with pytest.raises(ValueError, match="has 2 values for 1 uids"):
        writer.add(["e"], 2, 0, [1.0], [1.0], 1, extra={"score_zero": [0.0, 1.0]})
    with pytest.raises(ValueError, match="not valid"):
        st.ScoreTableWriter(uri, 0, controls=["Bad"])


# ------------------------------------------------------------------ small reader, row count
def test_optional_columns_present_absent_and_mixed(tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    old = pa.table(_rows(["a", "b"], 0))  # an old table: no optional column
    new = pa.table(_rows(["c", "d"], 1, score_zero=[0.5, 0.25], score_random=[1.0, 2.0]))
    newer = pa.table(_rows(["e"], 2, score_random=[3.0]))
    pq.write_table(old, folder / st.file_name(0, 0, 0))
    only_old = st.read_score_table(str(folder))
    assert only_old.schema == st.SCHEMA
    pq.write_table(new, folder / st.file_name(1, 1, 0))
    pq.write_table(newer, folder / st.file_name(2, 2, 0))
    table = st.read_score_table(str(folder))
    assert table.column_names == [*st.COLUMNS, "score_random", "score_zero"]
    assert table.column("score_zero").to_pylist() == [None, None, 0.5, 0.25, None]
    assert table.column("score_random").to_pylist() == [None, None, 1.0, 2.0, 3.0]
    assert st.control_names(table.schema) == ["random", "zero"]
    assert st.count_rows(str(folder)) == 5


def test_readers_read_committed_files_and_cast_other_names(tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    frame = pd.DataFrame(_rows(["a", "b", "c"], 4)).astype({"epoch": np.int64, "score": np.float64})  # wider types: cast
    frame.to_parquet(folder / "00000.parquet", index=False)  # a table written by another tool
    frame.to_parquet(folder / "_SUCCESS.parquet", index=False)  # hidden by convention
    (folder / ".tmp-x-steps-0000000000-0000000000-rank-00000.parquet.tmp").write_bytes(b"half")
    (folder / "notes.txt").write_text("not a table")
    assert [p.rsplit("/", 1)[-1] for p in st.table_files(str(folder))] == ["00000.parquet"]
    table = st.read_score_table(str(folder))
    assert table.schema == st.SCHEMA and table.num_rows == 3
    assert st.read_score_table(str(folder / "00000.parquet")).num_rows == 3  # one file
    assert st.count_rows("file://" + str(folder)) == 3  # fsspec URI


def test_corrupt_file_and_schema_errors_name_the_file(tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    pq.write_table(pa.table(_rows(["a"], 0)), folder / st.file_name(0, 0, 0))
    bad = folder / st.file_name(1, 1, 0)
    bad.write_bytes(b"this is not parquet at all, just some bytes")
    for read in (st.read_score_table, st.count_rows):
        with pytest.raises(ValueError, match=rf"score file .*{bad.name} is not a readable parquet file"):
            read(str(folder))
    bad.unlink()
    pq.write_table(pa.table({k: v for k, v in _rows(["b"], 1).items() if k != "weight"}), folder / st.file_name(1, 1, 0))
    with pytest.raises(ValueError, match=rf"{st.file_name(1, 1, 0)} lacks column\(s\) \['weight'\]"):
        st.read_score_table(str(folder))


def test_count_rows_reads_footers_only(tmp_path, monkeypatch):
    folder = tmp_path / "scores"
    folder.mkdir()
    sizes = [3, 50, 7]
    for i, n in enumerate(sizes):
        pq.write_table(pa.table(_rows([f"u{j}" for j in range(n)], i)), folder / st.file_name(i, i, 0), row_group_size=10)
    assert st.count_rows(str(folder)) == sum(sizes) == st.read_score_table(str(folder)).num_rows

    def no_row_data(*args, **kwargs):
        raise AssertionError("count_rows read row data")

    monkeypatch.setattr(pq.ParquetFile, "read", no_row_data)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no_row_data)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_row_data)
    monkeypatch.setattr(pq, "read_table", no_row_data)
    assert st.count_rows(str(folder)) == sum(sizes)


# ------------------------------------------------------------------ score-only parts
def test_write_part_is_idempotent_and_discard_parts(tmp_path):
    uri = str(tmp_path / "scores")
    block = pa.table({**_rows(["a", "b"], -1), "image": [b"x", b"y"]})  # columns outside the contract are dropped
    name = st.write_part(block, uri)
    assert st.parse_file_name(name)[:3] == (-1, -1, 0) and st.write_part(block, uri) == name  # a retried block: same file
    assert st.write_part(block.slice(0, 0), uri) is None
    other = st.write_part(pa.table(_rows(["c"], -1)), uri)
    assert other != name and st.read_score_table(uri).schema == st.SCHEMA and st.count_rows(uri) == 3
    training = st.ScoreTableWriter(uri, 0)
    training.add(["z"], 0, 0, [1.0], [1.0], 1)
    training.flush()
    assert [p.rsplit("/", 1)[-1] for p in st.discard_parts(uri, {name}, -1, -1)] == [other]  # training files never
    assert st.count_rows(uri) == 3


# ------------------------------------------------------------------ Ray
@pytest.mark.ray
def test_ray_reader_on_local_folder_with_mixed_optional_columns(ray_session, tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    pq.write_table(pa.table(_rows(["a", "b"], 0)), folder / st.file_name(0, 0, 0))
    pq.write_table(pa.table(_rows(["c"], 1, rank=1, score_zero=[0.5])), folder / st.file_name(1, 1, 1))
    (folder / ".tmp-x-steps-0000000002-0000000002-rank-00000.parquet.tmp").write_bytes(b"half")
    ds = st.read_score_dataset(str(folder))
    assert ds.schema().names == [*st.COLUMNS, "score_zero"]
    frame = ds.to_pandas().sort_values("uid").reset_index(drop=True)
    assert frame["uid"].tolist() == ["a", "b", "c"] and frame["step"].tolist() == [0, 0, 1] and frame["rank"].tolist() == [0, 0, 1]
    assert frame["score_zero"].isna().tolist() == [True, True, False] and float(frame["score_zero"].iloc[2]) == 0.5
    # every block has every column, also a block of the file without score_zero
    columns = ds.map_batches(lambda b: {"n": [len(b.columns)]}, batch_format="pandas", batch_size=None).take_all()
    assert {row["n"] for row in columns} == {8}
    assert st.read_score_dataset("file://" + str(folder)).count() == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert st.read_score_dataset(str(empty)).count() == 0
    with pytest.raises(FileNotFoundError, match="do not exist"):
        st.read_score_dataset(str(tmp_path / "missing"))
    pq.write_table(pa.table({k: v for k, v in _rows(["d"], 2).items() if k != "score"}), folder / st.file_name(2, 2, 0))
    with pytest.raises(ValueError, match=rf"{st.file_name(2, 2, 0)} lacks column\(s\) \['score'\]"):
        st.read_score_dataset(str(folder))


@pytest.mark.ray
def test_score_only_output_is_found_by_the_readers(ray_session, tmp_path):
    from raymimic.train.score_only import write_scores

    rows = pd.DataFrame(_rows([f"{i:032x}" for i in range(30)], 7, epoch=1, batch_size=10))
    rows["image"] = [b"\0"] * len(rows)  # dropped: not a score-table column
    scored = ray_session.data.from_pandas(rows).repartition(3)
    uri = write_scores(scored, str(tmp_path / "out"))
    files = st.score_files(uri)
    assert len(files) == 3 and {(f.first_step, f.last_step, f.rank) for f in files} == {(7, 7, 0)} and all(f.part for f in files)
    table = st.read_score_table(uri)
    assert table.schema == st.SCHEMA and sorted(table.column("uid").to_pylist()) == rows["uid"].tolist()
    assert st.count_rows(uri) == 30 and st.read_score_dataset(uri).count() == 30
    # a rerun with other blocks replaces the same step's output instead of adding rows
    write_scores(ray_session.data.from_pandas(rows).repartition(2), str(tmp_path / "out"))
    assert len(st.score_files(uri)) == 2 and st.count_rows(uri) == 30
