"""labels: names Prometheus refuses fail where configured, naming the label; odd values survive a real scrape."""

from __future__ import annotations

import pytest

from tele_exporter import Telemetry, serve
from tele_exporter.catalog.labels import check_label_names

from ..conftest import TinyPolicy, backward
from ..support.servers import poll, prometheus_config, start_prometheus


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["__name__"], r"label '__name__' starts with '__'"),
        (["__meta_x"], r"label '__meta_x' starts with '__'"),
        (["rün"], r"label 'rün' is not a label name"),
        (["a-b"], r"label 'a-b' is not a label name"),
        (["1a"], r"label '1a' is not a label name"),
        ([""], r"label '' is not a label name"),
        (["job"], r"label 'job' is reserved"),
        (["run", "run"], r"label 'run' is given twice"),
        ([7], r"label 7 is a int, not a string"),
    ],
)
def test_names_prometheus_refuses_are_named(names: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_label_names(names)


def test_valid_names_pass() -> None:
    check_label_names(["run", "_x", "Rank_2", "a_"])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"__name__": "x"}, r"const label '__name__' starts with '__'"),
        ({"rün": "a", "r_n": "b"}, r"const label 'rün' is not a label name"),
        ({"head": "x"}, r"const label 'head' clashes with a label of a catalog metric"),
        ({"job": "x"}, r"const label 'job' is reserved"),
    ],
)
def test_const_labels_prometheus_refuses_fail_at_construction(
    policy: TinyPolicy, labels: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Telemetry(policy, heads={"op": policy.op}, const_labels=labels)


ODD = 'quote " back\\slash\nnewline ünï €{}=, '


@pytest.mark.servers
def test_odd_but_valid_label_values_reach_a_real_prometheus_unchanged(policy: TinyPolicy) -> None:
    tele = Telemetry(policy, heads={ODD: policy.op, "slot": policy.slot}, const_labels={"run": ODD})
    try:
        with tele.update() as upd:
            backward(policy)
            upd.clip_grad_norm_(0.5)
        with serve(tele, port=0) as server, start_prometheus(prometheus_config([server.base_url[7:]])) as prom:
            result = poll(lambda: prom.query("tele_head_grad_norm_prev"), 60, what="a scraped series")
            targets = prom.api("/api/v1/targets")["data"]["activeTargets"]
    finally:
        tele.close()
    assert [t["health"] for t in targets] == ["up"], targets
    heads = {r["metric"]["head"] for r in result}
    assert heads == {ODD, "slot"}
    assert {r["metric"]["run"] for r in result} == {ODD}
