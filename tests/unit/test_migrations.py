"""The partitioning helpers are written out in both components' converting migrations (ltm 006, memory 004): each
component migrates its own database and either may run first, and a migration cannot include another file. This
keeps the two copies the same."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "services" / "ltm" / "migrations" / "006_partition_by_user.sql",
         ROOT / "services" / "memory" / "migrations" / "004_partition_by_user.sql"]


def helpers(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    return {m.group(1): m.group(0)
            for m in re.finditer(r"CREATE OR REPLACE FUNCTION pg_temp\.(\w+)\(.*?\$\$;", text, re.S)}


def test_both_converting_migrations_carry_the_same_helpers() -> None:
    ltm, memory = (helpers(f) for f in FILES)
    assert set(ltm) == {"mesh_partition_count", "mesh_partitioned", "mesh_repartition"}
    assert ltm == memory, "ltm 006 and memory 004 define the pg_temp helpers differently: keep them in step"
