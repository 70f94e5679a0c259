import json

import numpy as np
import pytest

from lm.data import DataError, Rows, eval_batches, loss_mask, open_store, train_iterator

SEQ = 16


def take(it, n):
    return [next(it) for _ in range(n)]


def window_starts(store, batch):
    """Where each row of a training batch was cut from the train split (rows are found by search)."""
    haystack = np.asarray(store.split("train")).tobytes()
    itemsize = store.split("train").dtype.itemsize
    starts = []
    for row in batch["tokens"]:
        needle = row.astype(store.split("train").dtype).tobytes()
        hits, at = [], haystack.find(needle)
        while at >= 0:
            if at % itemsize == 0:
                hits.append(at // itemsize)
            at = haystack.find(needle, at + 1)
        assert len(hits) == 1, "a batch row is not a unique window of the train split"
        starts.append(hits[0])
    return starts


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def it_for(store, **kw):
    args = dict(seq_len=SEQ, batch_size=8, seed=0, process_index=0, process_count=1) | kw
    return train_iterator(store, **args)


def test_batches_are_windows_of_the_train_split(byte_store):
    store = open_store(byte_store)
    batch = next(it_for(store))
    assert batch.keys() == {"tokens"}
    assert batch["tokens"].shape == (8, SEQ + 1) and batch["tokens"].dtype == np.int32
    starts = window_starts(store, batch)
    assert len({s % SEQ for s in starts}) == 1  # one epoch shares one grid phase
    assert len(set(starts)) == 8


def test_an_epoch_visits_every_grid_window_once(byte_store):
    store = open_store(byte_store)
    seq = 128
    n_windows = store.n_tokens("train") // seq - 1
    it = it_for(store, seq_len=seq, batch_size=1)
    rows = np.stack([next(it)["tokens"][0] for _ in range(n_windows)])
    train = np.asarray(store.split("train"), dtype=np.int32)
    phase = window_starts(store, {"tokens": rows[:1]})[0] % seq
    grid = np.stack([train[phase + k * seq: phase + k * seq + seq + 1] for k in range(n_windows)])
    np.testing.assert_array_equal(rows[np.lexsort(rows.T[::-1])], grid[np.lexsort(grid.T[::-1])])
    next_epoch = np.stack([next(it)["tokens"][0] for _ in range(8)])
    assert not np.array_equal(next_epoch, rows[:8])  # each epoch is reshuffled


def test_same_seed_same_batches_other_seed_other_batches(byte_store):
    assert_same(take(it_for(byte_store, seed=3), 4), take(it_for(byte_store, seed=3), 4))
    a = np.stack([b["tokens"] for b in take(it_for(byte_store, seed=3), 4)])
    b = np.stack([b["tokens"] for b in take(it_for(byte_store, seed=4), 4)])
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("packed", [False, True])
def test_state_restores_the_exact_stream(byte_store, packed):
    it = it_for(byte_store, packed=packed, seed=11)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    fresh = it_for(byte_store, packed=packed, seed=11)
    fresh.set_state(state)
    assert_same(take(fresh, 5), expected)


def test_state_from_other_settings_is_refused(byte_store):
    it = it_for(byte_store)
    next(it)
    state = it.get_state()
    other = it_for(byte_store, seq_len=SEQ * 2)
    with pytest.raises(DataError, match=f"seq_len: saved {SEQ}, now {2 * SEQ}"):
        other.set_state(state)


def test_processes_split_every_global_batch(byte_store):
    store = open_store(byte_store)
    single = take(it_for(store, batch_size=8), 6)
    shards = [take(it_for(store, batch_size=8, process_index=p, process_count=2), 6) for p in range(2)]
    for j, batch in enumerate(single):
        assert shards[0][j]["tokens"].shape == (4, SEQ + 1)
        np.testing.assert_array_equal(np.concatenate([s[j]["tokens"] for s in shards]), batch["tokens"])
        assert set(window_starts(store, shards[0][j])).isdisjoint(window_starts(store, shards[1][j]))


def test_state_moves_between_process_counts(byte_store):
    one = it_for(byte_store, batch_size=8)
    take(one, 3)
    state = one.get_state()
    expected = next(one)["tokens"]
    halves = []
    for p in range(2):
        it = it_for(byte_store, batch_size=8, process_index=p, process_count=2)
        it.set_state(state)
        halves.append(next(it)["tokens"])
    np.testing.assert_array_equal(np.concatenate(halves), expected)


def test_bad_process_arguments(byte_store):
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        it_for(byte_store, batch_size=8, process_index=0, process_count=3)
    with pytest.raises(DataError, match="process_index 2 is outside 0..1"):
        it_for(byte_store, process_index=2, process_count=2)
    with pytest.raises(DataError, match="pass both process_index and process_count"):
        it_for(byte_store, process_index=0, process_count=None)


def test_default_process_is_jax_process(byte_store):
    it = train_iterator(byte_store, seq_len=SEQ, batch_size=4, seed=0)
    assert next(it)["tokens"].shape == (4, SEQ + 1)


def test_packed_segment_ids(byte_store):
    store = open_store(byte_store)
    packed = take(it_for(store, packed=True, seq_len=512, batch_size=4), 3)
    plain = take(it_for(store, packed=False, seq_len=512, batch_size=4), 3)
    offsets = store.doc_offsets("train")
    boundaries = 0
    for p, u in zip(packed, plain):
        np.testing.assert_array_equal(p["tokens"], u["tokens"])
        seg = p["segment_ids"]
        assert seg.shape == p["tokens"].shape and seg.dtype == np.int32
        assert (seg[:, 0] == 1).all() and set(np.unique(np.diff(seg, axis=1))) <= {0, 1}
        for row, start in zip(seg, window_starts(store, p)):
            positions = start + np.arange(seg.shape[1])
            doc = np.searchsorted(offsets, positions, side="right") - 1
            np.testing.assert_array_equal(row, doc - doc[0] + 1)
        mask = loss_mask(seg)
        assert mask.shape == (4, 512)
        boundaries += int((~mask).sum())
        np.testing.assert_array_equal(~mask, np.diff(seg, axis=1) == 1)
    assert boundaries > 0  # windows of 512 bytes over ~4 KB documents must cross some boundaries


def test_packed_eval_ids_follow_document_offsets(byte_store):
    store = open_store(byte_store)
    offsets = store.doc_offsets("val")
    batches = eval_batches(store, seq_len=256, batch_size=2, packed=True, process_index=0, process_count=1)
    starts = np.arange(len(batches) * 2) * 256
    rows = np.concatenate([b["segment_ids"] for b in batches])
    for start, row in zip(starts, rows):
        doc = np.searchsorted(offsets, start + np.arange(257), side="right") - 1
        np.testing.assert_array_equal(row, doc - doc[0] + 1)  # renumbered from 1 in every window
    assert rows.max() >= 2


def test_eval_batches(byte_store):
    store = open_store(byte_store)
    val = np.asarray(store.split("val"), dtype=np.int32)
    n_windows = (len(val) - 1) // SEQ
    batches = eval_batches(store, seq_len=SEQ, batch_size=4, process_index=0, process_count=1)
    assert len(batches) == n_windows // 4
    rows = np.concatenate([b["tokens"] for b in batches])
    for k, row in enumerate(rows):
        np.testing.assert_array_equal(row, val[k * SEQ: k * SEQ + SEQ + 1])
    assert_same(batches, eval_batches(store, seq_len=SEQ, batch_size=4, process_index=0, process_count=1))
    assert len(eval_batches(store, seq_len=SEQ, batch_size=4, max_batches=3, process_index=0, process_count=1)) == 3
    halves = [eval_batches(store, seq_len=SEQ, batch_size=4, max_batches=2, process_index=p, process_count=2)
              for p in range(2)]
    joined = np.concatenate([halves[0][1]["tokens"], halves[1][1]["tokens"]])
    np.testing.assert_array_equal(joined, batches[1]["tokens"])
    packed = eval_batches(store, seq_len=SEQ, batch_size=4, max_batches=2, packed=True,
                          process_index=0, process_count=1)
    assert packed[0].keys() == {"tokens", "segment_ids"}


def test_sequence_longer_than_a_split(byte_store):
    store = open_store(byte_store)
    n_val = store.n_tokens("val")
    expected = (f"seq_len {n_val} is longer than the val split .* lower seq_len or hold out more: `attnlab data "
                f"prepare ... --val-fraction 0.05 --overwrite`")
    with pytest.raises(DataError, match=expected):
        eval_batches(store, seq_len=n_val, batch_size=1, process_index=0, process_count=1)
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        eval_batches(store, seq_len=n_val // 4, batch_size=64, process_index=0, process_count=1)
    with pytest.raises(DataError, match="too few for seq_len"):
        it_for(store, seq_len=store.n_tokens("train"))
    with pytest.raises(DataError, match="seq_len must be a positive integer"):
        it_for(store, seq_len=0)


def test_grain_checkpoint_handler_saves_the_iterator(byte_store, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    it = it_for(byte_store, seed=5)
    take(it, 3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 2)
    fresh = it_for(byte_store, seed=5)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 2), expected)


# --- document rows (the projection-sharing paper's protocol) ----------------------------------------------


def _doc(store, split, d):
    off = store.doc_offsets(split)
    return np.asarray(store.split(split)[off[d]:off[d + 1]], np.int64)


@pytest.mark.parametrize("score_padding", [True, False])
def test_document_rows_cut_pad_and_score_or_mask(byte_store, score_padding):
    """Each row is one document: its first seq_len + 1 tokens, then the pad id; every train document appears
    once per epoch; with score_padding off, loss_mask leaves exactly the padding targets out."""
    store = open_store(byte_store)
    lengths = np.diff(store.doc_offsets("train"))
    L = int(np.median(lengths))  # some documents are longer than a row, some shorter
    assert lengths.min() < L + 1 < lengths.max()
    rows = Rows("documents", pad_id=7, score_padding=score_padding)
    n_docs = len(lengths)
    it = train_iterator(store, seq_len=L, batch_size=2, seed=3, process_index=0, process_count=1, rows=rows)
    seen = []
    for batch in take(it, n_docs // 2):
        for r, row in enumerate(batch["tokens"]):
            match = [d for d in range(n_docs) if np.array_equal(row[:min(lengths[d], L + 1)],
                                                                _doc(store, "train", d)[:L + 1])
                     and (row[min(lengths[d], L + 1):] == 7).all()]
            assert match, "a row must be one document's head, then padding"
            d = match[0]
            seen.append(d)
            n = min(lengths[d], L + 1)
            if score_padding:
                assert "loss_mask" not in batch
            else:
                np.testing.assert_array_equal(batch["loss_mask"][r], np.arange(1, L + 1) < n)
    assert sorted(seen) == sorted(set(seen)), "no document twice within an epoch"
    evals = eval_batches(store, seq_len=L, batch_size=2, process_index=0, process_count=1, rows=rows)
    np.testing.assert_array_equal(evals[0]["tokens"][1, :min(L + 1, np.diff(store.doc_offsets("val"))[1])],
                                  _doc(store, "val", 1)[:L + 1])


def test_document_rows_resume_and_refuse(byte_store):
    store = open_store(byte_store)
    rows = Rows("documents", pad_id=0)
    a = train_iterator(store, seq_len=64, batch_size=2, seed=1, process_index=0, process_count=1, rows=rows)
    take(a, 3)
    state = a.get_state()
    expected = take(a, 2)
    b = train_iterator(store, seq_len=64, batch_size=2, seed=1, process_index=0, process_count=1, rows=rows)
    b.set_state(state)
    assert_same(take(b, 2), expected)
    windows = train_iterator(store, seq_len=64, batch_size=2, seed=1, process_index=0, process_count=1)
    with pytest.raises(DataError, match="does not match this run"):
        windows.set_state(state)
    with pytest.raises(DataError, match="set data.pad_id"):
        Rows("documents")
    with pytest.raises(DataError, match="nothing to pack"):
        train_iterator(store, seq_len=64, batch_size=2, seed=1, packed=True, process_index=0, process_count=1,
                       rows=rows)
