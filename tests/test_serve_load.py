"""bench/load.py (the load test of `dreambooth serve`, developer tooling) runs end to end on the tiny model: every
phase is reported, nothing but 200 (and 429 queue_full with Retry-After under overload) came back, and the small
queue did refuse. Timings are the committed results' business (docs/serve-load.md), not this test's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from serving_support import characters_file

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "load.py")
load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(load)

METRICS_BEFORE = """# HELP dreambooth_requests_total HTTP requests by endpoint and outcome.
dreambooth_requests_total{endpoint="/v1/render",outcome="ok"} 3.0
dreambooth_batch_size_bucket{le="1.0"} 2.0
dreambooth_batch_size_bucket{le="2.0"} 3.0
dreambooth_batch_size_bucket{le="+Inf"} 3.0
dreambooth_batch_size_count 3.0
dreambooth_images_total 4.0
"""
METRICS_AFTER = """dreambooth_requests_total{endpoint="/v1/render",outcome="ok"} 9.0
dreambooth_requests_total{endpoint="/v1/render",outcome="queue_full"} 5.0
dreambooth_requests_total{endpoint="/metrics",outcome="ok"} 7.0
dreambooth_batch_size_bucket{le="1.0"} 3.0
dreambooth_batch_size_bucket{le="2.0"} 6.0
dreambooth_batch_size_bucket{le="+Inf"} 6.0
dreambooth_batch_size_count 6.0
dreambooth_images_total 9.0
dreambooth_cache_lookups_total{result="hit"} 2.0
"""


def test_helpers_count_batches_statuses_and_memory_slope():
    delta = load.metrics_delta(load.parse_metrics(METRICS_BEFORE), load.parse_metrics(METRICS_AFTER))
    assert delta["batch_sizes"] == {"1": 1, "2": 2} and delta["batches"] == 3 and delta["images_drawn"] == 5
    assert delta["render_outcomes"] == {"ok": 6, "queue_full": 5} and delta["cache_lookups"] == {"hit": 2}
    tally = load.Tally({"200", "429 queue_full"})
    for status in ("200", "429 queue_full", "500 internal"):
        tally.add(status, 0.1)
    tally.retry_after_missing += 1  # a 429 without Retry-After counts as unexpected too
    assert tally.unexpected() == 2 and tally.problems == ["unexpected answer 500 internal"]
    assert load.least_squares_slope([(0, 100.0), (100, 101.0), (200, 102.0)]) == 0.01
    assert load.least_squares_slope([(5, 1.0), (5, 2.0)]) is None
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and load.percentile([], 50) is None


def test_quick_load_run_reports_every_phase_without_unexpected_answers(tiny_model, tmp_path):
    characters = characters_file(tmp_path, tiny_model)
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--characters", str(characters),
                           "--quick", "--out", str(out)], capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["problems"] == [] and result["character"] == "dog"
    phases = result["phases"]
    assert set(phases) == {"steady", "overload", "soak", "cache"}
    for name in ("steady", "soak"):
        assert phases[name]["unexpected"] == 0
        assert set(phases[name]["statuses"]) == {"200"} and phases[name]["requests"] > 0
        assert phases[name]["server"]["images_drawn"] > 0 and phases[name]["server"]["batch_sizes"]
    assert phases["soak"]["requests"] == 24 and phases["soak"]["x_cache"].get("hit", 0) > 0
    assert phases["soak"]["rss_mb"]["start_after_warmup"] > 0 and phases["soak"]["rss_mb"]["peak_sampled"] > 0
    overload = phases["overload"]
    assert set(overload["statuses"]) <= {"200", "429 queue_full"} and overload["statuses"].get("429 queue_full")
    assert overload["retry_after_missing"] == 0 and sum(overload["retry_after_s"].values()) == \
        overload["statuses"]["429 queue_full"]
    assert phases["cache"]["unexpected"] == 0 and phases["cache"]["x_cache_warnings"] == []
    for server in result["servers"].values():
        assert server["exit_code"] is not None and not server["died_during_run"] and server["samples"] > 0
        assert Path(server["log"]).is_file()
    assert "verdict: OK" in done.stdout


def test_the_replicas_figures_on_the_ray_gateways_page_add_up_as_one_servers():
    """serve --ray's /metrics labels each replica's samples: summed, they are what one server's page would say."""
    def per_replica(text: str) -> str:
        lines = []
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            name, value = line.rsplit(" ", 1)
            name, _, labels = name.partition("{")
            for replica, share in (("r1", 0.25), ("r2", 0.75)):
                inner = f'replica="{replica}"' + ("," + labels.rstrip("}") if labels else "")
                lines.append(f"{name}{{{inner}}} {float(value) * share}")
        return "\n".join(lines)

    one = load.metrics_delta(load.parse_metrics(METRICS_BEFORE), load.parse_metrics(METRICS_AFTER))
    two = load.metrics_delta(load.parse_metrics(per_replica(METRICS_BEFORE)),
                             load.parse_metrics(per_replica(METRICS_AFTER)))
    assert two == one


def test_a_server_that_does_not_start_fails_the_run(tmp_path):
    """The run says so and exits 2 rather than reporting empty phases as a pass."""
    bad = tmp_path / "characters.yaml"
    bad.write_text("characters: []\n")
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--characters", str(bad), "--quick",
                           "--out", str(out), "--start-timeout", "60"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert not result["ok"] and result["problems"]
