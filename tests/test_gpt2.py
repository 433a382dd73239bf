"""GPT-2 weights from a local model.safetensors, and the offline GPT-2 tokenizer. Tested on small
random checkpoints that the tests write in GPT-2's layout; nothing is downloaded."""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import data
from conftest import ROOT, run_train
from machinery import files, runtime
from model import GPT, GPTConfig
from tasks import reviews
from tools import gpt2


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_layout(model, prefix="", with_buffers=True):
    """Our weights as GPT-2's model.safetensors holds them: no 'transformer.' prefix (or one), Conv1D
    matrices stored (in, out), causal-mask buffers beside the weights, the tied lm_head left out."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("lm_head."):
            continue
        k = k.removeprefix("transformer.")
        out[prefix + k] = (v.t() if k.endswith(CONV1D) else v).contiguous().clone()
    if with_buffers:
        T = model.config.block_size
        for i in range(model.config.n_layer):
            out[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, T, T))
    return out


@pytest.fixture
def source():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=128)).eval()


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_loading_gpt2_layout_reproduces_the_model(source, tmp_path, prefix):
    save_file(gpt2_layout(source, prefix), tmp_path / "model.safetensors")
    loaded = gpt2.from_pretrained(tmp_path / "model.safetensors").eval()
    assert (loaded.config.n_layer, loaded.config.n_head, loaded.config.n_embd) == (2, 2, 128)
    idx = torch.randint(97, (2, 20))
    torch.testing.assert_close(loaded(idx), source(idx))
    cropped = gpt2.from_pretrained(tmp_path / "model.safetensors", block_size=24, reward_head=True).eval()
    assert cropped.transformer.wpe.weight.shape == (24, 128) and cropped.reward_head is not None
    torch.testing.assert_close(cropped(idx), source(idx))


def test_every_key_and_shape_is_checked(source, tmp_path):
    sd = gpt2_layout(source)
    del sd["h.1.mlp.c_fc.bias"]
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"keys differ from GPT-2's: missing \['transformer.h.1.mlp.c_fc.bias'\]"):
        gpt2.from_pretrained(tmp_path / "missing.safetensors")
    sd = gpt2_layout(source)
    sd["h.0.attn.c_proj.weight"] = torch.zeros(128, 64)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"h.0.attn.c_proj.weight has shape \(64, 128\), expected \(128, 128\)"):
        gpt2.from_pretrained(tmp_path / "shape.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        gpt2.from_pretrained(tmp_path / "junk.safetensors")


def logits(model, idx):
    return model.logits(model(idx))


def test_logits_match_transformers_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=128, n_layer=2,
                                                              n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = gpt2.from_pretrained(tmp_path / "model.safetensors").eval()
    idx = torch.randint(97, (2, 30))
    torch.testing.assert_close(logits(ours, idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


def gpt2_config(model, **changes):
    c = model.config
    return {"model_type": "gpt2", "n_head": c.n_head, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_positions": c.block_size,
            "vocab_size": c.vocab_size, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", **changes}


@pytest.fixture
def narrow_heads():
    """A GPT-2 whose heads are not 64 wide (4 heads of 16), as distilled and tiny GPT-2s are."""
    torch.manual_seed(1)
    return GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=64)).eval()


def test_config_json_gives_heads_that_are_not_64_wide(narrow_heads, tmp_path):
    save_file(gpt2_layout(narrow_heads), tmp_path / "model.safetensors")
    said = []
    guessed = gpt2.from_pretrained(tmp_path / "model.safetensors", log=said.append).eval()
    assert guessed.config.n_head == 1 and "no GPT-2 config.json" in said[0]  # the old inference, and it says so
    idx = torch.randint(97, (2, 20))
    assert not torch.allclose(logits(guessed, idx), logits(narrow_heads, idx), atol=1e-3)  # ... which is wrong for this model
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config(narrow_heads)))
    loaded = gpt2.from_pretrained(tmp_path / "model.safetensors", log=said.append).eval()
    assert loaded.config.n_head == 4 and len(said) == 1
    torch.testing.assert_close(logits(loaded, idx), logits(narrow_heads, idx))


@pytest.mark.parametrize("change,message", [
    (dict(activation_function="relu"), "activation_function 'relu' is not GPT-2's tanh GELU"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon 1e-06 is not GPT-2's 1e-5"),
    (dict(n_head=5), "n_head is 5, not a whole divisor of n_embd=64"),
    (dict(n_inner=100), "n_inner 100 is not 4 * n_embd"),
    (dict(n_embd=128), "n_embd is 128 but the weights say 64"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not what this GPT computes"),
])
def test_what_our_gpt_cannot_represent_is_refused(narrow_heads, tmp_path, change, message):
    save_file(gpt2_layout(narrow_heads), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config(narrow_heads, **change)))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        gpt2.from_pretrained(tmp_path / "model.safetensors")
    assert "\n" not in str(e.value)


def test_logits_match_transformers_gpt2_with_narrow_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2,
                                                              n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)  # writes config.json beside model.safetensors
    ours = gpt2.from_pretrained(tmp_path / "model.safetensors").eval()
    idx = torch.randint(97, (2, 30))
    assert ours.config.n_head == 4
    torch.testing.assert_close(logits(ours, idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_pipeline_starts_from_local_pretrained_weights(tiny_copy):
    """--init_from: SFT starts from a GPT-2-layout file (here random, with the run's vocabulary)."""
    torch.manual_seed(0)
    pretrained = GPT(GPTConfig(block_size=128, vocab_size=300, n_layer=2, n_head=1, n_embd=64))
    save_file(gpt2_layout(pretrained), tiny_copy / "model.safetensors")
    proc = run_train(tiny_copy, f"--init_from={tiny_copy / 'model.safetensors'}", "--stage=sft")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ck = runtime.load_checkpoint(tiny_copy / "sft.pt")
    assert ck["model_args"]["n_layer"] == 2 and ck["model_args"]["block_size"] == 96  # cropped from 128
    wrong = GPT(GPTConfig(block_size=128, vocab_size=301, n_layer=1, n_head=1, n_embd=64))
    save_file(gpt2_layout(wrong), tiny_copy / "wrong.safetensors")
    proc = run_train(tiny_copy, f"--init_from={tiny_copy / 'wrong.safetensors'}", "--stage=sft")
    assert proc.returncode == 2 and "vocab_size is 301 but the tokenizer has 300 tokens" in proc.stderr


def test_gpt2_tokenizer_offline_fails_fast_and_says_what_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(files.DataError) as e:
        data.gpt2_tokenizer(str(tmp_path / "gpt2"))
    message = str(e.value)
    assert "vocab.bpe and encoder.json are missing" in message and "python -m tools.prepare gpt2" in message
    assert "\n" not in message
    assert not (tmp_path / "empty-cache").exists() and not (tmp_path / "gpt2").exists()  # nothing was fetched or written


def made_up_tokenizer(vocab_size=400):
    """A BPE trained on a little of the built-in task's text: GPT-2's file format at a test's size."""
    text = "\n".join(r["prompt"] + r["response"] for r in reviews.builtin_task(0, 200, 0, 0, 0, 0)["sft"])
    return data.train_bpe(text, vocab_size), text


def test_gpt2_files_build_the_tokenizer_tiktoken_builds_from_them(tmp_path, monkeypatch):
    """Our reader of vocab.bpe and encoder.json against tiktoken's own loader of the same files (local
    paths; an empty TIKTOKEN_CACHE_DIR turns its cache off), and against the tokenizer they were written from."""
    import tiktoken.load
    enc, text = made_up_tokenizer()
    data.write_gpt2_files(enc, tmp_path)
    ours = data.gpt2_tokenizer(str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert ours._mergeable_ranks == tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))
    assert ours.n_vocab == enc.n_vocab and ours.eot_token == ours.n_vocab - 1 and ours.name == "gpt2"
    sample = text[:3000] + " naïve ☃ \x00 12345"
    pieces = lambda e: [e.decode_single_token_bytes(t) for t in e.encode_ordinary(sample)]  # noqa: E731
    assert pieces(ours) == pieces(enc) and ours.decode(ours.encode_ordinary(sample)) == sample


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "vocab.bpe").write_text("#version: 0.2\nab\n"), "vocab.bpe:2: expected a merge of two tokens"),
    (lambda d: (d / "vocab.bpe").write_text("#version: 0.2\na \x7f\n"), "vocab.bpe:2: '\\x7f' is not a character"),
    (lambda d: (d / "encoder.json").write_text('{"a": 5}'), "encoder.json: token \"a\" has id 5, but vocab.bpe gives it"),
    (lambda d: (d / "encoder.json").write_text("[1]"), "encoder.json: expected a JSON object, got list"),
])
def test_gpt2_files_that_do_not_fit_are_one_line_errors(tmp_path, damage, message):
    data.write_gpt2_files(made_up_tokenizer(300)[0], tmp_path)
    damage(tmp_path)
    with pytest.raises(files.DataError) as e:
        data.gpt2_tokenizer(str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


# ---- export: a policy back out in GPT-2's layout

def test_an_exported_model_reads_back_with_the_same_logits(narrow_heads, tmp_path):
    gpt2.save_pretrained(narrow_heads, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_head"] == 4 and config["activation_function"] == "gelu_new"
    back = gpt2.from_pretrained(tmp_path / "out" / "model.safetensors").eval()
    idx = torch.randint(97, (2, 20))
    torch.testing.assert_close(logits(back, idx), logits(narrow_heads, idx))
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_an_exported_model_gives_transformers_the_same_logits(narrow_heads, tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2.save_pretrained(narrow_heads, tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits(narrow_heads, idx), atol=1e-4, rtol=1e-4)


def export(*args):
    return subprocess.run([sys.executable, "-m", "tools.gpt2", "export", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.slow
def test_a_trained_policy_is_exported_by_command(tiny_run, tmp_path):
    proc = export(tiny_run[0] / "policy_vcb.pt", tmp_path / "vcb")
    assert proc.returncode == 0, proc.stderr
    ck = runtime.load_checkpoint(tiny_run[0] / "policy_vcb.pt")
    ours = GPT(GPTConfig(**ck["model_args"]))
    ours.load_state_dict(ck["model"])
    back = gpt2.from_pretrained(tmp_path / "vcb" / "model.safetensors")
    idx = torch.randint(ours.config.vocab_size, (2, 16))
    torch.testing.assert_close(back.eval()(idx), ours.eval()(idx))
    bad = export(tmp_path / "none.pt", tmp_path / "x")
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr and "Traceback" not in bad.stderr
