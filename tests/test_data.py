"""Byte tokenizer, embedded corpus and BatchIterator."""

import numpy as np
import pytest

from crystal.data import BatchIterator, ByteTokenizer, default_corpus, load_dataset
from crystal.errors import CrystalError


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "To be, or not to be: ¿qué? 🌍\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_embedded_corpus_is_tiny_shakespeare():
    data = default_corpus()
    assert len(data) == 1_115_394
    assert data.startswith(b"First Citizen:")


def test_without_a_path_the_data_set_is_the_embedded_corpus_split_ninety_ten():
    ds = load_dataset(None, val_fraction=0.1)
    assert len(ds.train) + len(ds.val) == 1_115_394 and "Shakespeare" in ds.name
    assert len(ds.val) == round(1_115_394 * 0.1) and ds.vocab_size == 256


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(1000)  # token value == position
    it = BatchIterator(tokens, batch_size=3, seq_len=7, seed=0)
    x, y = it.next_batch()
    assert x.shape == y.shape == (3, 7) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert all(tokens[int(x[b, 0]):int(x[b, 0]) + 8].tolist() == [*x[b], y[b, -1]] for b in range(3))


def test_an_epoch_visits_every_full_batch_of_windows_once():
    tokens = np.arange(11 * 4 + 3)  # 11 windows of T=4 (+1), one spent on the phase shift;
    it = BatchIterator(tokens, batch_size=3, seq_len=4, seed=5)  # batches of 3: 3, 1 dropped
    assert it.n_windows == 10 and it.batches_per_epoch == 3
    starts = [int(s) for _ in range(3) for s in it.next_batch()[0][:, 0]]
    assert len(set(starts)) == 9 and len({s % 4 for s in starts}) == 1
    assert it.state() == {"epoch": 1, "cursor": 0}


def test_epochs_cut_the_stream_at_different_phases():
    tokens = np.arange(64 * 16 + 1)
    it = BatchIterator(tokens, batch_size=4, seq_len=16, seed=0)
    phases = {int(it.next_batch()[0][0, 0]) % 16 for _ in range(20 * it.batches_per_epoch)}
    assert len(phases) > 5


def test_every_window_lies_inside_the_stream_whatever_the_phase():
    for n in range(33, 120, 7):
        tokens = np.arange(n)
        it = BatchIterator(tokens, batch_size=2, seq_len=8, seed=n)
        for _ in range(6 * it.batches_per_epoch):
            x, y = it.next_batch()
            assert int(y.max()) < n and np.array_equal(x[:, 1:], y[:, :-1])


def test_a_stream_of_exactly_one_batch_keeps_phase_zero():
    it = BatchIterator(np.arange(2 * 8 + 1), batch_size=2, seq_len=8, seed=0)
    assert it.batches_per_epoch == 1
    assert sorted(int(s) for s in it.next_batch()[0][:, 0]) == [0, 8]


def test_each_epoch_has_its_own_seeded_order():
    tokens = np.arange(401)
    a = BatchIterator(tokens, 4, 4, seed=1)
    b = BatchIterator(tokens, 4, 4, seed=1)
    epoch0 = [a.next_batch()[0][:, 0].tolist() for _ in range(a.batches_per_epoch)]
    epoch1 = [a.next_batch()[0][:, 0].tolist() for _ in range(a.batches_per_epoch)]
    assert epoch0 != epoch1
    assert [b.next_batch()[0][:, 0].tolist() for _ in range(b.batches_per_epoch)] == epoch0
    c = BatchIterator(tokens, 4, 4, seed=2)
    assert [c.next_batch()[0][:, 0].tolist() for _ in range(c.batches_per_epoch)] != epoch0


def test_restoring_the_position_continues_with_the_same_batches():
    tokens = np.arange(2000) % 256
    a = BatchIterator(tokens, 2, 16, seed=3)
    for _ in range(70):
        a.next_batch()
    state = a.state()
    expected = [a.next_batch()[0] for _ in range(20)]
    b = BatchIterator(tokens, 2, 16, seed=3)
    b.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(b.next_batch()[0], e)


def test_data_shorter_than_one_batch_is_refused():
    with pytest.raises(CrystalError, match="needs at least 65"):
        BatchIterator(np.arange(64), batch_size=2, seq_len=32, seed=0)


def test_token_ids_outside_the_vocabulary_are_refused_in_the_batch_that_reads_them():
    it = BatchIterator(np.array([1, 2, 300, 4, 5]), 1, 2, seed=0, vocab_size=256)  # ids are not scanned up front
    with pytest.raises(CrystalError, match="token id 300 at token 2 of .* outside the vocabulary of 256"):
        for _ in range(2):
            it.next_batch()


def test_empty_and_missing_data_files_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(CrystalError, match="empty"):
        load_dataset(str(tmp_path / "empty.txt"))
    with pytest.raises(CrystalError, match="not found"):
        load_dataset(str(tmp_path / "nope.txt"))
