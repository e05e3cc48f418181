"""CleanupManager and the offline pipeline stages."""

from __future__ import annotations

import pytest

from tasks import stages
from tasks.cleanup import CleanupManager


def test_cleanup_runs_in_reverse_and_collects_errors(tmp_path):
    order = []
    cleanup = CleanupManager()
    workdir = cleanup.temp_dir(tmp_path / "work")
    scratch = cleanup.temp_file(dir=tmp_path)
    cleanup.register(lambda: order.append("first"), "first")
    cleanup.register(lambda: 1 / 0, "divide")
    cleanup.register(lambda: order.append("last"), "last")
    (workdir / "x.txt").write_text("x")
    errors = cleanup.run()
    assert order == ["last", "first"]
    assert errors == ["divide: ZeroDivisionError: division by zero"]
    assert not workdir.exists() and not scratch.exists()
    assert cleanup.run() == []  # once only


def test_stages_are_deterministic_and_real():
    doc = "  Alpha beta gamma.  Beta gamma delta!  Completely unrelated sentence here?  "
    first = stages.analyze_local(stages.embed(stages.parse(doc)))
    second = stages.analyze_local(stages.embed(stages.parse(doc)))
    assert first == second
    assert first["sentences"] == 3
    assert "beta" in first["keywords"] and "gamma" in first["keywords"]
    assert first["summary"].startswith("Alpha beta gamma.")


@pytest.mark.parametrize("doc", ["", "   \n\t ", None])
def test_empty_document_fails_at_parse(doc):
    with pytest.raises(stages.EmptyDocument):
        stages.parse(doc)
