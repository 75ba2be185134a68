"""cli: subcommands are imported only when chosen, so one broken module cannot break the rest."""

from __future__ import annotations

import pytest

from tele_exporter import cli


def test_a_broken_subcommand_module_does_not_break_the_others(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", ("tele_exporter.does_not_exist", "a broken plug-in"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--steps" in capsys.readouterr().out
    with pytest.raises(ModuleNotFoundError):
        cli.main(["broken"])


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("generate", *cli.SUBCOMMANDS))
