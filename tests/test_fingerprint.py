"""Id hashes are stored in every state: they must not change from one version to the next."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from sync.fingerprint import (
    RecordFingerprint,
    dictionary_codes,
    hash_strings,
    id_fingerprints,
    order_hashes,
)

IDS = ["", "a", "user_1", "0f8fad5b-d9cb-469f-a165-70867728950e", "émile@example.com", "x" * 17]
# Computed when the state format was fixed; a state written then holds exactly these.
HASHES = [
    0xE9E0033E3BADAF36,
    0x643823B4CCCC4E27,
    0x0E766F694CADCD7A,
    0x3646AF4AF7EACBE7,
    0x36FD7807419897B3,
    0x4D5FDF07D0D3B8BE,
]
CHECKS = [
    0xDFC7A99951F24649,
    0xB51B9C00E02D944C,
    0xECCEBB9C5E171CE8,
    0xBD4D24910B06043E,
    0x20C3AC14BBBA44C5,
    0xA7FEDC5D9E917C5C,
]


def test_id_fingerprints_are_the_ones_stored_states_hold() -> None:
    """Pinned values; a null hashes like the empty string (callers mask nulls)."""
    hashed, check = id_fingerprints(pa.array([*IDS, None], pa.string()))

    assert hashed.tolist() == [*HASHES, HASHES[0]]
    assert check.tolist() == [*CHECKS, CHECKS[0]]


def test_many_blocks_and_chunks_hash_as_each_string_alone() -> None:
    """Columns of several chunks (one empty), each of several blocks hashed on threads, give
    every string the hash it has on its own, in place."""
    strings = [f"id-{i}-{'z' * (i % 23)}" for i in range(170_006)]
    sizes = (70_000, 0, 5, 100_001)
    bounds = np.cumsum((0, *sizes))
    column = pa.chunked_array(
        [pa.array(strings[a:b], pa.string()) for a, b in itertools.pairwise(bounds)]
    )
    whole = hash_strings(column, (3, 5))
    sample = [*range(0, len(strings), 9_973), len(strings) - 1]

    alone = hash_strings(pa.array([strings[i] for i in sample], pa.large_string()), (3, 5))

    assert whole.shape == (2, len(strings))
    assert np.array_equal(whole[:, sample], alone)
    assert len(set(whole[0].tolist())) == len(strings)


def test_audiences_added_together_give_each_user_its_own_sum() -> None:
    """Several audiences over many blocks of users, added at once on threads, give each user
    (at block edges and the very last one too) the fingerprint it has on its own."""
    rng = np.random.default_rng(11)
    users = 300_001
    flags = {f"audience_{i}": rng.random(users) < share for i, share in enumerate((0.5, 0.01, 0.9))}
    together = RecordFingerprint(users)
    together.add_flags(flags)
    combined = together.finish()
    edges = [0, 1, (1 << 17) - 1, 1 << 17, (1 << 18) + 5, users - 1]

    for user in [*edges, *rng.integers(0, users, 20).tolist()]:
        alone = RecordFingerprint(1)
        alone.add_flags({key: present[user : user + 1] for key, present in flags.items()})
        assert combined[user] == alone.finish()[0], user
    assert len(np.unique(combined)) == 2 ** len(flags)


def test_padding_never_makes_strings_alike() -> None:
    """Blocks are zero-padded to their longest string: a string ending in zero bytes, or one
    sharing a block with much longer ones, still hashes as it does alone."""
    strings = ["a", "a\0", "a\0\0\0\0\0\0\0", "a\0\0\0\0\0\0\0\0", "é", "日本", "", None, "q" * 70]
    together = hash_strings(pa.array(strings, pa.string()), (7,))[0]

    alone = [hash_strings(pa.array([text], pa.string()), (7,))[0, 0] for text in strings]

    assert together.tolist() == [int(value) for value in alone]
    assert len(set(together[:4].tolist())) == 4


def test_hash_order_sorts_by_high_bits_and_finds_exact_repeats() -> None:
    """Rows come out in order of their hashes' high bits; only equal whole hashes count as
    repeats, even when a hash sharing the high bits sits between two equal ones."""
    high = 5 << 40
    hashes = np.array([high | 9, 3 << 50, high | 1, 7, high | 9, high | 2], dtype=np.uint64)

    order = order_hashes(hashes)

    rows = (order.packed & order.low).astype(np.intp)
    assert order.bits == 32
    assert np.all(order.packed[1:] > order.packed[:-1])
    assert np.array_equal(order.packed >> 32, hashes[rows] >> 32)
    assert sorted(rows.tolist()) == list(range(len(hashes)))
    assert order.repeated(hashes).tolist() == [True, False, False, False, True, False]
    assert not order_hashes(hashes[:4]).repeated(hashes[:4]).any()


@pytest.mark.parametrize("index_type", [pa.int8(), pa.int32()])
def test_dictionary_text_adds_the_terms_of_its_plain_text(index_type: pa.DataType) -> None:
    """Text hashed one distinct word at a time adds what the same text as plain strings adds,
    null codes and null words included, even with as many words as an int8 code can name."""
    words = pa.array([f"word {n}" for n in range(127)] + [None])
    indices = pa.array([0, None, 127, 5, None, 126, 5], index_type)
    coded = pa.DictionaryArray.from_arrays(indices, words)
    by_word, by_value = RecordFingerprint(len(indices)), RecordFingerprint(len(indices))
    by_word.add_strings("plan", coded)
    by_value.add_strings("plan", coded.dictionary_decode())
    assert by_word.finish().tolist() == by_value.finish().tolist()
    assert dictionary_codes(coded).tolist() == [0, 128, 127, 5, 128, 126, 5]
