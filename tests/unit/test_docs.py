"""The README's configuration table is the code's: every setting described, none stale."""

from __future__ import annotations

from mesh import configdoc


def test_every_setting_has_a_description() -> None:
    undescribed = [var for var, _d, _s, desc in configdoc.rows() if not desc]
    assert not undescribed, f"describe these in their Field or in mesh/configdoc.py: {undescribed}"


def test_readme_table_is_current() -> None:
    readme = configdoc.README.read_text(encoding="utf-8")
    assert configdoc.render(readme) == readme, "run `python -m mesh config --write`"
