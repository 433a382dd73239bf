"""bench.py runs and reports each measurement (speed targets are read from its output, not asserted)."""
import bench


def test_bench_runs_every_measurement_on_a_tiny_preset(monkeypatch, capsys):
    monkeypatch.setitem(bench.PRESETS, "tiny", dict(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=64,
                                                    batch=8, seq_len=16, sample_batch=2, prompt_len=4, steps=2))
    bench.main(["--preset=tiny", "--new_tokens=8", "--n_candidates=4"])
    out = capsys.readouterr().out
    for text in ("matmul peak (measured", "train:", "MFU", "KV cache", "same tokens", "align (VCB) step vs SFT step",
                 "| sft |", "| eval |"):
        assert text in out
