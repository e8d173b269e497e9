"""`disagg-serve profile` on the demo model: a real vLLM engine in a Ray actor, a small grid;
the file names the hardware, model and vLLM version, and the fitted step-cost model explains
the measured steps."""

from __future__ import annotations

import json
import subprocess
import sys

from cluster.planner.profile import Profile, fit_summary
from tests.integration.support import REPO


def test_profile_command_writes_a_usable_profile(target_model, tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "cluster.entrypoints.cli", "profile", "--quick", "--model",
                           target_model, "--out", str(out), "--no-progress"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fit TP 1" in proc.stdout and f"wrote {out}" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["vllm_version"].startswith("0.32") and doc["hardware"]["cores"] >= 1
    assert doc["model"]["path"] == target_model and doc["model"]["layers"] >= 1
    profile = Profile.load(out)
    par = profile.at(1)
    kinds = {(s.prefill_tokens > 0, s.decode_seqs > 0) for s in par.samples}
    assert kinds == {(True, False), (False, True), (True, True)}  # prefill, decode and mixed steps
    assert fit_summary(profile)[1]["median_rel_error"] < 0.25
    assert profile.contention.pair_slowdown >= 1.0 and profile.kv_bandwidth_bytes_per_s > 0
    # A longer prompt costs more; a bigger decode batch costs more.
    assert par.cost.prefill_seconds(512) > par.cost.prefill_seconds(64)
    assert par.cost.decode_seconds(32, 256) > par.cost.decode_seconds(1, 256)
