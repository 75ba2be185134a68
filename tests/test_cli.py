"""cli: subcommands are imported only when chosen, so one broken module cannot break the rest."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize("argv", [["generate"], ["generate", "--check"]])
def test_generate_outside_a_checkout_refuses_and_writes_nothing(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "not in a tele-exporter checkout" in err and "--root" in err, err
    assert list(tmp_path.iterdir()) == []


def test_generate_check_names_missing_files_missing_not_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "--check", "--root", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("missing: ") for line in lines), lines
    assert cli.main(["generate", "--root", str(tmp_path)]) == 0
    (tmp_path / "docs" / "runbook.md").write_text("edited\n", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["generate", "--check", "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == ["stale: docs/runbook.md (run `tele-exporter generate`)"]
