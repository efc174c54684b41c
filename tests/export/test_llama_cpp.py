"""llama.cpp itself loads each kind of export and computes our logits (llama-cpp-python).

Marked `llama_cpp` and skipped when llama-cpp-python is not installed: it builds llama.cpp from source
(about 10 minutes on 2 cores; `pip install llama-cpp-python`, needs cmake and a C++ compiler).
`.ci/run` installs it and runs these tests when LLAMA_CPP_TESTS=1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gguf import _ids, _llama, _logits, _slice, make_bpe_tokenizer

from optimum_sparse.config import SparsityConfig
from optimum_sparse.export.gguf import export_gguf
from optimum_sparse.sequential import prune

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp

@pytest.fixture(scope="module")
def bpe_tokenizer():
    return make_bpe_tokenizer()


#: max |logit difference| between llama.cpp and us (its kernels accumulate in other orders and precisions)
LLAMA_CPP_TOLERANCE = {"f32": 2e-3, "f16": 5e-3, "q8_0": 3e-2}


def _llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    tokens = ids.reshape(-1).tolist()
    llm.eval(tokens)
    return torch.from_numpy(np.asarray(llm.scores[: len(tokens)], dtype=np.float32))


def _assert_close(path, model, tokenizer, outtype: str) -> None:
    ids = _ids(tokenizer)
    ours = _logits(model, ids)[0]
    theirs = _llama_cpp_logits(path, ids)[:, : ours.shape[-1]]
    assert float((theirs - ours).abs().max()) < LLAMA_CPP_TOLERANCE[outtype]


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_the_dense_export(bpe_tokenizer, tmp_path, outtype):
    model = _llama(bpe_tokenizer)
    export_gguf(model, bpe_tokenizer, tmp_path / "dense.gguf", outtype)
    _assert_close(tmp_path / "dense.gguf", model, bpe_tokenizer, outtype)


def test_llama_cpp_runs_a_2_of_4_pruned_export(bpe_tokenizer, tmp_path):
    model = _llama(bpe_tokenizer)
    prune(model, SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    export_gguf(model, bpe_tokenizer, tmp_path / "nm.gguf", "f32")
    _assert_close(tmp_path / "nm.gguf", model, bpe_tokenizer, "f32")


def test_llama_cpp_runs_a_uniformly_sliced_export_as_llama(bpe_tokenizer, tmp_path):
    model = _llama(bpe_tokenizer)
    _slice(model, [(0.5, 0.5), (0.5, 0.5)])
    assert export_gguf(model, bpe_tokenizer, tmp_path / "uniform.gguf", "f32").architecture == "llama"
    _assert_close(tmp_path / "uniform.gguf", model, bpe_tokenizer, "f32")


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_runs_layers_of_different_widths_as_deci(bpe_tokenizer, tmp_path, outtype):
    model = _llama(bpe_tokenizer)
    _slice(model, [(0.5, 0.75), (1.0, 0.3)])
    assert export_gguf(model, bpe_tokenizer, tmp_path / "deci.gguf", outtype).architecture == "deci"
    _assert_close(tmp_path / "deci.gguf", model, bpe_tokenizer, outtype)
