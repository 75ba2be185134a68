"""bench: the benchmark runs all three variants on the same model and reports ratios to plain."""

from __future__ import annotations

from tele_exporter.bench import report, run_bench


def test_bench_reports_every_variant_against_plain() -> None:
    result = run_bench(steps=2, rounds=2, hidden=16, batch=8, device="cpu")
    assert [v.name for v in result.variants] == ["plain", "telemetry", "naive"]
    assert all(len(v.step_seconds) == 2 and len(v.clip_seconds) == 2 for v in result.variants)
    assert len(result.publish_seconds) == 2
    text = report(result)
    assert text.splitlines()[1].split()[2] == "1.000"  # plain against itself
    assert "update with publish / plain update" in text
