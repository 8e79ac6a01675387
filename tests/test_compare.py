"""`dreambooth compare`: both methods train on the same data and every column is measured."""

import json

from dreambooth.evaluation.compare import run_compare


def test_compare_measures_both_methods(tiny_model, instance_dir, tmp_path):
    results = run_compare(tmp_path / "cmp", model=tiny_model, instance_dir=instance_dir, steps=3, resolution=64,
                          rank=2, learning_rates={"full": 1e-3, "lora": 1e-2})
    by_method = {r["method"]: r for r in results}
    assert set(by_method) == {"full", "lora"}
    full, lora = by_method["full"], by_method["lora"]
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 10
    assert lora["output_bytes"] < full["output_bytes"] / 10
    for r in results:
        assert r["s_per_step_median"] > 0 and r["peak_rss_mb"] > 50
        assert r["subject_mse"] > 0 and r["subject_mse_base"] > 0
        assert r["subject_mse"] != r["subject_mse_base"]  # training changed the model
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert table.count("\n") == 4 and "| lora |" in table
    assert json.loads((tmp_path / "cmp" / "results.json").read_text()) == results
