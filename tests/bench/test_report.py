"""docs/RESULTS.md is rendered from the benchmark JSON in results/: every figure on the page is
one of the JSON's, the GPU check's section included."""

import json
import shutil
from pathlib import Path

from engram_ray.bench.report import write_results

RESULTS = Path(__file__).resolve().parents[2] / "results"


def test_page_holds_every_report_and_the_gpu_check(tmp_path):
    page = write_results(RESULTS, tmp_path / "RESULTS.md").read_text()
    for title in ("## Offload", "## Lookup data plane", "## Lookup latency vs table size", "## Load",
                  "## Recovery", "## Hashing throughput", "## Experiment: sparsity allocation",
                  "## Experiment: iso-parameter", "## Analysis: LogitLens and CKA", "## Overlap"):
        assert title in page
    cpu = json.loads((RESULTS / "offload.json").read_text())
    o = cpu["overhead"]["decode:remote_vs_local"]
    assert f"| remote vs local | {100 * cpu['overhead']['prefill:remote_vs_local']:+.1f} % | {100 * o:+.1f} %" in page
    gpu = json.loads((RESULTS / "gpu" / "offload.json").read_text())
    section = page[page.index("## On a GPU"):]
    assert gpu["device"] in section and "### Offload on the GPU" in section
    assert f"{100 * gpu['overhead']['serving:remote_vs_local']:+.1f} %" in section
    assert f"Engram at layers {gpu['engram']['layer_ids']} of {gpu['model']['n_layers']}" in section


def test_a_report_from_before_stage_s_and_off_cpu_s_says_so(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    r = json.loads((RESULTS / "offload.json").read_text())
    for b in r["breakdown"].values():
        b.pop("stage_s", None)
        b.pop("off_cpu_s", None)
        b.pop("memory_busy_s", None)
    (folder / "offload.json").write_text(json.dumps(r))
    shutil.copy(RESULTS / "offload.png", folder / "offload.png")
    page = write_results(folder, tmp_path / "RESULTS.md").read_text()
    rows = [ln for ln in page.splitlines() if ln.startswith("| prefill:remote |")]
    assert rows and rows[0].endswith("| n/a | n/a | n/a |")
    assert "## On a GPU" not in page  # no results/gpu here: no section
