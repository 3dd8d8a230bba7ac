"""The Triton attention backend is a drop-in for the torch backend, down to greedy decoding
of a whole model; and the engine picks it on CUDA only."""

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.kvcache_builders import make_kv_cache  # noqa: E402

from kvflock.worker.attention import (  # noqa: E402
    AttentionMetadata,
    TorchAttentionBackend,
    TritonAttentionBackend,
    select_attention_backend,
)

BLOCK_SIZE = 16


def test_select_attention_backend_picks_torch_on_cpu():
    assert isinstance(select_attention_backend(torch.device("cpu")), TorchAttentionBackend)


def test_select_attention_backend_picks_triton_on_cuda():
    assert isinstance(select_attention_backend(torch.device("cuda")), TritonAttentionBackend)


class PagedBatch:
    """Sequences in a paged cache, each with its own consecutive blocks (from block 1 on): the
    metadata of a step that appends `new_lens[i]` tokens to sequence i."""

    def __init__(self, max_len: int, num_seqs: int, device: torch.device) -> None:
        self.blocks_per_seq = -(-max_len // BLOCK_SIZE)
        self.lens = [0] * num_seqs
        self.device = device

    def step(self, new_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """(metadata, positions of the new tokens), after which the sequences hold them."""
        slots, positions = [], []
        for i, n in enumerate(new_lens):
            for pos in range(self.lens[i], self.lens[i] + n):
                block = 1 + i * self.blocks_per_seq + pos // BLOCK_SIZE
                slots.append(block * BLOCK_SIZE + pos % BLOCK_SIZE)
                positions.append(pos)
            self.lens[i] += n
        tables = 1 + torch.arange(len(new_lens))[:, None] * self.blocks_per_seq + torch.arange(self.blocks_per_seq)
        cu = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()])
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            block_tables=tables.to(torch.int32).to(self.device),
            context_lens=torch.tensor(self.lens, dtype=torch.int32, device=self.device),
            cu_seqlens_q=cu.to(torch.int32).to(self.device),
            is_decode=all(n == 1 for n in new_lens),
        )
        return meta, torch.tensor(positions, device=self.device)


@pytest.mark.parametrize("new_lens", [[5, 17, 1], [1, 1, 1]], ids=["prefill", "decode"])
def test_triton_backend_writes_and_attends_like_torch(device, new_lens):
    gen = torch.Generator().manual_seed(0)
    num_kv_heads, group, head_dim = 2, 3, 64
    batch = PagedBatch(64, 3, device)
    batch.step([20, 3, 40])  # a cached prefix
    meta, _ = batch.step(new_lens)
    t = sum(new_lens)
    q = torch.randn(t, num_kv_heads * group, head_dim, generator=gen).half().to(device)
    k = torch.randn(t, num_kv_heads, head_dim, generator=gen).half().to(device)
    v = torch.randn(t, num_kv_heads, head_dim, generator=gen).half().to(device)
    cache = make_kv_cache(1 + 3 * 4, 2, BLOCK_SIZE, num_kv_heads, head_dim, torch.float16, gen).to(device)
    triton_cache = cache.clone()
    ref = TorchAttentionBackend().forward(q, k, v, cache[:, 1], meta, 0.125)
    out = TritonAttentionBackend().forward(q, k, v, triton_cache[:, 1], meta, 0.125)
    assert torch.equal(triton_cache, cache)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_tiny_llama_greedy_decoding_matches_torch_backend_in_bf16(gpu):
    """The whole Triton path (attention, write_kv, rms_norm with the residual add, rotary from
    its cos/sin table, silu_and_mul) against the torch path.
    Two sequences prefilled together (one in two chunks), then 24 decode steps, greedy.
    Tokens must match; logits may differ by bf16 rounding in another order (atol 0.1 on
    logits of spread about 10, with the top-2 gaps far larger)."""
    pytest.importorskip("pydantic")  # kvflock.worker.config needs it
    from kvflock.worker.config import ModelConfig
    from kvflock.worker.model.llama import LlamaForCausalLM

    cfg = ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=3,
        num_heads=8, num_kv_heads=2, head_dim=32 * 4, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    models = {}
    for name, backend in (("torch", TorchAttentionBackend()), ("triton", TritonAttentionBackend())):
        models[name] = LlamaForCausalLM(cfg, backend).to(gpu, torch.bfloat16).eval()
    with torch.no_grad():
        for p in models["torch"].parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25 / p.shape[1] ** 0.25)
    models["triton"].load_state_dict(models["torch"].state_dict())
    for model in models.values():  # as the loader does: one gate/up matmul for silu_and_mul
        model.fuse_projections()

    prompts = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19], [7, 1, 8]]
    tokens, logits = {}, {}
    for name, model in models.items():
        cache = torch.zeros(1 + 2 * 4, cfg.num_layers, 2, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim,
                            dtype=torch.bfloat16, device=gpu)
        batch = PagedBatch(64, 2, gpu)
        seqs = [list(p) for p in prompts]
        # Each step: per sequence, its new tokens and whether they end its prompt (then the
        # step samples its next token). The long prompt is prefilled in two chunks; in the
        # second step the short one has no tokens at all.
        schedule = [
            [(prompts[0][:12], False), (prompts[1], True)],
            [(prompts[0][12:], True), ([], False)],
        ]
        step_logits = []
        with torch.no_grad():
            for step in range(26):
                chunks = schedule[step] if step < len(schedule) else [([s[-1]], True) for s in seqs]
                meta, positions = batch.step([len(c) for c, _ in chunks])
                ids = torch.tensor([tok for c, _ in chunks for tok in c], device=gpu)
                hidden = model(ids, positions, cache, meta)
                out = model.logits(hidden[(meta.cu_seqlens_q[1:] - 1).long()])
                for i, (_, samples) in enumerate(chunks):
                    if samples:
                        seqs[i].append(int(out[i].argmax()))
                        step_logits.append(out[i])
        tokens[name], logits[name] = seqs, torch.stack(step_logits)
    assert tokens["triton"] == tokens["torch"]
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=0.1, rtol=0)
