"""A real demo run serving the page, paused between updates, and what a browser shows of it.

The demo trainer runs in-process behind the exporter's own server (the one
`tele-exporter demo` starts). Between updates nothing changes, so the page, its
screenshot and /api/snapshot all show the same update.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tele_exporter.demo import DemoConfig, FaultPlan, Trainer
from tele_exporter.server.http import Server, serve

from .cdp import Chromium
from .png import dominant_hue

PAGE_TIMEOUT_S = 30.0
# Elements whose colour carries a status, by panel.
COLOURED = {"kl": "#kl-value", "grad": "#grad-pre", "cv": "#cv-text"}

_STATE_JS = """(() => {
  const panel = (id) => document.getElementById("panel-" + id).dataset.status;
  return {
    updates: Number(document.body.dataset.updates),
    panels: {
      kl: panel("kl"), grad: panel("grad"), cv: panel("cv"), heads: panel("heads"), seeds: panel("seeds"),
      entropy: panel("entropy"), health: panel("health"),
    },
    hidden: { health: document.getElementById("panel-health").hidden },
    dead: (() => {
      const table = document.getElementById("dead-layers"), tr = table.querySelector("tr");
      return { hidden: table.hidden, value: tr.querySelector(".value").textContent,
               label: tr.querySelector(".level").textContent, status: tr.dataset.status,
               detail: tr.querySelector(".detail").textContent };
    })(),
    // panels whose content is wider than the panel (cut off, or scrolled out of sight)
    overflowing: [...document.querySelectorAll("section.panel")]
      .filter((el) => !el.hidden && el.scrollWidth > el.clientWidth + 1).map((el) => el.id),
    header: [...document.querySelectorAll("header .fact")].map((el) => el.textContent),
    text: {
      kl: document.getElementById("kl-label").textContent,
      grad: document.getElementById("grad-label").textContent,
      cv: document.getElementById("cv-text").textContent,
      entropy: document.getElementById("entropy-label").textContent,
      velocity: document.getElementById("entropy-velocity").textContent,
    },
    values: {
      kl: document.getElementById("kl-value").textContent,
      grad: document.getElementById("grad-pre").textContent,
    },
    captions: {
      kl: document.getElementById("kl-range").textContent,
      grad: document.getElementById("grad-range").textContent,
      entropy: document.getElementById("entropy-range").textContent,
    },
    flat: {
      kl: document.getElementById("kl-spark").dataset.flat, grad: document.getElementById("grad-spark").dataset.flat,
      entropy: document.getElementById("entropy-spark").dataset.flat,
    },
    health: [...document.querySelectorAll("#panel-health tbody tr")].map((tr) => ({
      signal: tr.dataset.signal, head: tr.dataset.head || null, status: tr.dataset.status,
      value: tr.children[1].textContent, label: tr.children[2].textContent, detail: tr.children[3].textContent,
    })),
    spark: {
      kl: Number(document.getElementById("kl-spark").dataset.points),
      grad: Number(document.getElementById("grad-spark").dataset.points),
      entropy: Number(document.getElementById("entropy-spark").dataset.points),
    },
    heads: [...document.querySelectorAll("#heads tr")].map((tr) => ({
      name: tr.dataset.head, kind: tr.dataset.kind, trend: tr.dataset.trendStatus, arrow: tr.children[3].textContent,
      status: tr.dataset.status, currentColour: tr.children[1].className,
      current: tr.children[1].textContent, label: tr.children[0].textContent,
      state: tr.dataset.state, stateText: tr.children[5].textContent, stateColour: tr.children[5].className,
      entropy: tr.children[6].textContent, entropyStatus: tr.dataset.entropyStatus,
    })),
    seeds: [...document.querySelectorAll("#seed-rows tr")].map((tr) => ({
      env: tr.dataset.env, slot: tr.dataset.slot, status: tr.dataset.status,
      label: tr.children[2].textContent, bold: getComputedStyle(tr.children[2]).fontWeight,
      gain: tr.children[3].textContent,
    })),
  };
})()"""


@dataclass
class Shot:
    """What the browser showed of one update, next to the document it was rendered from."""

    document: dict[str, Any]
    state: dict[str, Any]
    hues: dict[str, str | None]
    errors: list[str]
    png: bytes


@contextmanager
def demo_run(
    fault: str = "none", updates: int = 3, fault_after: int = 0, seed: int = 0
) -> Iterator[tuple[Trainer, Server]]:
    """A demo trainer that has run `updates` updates, serving /, /metrics and /api/snapshot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `tele-exporter demo` does
    trainer = Trainer(DemoConfig(updates=updates, seed=seed, fault=FaultPlan(fault, fault_after)))
    server = serve(trainer.tele, port=0)
    try:
        trainer.run()
        yield trainer, server
    finally:
        server.close()
        trainer.close()
        torch.set_num_threads(threads)


def snapshot_document(server: Server) -> dict[str, Any]:
    """GET /api/snapshot as strict JSON (a bare NaN would raise)."""
    with urllib.request.urlopen(server.base_url + "/api/snapshot", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read(), parse_constant=_reject)
    return data


def _reject(token: str) -> None:
    raise ValueError(f"non-JSON constant {token} in /api/snapshot")


def capture(browser: Chromium, server: Server, full_page: bool = True) -> Shot:
    """Open the page, wait until it shows the trainer's latest update, read it and screenshot it."""
    document = snapshot_document(server)
    updates = document["snapshot"]["updates"]
    tab = browser.open(server.base_url + "/")
    tab.wait_for(f"Number(document.body.dataset.updates) === {updates}", PAGE_TIMEOUT_S)
    state = tab.evaluate(_STATE_JS)
    hues = {panel: dominant_hue(tab.screenshot(selector)) for panel, selector in COLOURED.items()}
    png = tab.screenshot(full_page=full_page)
    return Shot(document, state, hues, tab.errors(), png)
