"""One suite for every encoder `load_encoder` can make: the same contract, whichever backend."""

import numpy as np
import pytest

from embedder.encoder import TorchEncoder, load_encoder
from embedder.model import load_model
from embedder.token_batches import TokenBatchEncoder, pooling_mode
from embedder.standin import NAME as STANDIN

TEXTS = ["trail running shoes for muddy paths", "a kettle", "", "trail running shoes for muddy paths",
         "noise-cancelling earbuds with long battery life " * 4]


def _int8_available():
    from embedder.quantized import available

    return available()


@pytest.fixture(params=["stand-in", "torch fp32", "torch bf16", "token batches fp32", "token batches bf16",
                        pytest.param("onnx int8", marks=pytest.mark.skipif(not _int8_available(), reason="onnx extra"))])
def encoder(request, tiny_model, tmp_path_factory, monkeypatch):
    if request.param == "stand-in":
        return load_encoder(STANDIN)
    if request.param == "onnx int8":  # exported from the tiny model into a scratch cache folder
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        return load_encoder(tiny_model, precision="int8", device="cpu", threads=1)
    if request.param.startswith("token batches"):  # the GPU's encoder, run here on the CPU
        return TokenBatchEncoder.from_model(load_model(tiny_model, "cpu"), "cpu", request.param.split()[-1])
    return load_encoder(tiny_model, precision=request.param.split()[1], device="cpu", threads=1)


def test_rows_are_unit_float32_in_the_order_given(encoder):
    vectors = encoder.encode(TEXTS, batch_size=2)
    assert vectors.shape == (len(TEXTS), encoder.dim) and vectors.dtype == np.float32
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms[[0, 1, 3, 4]], 1.0, atol=1e-4)
    # equal texts, equal vectors as far as a search can tell: int8 scales activations per batch, so the
    # same text in another batch moves a little (up to 4.4e-4 a component on an AMD EPYC without AVX-512,
    # ~1e-5 here), far below what reorders neighbours
    assert float(vectors[0] @ vectors[3]) >= 0.9999
    np.testing.assert_allclose(vectors[0], vectors[3], atol=2e-3)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    reversed_ = encoder.encode(TEXTS[::-1], batch_size=2)[::-1]
    np.testing.assert_allclose(reversed_, vectors, atol=2e-3)  # a row's vector does not depend on its neighbours


def test_batch_size_does_not_change_the_vectors(encoder):
    one, many = encoder.encode(TEXTS, batch_size=1), encoder.encode(TEXTS, batch_size=64)
    cos = (one * many).sum(axis=1)[[0, 1, 3, 4]]
    assert cos.min() >= 0.999


def test_no_texts_gives_no_rows(encoder):
    assert encoder.encode([], batch_size=8).shape == (0, encoder.dim)


def test_an_encoder_is_made_once_per_process(tiny_model):
    assert load_encoder(STANDIN) is load_encoder(STANDIN)
    assert load_encoder(tiny_model, precision="fp32", device="cpu") is load_encoder(tiny_model, precision="fp32", device="cpu")
    assert load_encoder(tiny_model, precision="bf16", device="cpu") is not load_encoder(tiny_model, precision="fp32", device="cpu")


def test_token_batches_give_the_models_own_vectors(tiny_model):
    """The GPU's encoder (its own tokenizing, batching, pooling) against sentence-transformers' encode
    of the same model, in fp32 on the CPU: the same vectors, in the same order, whatever the batching."""
    model = load_model(tiny_model, "cpu")
    texts = TEXTS + [f"item {i} " + "long words here " * (i % 23) for i in range(300)] + ["truncated " * 600]
    expected = TorchEncoder(model, "cpu", "fp32").encode(texts, batch_size=16)
    fast = TokenBatchEncoder.from_model(model, "cpu", "fp32")
    fast.tokens_per_batch = 256  # many batches of unequal sizes
    assert fast.token_ids(texts) == model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    np.testing.assert_allclose(fast.encode(texts), expected, atol=2e-5)


def test_token_batches_refuse_a_layout_they_do_not_run(tiny_model):
    model = load_model(tiny_model, "cpu")
    assert pooling_mode(model) == "mean"
    assert pooling_mode(list(model)[:1]) is None  # no pooling module: sentence-transformers' encode runs it
