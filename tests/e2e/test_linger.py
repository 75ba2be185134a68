"""serve(linger=...): a real Prometheus gets the final update of a run that ends between two scrapes."""

from __future__ import annotations

import pytest

from tele_exporter import Telemetry, serve
from tests.conftest import TinyPolicy, backward
from tests.support.servers import free_port, poll, prometheus_config, start_prometheus


@pytest.mark.slow
def test_close_lingers_until_prometheus_has_scraped_the_final_update(policy: TinyPolicy, tele: Telemetry) -> None:
    port = free_port()
    server = serve(tele, port=port, linger=30)
    with start_prometheus(prometheus_config([f"127.0.0.1:{port}"], interval="2s")) as prom:
        poll(lambda: prom.query('up{job="tele"} == 1'), timeout=30, what="first scrape")
        for u in range(3):  # the run ends right after a scrape: its last updates are not scraped yet
            with tele.update() as upd:
                backward(policy, seed=u)
                upd.clip_grad_norm_(0.5)
        assert server.close() is True
        (result,) = poll(
            lambda: prom.query('max_over_time(tele_ppo_updates_total{job="tele"}[5m]) == 3'),
            timeout=15,
            what="the final update in Prometheus",
        )
        assert float(result["value"][1]) == 3
