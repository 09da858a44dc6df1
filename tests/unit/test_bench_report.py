"""The README's lines on where the CPU went (mesh/bench_report.py), from a result file's CPU meters."""

from __future__ import annotations

from mesh.bench_report import _cpu_lines


def test_cpu_lines_name_each_run_with_its_processes_busiest_first() -> None:
    cpu = {"cores": {"bench": 0.05, "ltm": 0.62, "memory": 0.57, "postgres": 0.45}, "cores_total": 1.69,
           "of_which_children": {"ltm.children": 0.21}}
    results = {"mesh": {"chat": {"turns_per_s": 70.1, "cpu": cpu}},
               "ingest": {"short": {"1": {"per_s": 166.0, "cpu": {"cores": {"ltm": 1.24}, "cores_total": 1.24}},
                                    "2": {"per_s": 214.0}, "updates": 2760},
                          "vectors_used": {"1": 4760}}}
    lines = _cpu_lines(results)
    assert lines[2] == ("- chat burst (70.1 turns/s): ltm 0.62 (its children 0.21), memory 0.57, postgres 0.45, "
                        "bench 0.05; 1.69 in all")
    assert lines[3] == "- ingest, short turns, 1 ltm process (166 updates/s): ltm 1.24; 1.24 in all"
    assert len(lines) == 5  # no line for the run without a meter


def test_no_cpu_figures_no_lines() -> None:
    assert _cpu_lines({"mesh": {"chat": {"turns_per_s": 1.0}}}) == []
