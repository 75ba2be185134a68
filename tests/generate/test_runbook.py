"""The generated runbook: a section for every alert, the anchors runbook_url points to."""

from __future__ import annotations

import re

from tele_exporter.catalog import default_catalog
from tele_exporter.generate import rules, runbook


def _text() -> str:
    return runbook.files(default_catalog())[runbook.PATH]


def test_every_runbook_url_points_at_a_section() -> None:
    text = _text()
    headings = {rules.anchor(h) for h in re.findall(r"^## (\S+)$", text, flags=re.M)}
    for rule in rules.alert_rules(default_catalog()):
        anchor = rules.runbook_url(default_catalog(), rule.name).split("#", 1)[1]
        assert anchor in headings, rule.name


def test_sections_carry_the_tele_text_and_thresholds() -> None:
    text = _text()
    catalog = default_catalog()
    for spec in catalog:
        for level in spec.levels:
            if level.alert is not None:
                assert spec.question in text
                assert f"`{level.when}`" in text
    assert "TELE-111" in text and "TELE-557" in text


def test_every_alert_has_advice() -> None:
    names = {r.name for r in rules.alert_rules(default_catalog())}
    assert names <= set(runbook.ADVICE)


def test_grad_norm_section_explains_pre_versus_post_clip() -> None:
    section = _text().split("## TeleGradNormHigh", 1)[1].split("\n## ", 1)[0]
    assert "Pre- vs post-clip" in section
    assert 'clip="pre"' in section
