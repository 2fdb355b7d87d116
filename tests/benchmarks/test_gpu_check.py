"""benchmarks/gpu_check.py --tiny runs on CPU and its rows hold together: FlexAttention matches SDPA
on packed documents, and the loss implementations train to the same loss."""

from benchmarks.gpu_check import main


def test_gpu_check_tiny_runs_on_cpu_and_its_variants_agree(capsys):
    rows = main(["--tiny", "--no-compile", "--repeats", "1"])
    table = capsys.readouterr().out
    assert "| sdpa |" in table and "| fused |" in table and "batch 8" in table
    attention = {r["name"]: r for r in rows if r["section"] == "attention"}
    assert attention["sdpa"]["max_abs_diff_out"] == 0 and attention["flex"]["max_abs_diff_out"] < 1e-5
    training = {r["name"]: r for r in rows if r["section"] == "training"}
    assert abs(training["fused"]["loss"] - training["chunked"]["loss"]) < 1e-4  # same steps, same batch
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in training.values())
    decode = [r for r in rows if r["section"] == "decode"]
    assert [r["name"] for r in decode] == ["batch 1", "batch 8", "continuous batch 8, 16 requests"]
    assert all(1 < r["mean_passes"] < 4 for r in decode)
    # skip vs dense, pass-asynchronous vs lock-step, continuous batching vs the fixed batch
    assert all(r["tokens_equal"] for r in decode)
