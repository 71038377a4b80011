"""HF model: a packed forward (``cu_seqlens`` or ``position_ids`` restarting at 0) equals the documents one by one."""

import pytest
import torch

from megatron_lasp.hf.configuration_linear_lm import LaspLinearLMConfig
from megatron_lasp.hf.modeling_linear_lm import LaspLinearLMForCausalLM

LENGTHS = [5, 1, 13, 8, 3]  # crosses the 8-token chunks, a 1-token document, boundaries on a chunk edge


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LaspLinearLMConfig(chunk_size=8, initializer_range=0.2)
    return LaspLinearLMForCausalLM(config).eval()


def _docs(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _one_by_one(model, docs):
    with torch.no_grad():
        return torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])


@pytest.mark.parametrize("how", ["cu_seqlens", "cu_seq_lens_q", "position_ids"])
def test_packed_forward_equals_documents_one_by_one(model, how):
    docs = _docs(model.config.vocab_size, LENGTHS)
    want = _one_by_one(model, docs)
    ids = torch.cat(docs)[None]
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    kwargs = {"position_ids": pos} if how == "position_ids" else {how: cu}
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False, **kwargs).logits[0]
        plain = model(input_ids=ids, use_cache=False).logits[0]
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, f"{how}: relative error {err:.2e}"
    assert ((plain - want).norm() / want.norm()).item() > 1e-2, "the unpacked run should differ"


def test_packed_batch_of_two_rows(model):
    """B = 2: cu_seqlens over the 2 x T tokens laid end to end; each row also packs documents."""
    rows = [[6, 10], [4, 4, 8]]
    docs = _docs(model.config.vocab_size, [n for r in rows for n in r], seed=2)
    want = _one_by_one(model, docs).view(2, 16, -1)
    ids = torch.cat(docs).view(2, 16)
    cu = torch.tensor([0, 6, 16, 20, 24, 32])
    pos = torch.cat([torch.arange(n) for r in rows for n in r]).view(2, 16)
    with torch.no_grad():
        for kwargs in ({"cu_seqlens": cu}, {"position_ids": pos}):
            got = model(input_ids=ids, use_cache=False, **kwargs).logits
            assert ((got - want).norm() / want.norm()).item() < 1e-5, kwargs


def test_bad_cu_seqlens_is_refused(model):
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(input_ids=torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))
