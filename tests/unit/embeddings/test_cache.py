import numpy as np

from serve_app.embeddings.cache import cache_key, pack, unpack


def test_pack_round_trips_vector_and_tokens():
    vector = np.linspace(-1, 1, 384, dtype=np.float32)
    restored, tokens = unpack(pack(vector, 17))
    assert tokens == 17
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(restored, vector)


def test_key_depends_on_model_version_and_exact_text():
    base = cache_key("m", "1", "text")
    assert base == cache_key("m", "1", "text")
    assert len({base, cache_key("m", "2", "text"), cache_key("n", "1", "text"), cache_key("m", "1", "text ")}) == 4
    assert base.startswith("emb:m:1:")


def test_a_batch_result_is_cut_back_per_request():
    from serve_app.embeddings.contract import per_request

    flat = list("abcdef")
    assert per_request([["x"], ["y", "z", "w"], [], ["v", "u"]], lambda part: flat[part]) == [
        ["a"],
        ["b", "c", "d"],
        [],
        ["e", "f"],
    ]
