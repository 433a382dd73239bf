"""The CUDA paths (docs/gpu.md, "One GPU"): each test is marked `cuda` and skips where PyTorch sees no GPU.
gpu_check.py runs them first: python -m pytest -m cuda"""
import os

import pytest
import torch
import torch.nn.functional as F

import data
import vcb
from conftest import run_train
from model import GPT, GPTConfig, response_logps

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def small_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(block_size=128, vocab_size=257, n_layer=2, n_head=4, n_embd=128), **kw}))


def test_bfloat16_autocast_logits_are_close_to_float32():
    model = small_gpt().cuda().eval()
    idx = torch.randint(257, (4, 64), device="cuda")
    with torch.no_grad():
        full = model(idx).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(idx).float()
        logp_full = vcb.sequence_logps(full, idx, torch.ones_like(idx))
        logp_half = vcb.sequence_logps(half, idx, torch.ones_like(idx))
    assert (half - full).abs().max() <= 0.02 * full.abs().max() + 1e-2
    torch.testing.assert_close(logp_half, logp_full, rtol=1e-2, atol=0.5)  # summed over 63 tokens


def test_greedy_sampling_on_cuda_gives_the_cpu_tokens():
    model = small_gpt(1)
    with torch.no_grad():  # weights large enough that the context matters
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
    prompts = [[256, 5, 6, 7], [256, 9], [256, 1, 2, 3, 4, 5]]
    cpu = model.eval().generate(prompts, 20, temperature=0)
    gpu = model.cuda().generate(prompts, 20, temperature=0)  # float32, no autocast: the same arithmetic
    assert gpu == cpu


def test_the_flash_attention_path_equals_the_masked_path():
    model = small_gpt(2).cuda().eval()
    idx = torch.randint(257, (3, 50), device="cuda")
    causal = torch.ones(50, 50, dtype=torch.bool, device="cuda").tril()[None, None].expand(3, 1, 50, 50)
    pos = torch.arange(50, device="cuda")[None].expand(3, 50)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        flash = model(idx).float()                                  # is_causal: flash attention
        masked = model(idx, pos=pos, attn_mask=causal).float()      # an explicit mask: another kernel
    torch.testing.assert_close(flash, masked, atol=3e-2, rtol=3e-2)


def test_the_packed_path_equals_the_padded_path_on_cuda():
    model = small_gpt(3).cuda().eval()
    groups = [([256, 3, 4, 5], [[7, 8, 256], [9, 256], [10, 11, 12, 256]]), ([256, 6], [[13, 256], [14, 15, 256]])]
    p = data.pack(groups, 128).to("cuda")
    x, mask = data.collate([(pr + r, len(pr)) for pr, rs in groups for r in rs], 256)
    with torch.no_grad():
        packed = response_logps(model, p)
        padded = vcb.sequence_logps(model(x.cuda()), x.cuda(), mask.cuda())
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)


def test_the_fused_adamw_step_equals_the_unfused_one():
    a, b = small_gpt(4).cuda(), small_gpt(4).cuda()
    opt_a = a.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")  # fused on CUDA
    assert opt_a.defaults.get("fused")
    groups = [{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt_b = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), foreach=False)  # one tensor at a time
    idx = torch.randint(257, (4, 33), device="cuda")
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            loss = -model(idx[:, :-1], targets=idx[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_compiled_training_step_runs_and_learns(tmp_path):
    assert run_train(tmp_path / "out", "--stage=data").returncode == 0
    proc = run_train(tmp_path / "out", "--stage=sft", "--compile=true", "--device=cuda", "--sft_steps=8",
                     env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.rsplit("loss ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("sft step")]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_sdpa_has_a_flash_kernel_for_training_shapes():
    q = torch.randn(2, 4, 64, 32, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot run this
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
