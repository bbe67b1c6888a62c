"""uids and DataComp subset files: validation, conversion, round trips (local and fsspec)."""
from __future__ import annotations

import numpy as np
import pytest

from raymimic.data.uids import (
    SUBSET_DTYPE,
    array_to_uids,
    is_valid_uid,
    pair_to_uid,
    read_subset,
    read_subset_uids,
    uid_to_pair,
    uids_to_array,
    validate_uid,
    write_subset,
)

UIDS = ["ffffffffffffffff0000000000000001", "0000000000000000ffffffffffffffff", "0123456789abcdef0123456789abcdef"]


def test_validate_uid_normalises_and_rejects():
    assert validate_uid("ABCDEF0123456789ABCDEF0123456789") == "abcdef0123456789abcdef0123456789"
    assert validate_uid(b"0123456789abcdef0123456789abcdef") == "0123456789abcdef0123456789abcdef"
    for bad in ["", "123", "g" * 32, "0" * 33, None, 12]:
        assert not is_valid_uid(bad)
        with pytest.raises(ValueError, match="malformed uid"):
            validate_uid(bad, where="row 3")


def test_pair_conversion_is_exact_at_the_extremes():
    for uid in UIDS:
        assert pair_to_uid(*uid_to_pair(uid)) == uid
    assert uid_to_pair("ffffffffffffffff0000000000000001") == (2**64 - 1, 1)


def test_array_is_sorted_u8_pairs_and_keeps_repeats():
    uids = UIDS + [UIDS[2], UIDS[2]]  # a uid listed 3 times is upsampled 3 times by DataComp
    array = uids_to_array(uids)
    assert array.dtype == SUBSET_DTYPE
    assert list(array_to_uids(array)) == sorted(uids)
    assert array_to_uids(array).count(UIDS[2]) == 3


def test_subset_file_round_trip_as_datacomp_resharder_reads_it(tmp_path):
    path = tmp_path / "keep.npy"
    uids = UIDS + [UIDS[0]]
    write_subset(str(path), uids)
    # DataComp's resharder: np.load(subset_file, mmap_mode="r"), then searchsorted on (hi, lo) pairs
    loaded = np.load(path, mmap_mode="r")
    assert loaded.dtype == np.dtype("u8,u8")
    query = np.array([uid_to_pair(UIDS[1])], dtype="u8,u8")
    position = np.searchsorted(loaded, query)[0]
    assert tuple(loaded[position]) == uid_to_pair(UIDS[1])
    assert read_subset_uids(str(path)) == sorted(uids)


def test_subset_round_trip_on_fsspec_memory_uri():
    path = "memory://subsets/keep.npy"
    write_subset(path, UIDS * 2)
    assert read_subset_uids(path) == sorted(UIDS * 2)


def test_read_subset_refuses_wrong_dtype_and_unsorted(tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.arange(3))
    with pytest.raises(ValueError, match="dtype"):
        read_subset(str(wrong))
    unsorted = tmp_path / "unsorted.npy"
    array = uids_to_array(UIDS)[::-1].copy()
    np.save(unsorted, array)
    with pytest.raises(ValueError, match="not sorted"):
        read_subset(str(unsorted))


def test_write_subset_names_the_bad_uid(tmp_path):
    with pytest.raises(ValueError, match="position 1"):
        write_subset(str(tmp_path / "x.npy"), [UIDS[0], "not-a-uid"])
