"""The margin you can see: d = s_ij - s_ii quantiles and the share inside the hinge, against the plain formula;
`loss.margin=auto` chooses m at w0 and OSR logs where d sits."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import load_config
from engine.objectives.margin import DistanceHistogram, auto_margin, margin_diagnostics, pair_distances
from engine.trainer import Trainer
from tests.helpers.jobs import job


def naive_d(f, g):
    """Every d of the batch from the plain definition: both anchor directions, j != i."""
    s = f @ g.T
    n = s.shape[0]
    out = []
    for i in range(n):
        for j in range(n):
            if j != i:
                out.append(float(s[i, j] - s[i, i]))  # image anchor i
                out.append(float(s[j, i] - s[i, i]))  # text anchor i
    return np.array(out)


def identity(x):
    return x


def test_distances_split_over_ranks_match_the_plain_formula():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=1)
    g = F.normalize(f + 0.5 * torch.randn(12, 8, dtype=torch.float64), dim=1)
    expected = np.sort(naive_d(f, g))
    # Two ranks of 6 rows: each gathers the whole batch (images, then texts) and holds its own anchors' d.
    parts = []
    for r in range(2):
        gathered = iter([f.float(), g.float()])
        parts.append(pair_distances(f[r * 6:(r + 1) * 6], g[r * 6:(r + 1) * 6], offset=r * 6,
                                    gather=lambda _, it=gathered: next(it)))
    got = np.sort(torch.cat(parts).double().numpy())
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_quantiles_share_inside_and_auto_margin_against_numpy():
    torch.manual_seed(1)
    f = F.normalize(torch.randn(32, 16), dim=1)
    g = F.normalize(f + 0.7 * torch.randn(32, 16), dim=1)
    d = pair_distances(f, g, offset=0, gather=identity)
    reference = naive_d(f.double(), g.double())
    hist = DistanceHistogram()
    stats = margin_diagnostics(d, margin=0.1, reduce_sum=identity, histogram=hist)
    assert stats["inside_hinge"] == pytest.approx(np.mean(reference > -0.1), abs=1e-6)
    bin_width = 4.0 / 1600
    for q in (0.05, 0.5, 0.95):
        assert abs(stats[f"d_q{round(100 * q):02d}"] - np.quantile(reference, q)) <= 2 * bin_width
    m = auto_margin(hist, inside_share=0.2)
    assert np.mean(reference > -m) == pytest.approx(0.2, abs=0.01)


def test_margin_auto_is_chosen_at_w0_used_by_osr_and_written_in_the_summary(shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(base=job(shards, out, data={"batch_size": 16}, loss={"margin": "auto", "margin_inside_share": 0.7,
                                                                          "margin_probe_batches": 2},
                               run={"log_every": 1, "max_steps_per_epoch": 2}))
    trainer = Trainer(cfg)
    trainer.tune()
    chosen_margin = trainer.objective.term("contrastive").margin
    trainer.close()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    chosen = next(r for r in log if r["event"] == "margin_chosen")
    assert chosen["margin"] == chosen_margin > 0
    osr_steps = [r for r in log if r["event"] == "step" and r["stage"] == "osr"]
    # The first OSR batches are the probe's: about 70 % of their pairs sit inside the chosen hinge.
    assert np.mean([r["inside_hinge"] for r in osr_steps]) == pytest.approx(0.7, abs=0.05)
    assert all(r["d_q05"] <= r["d_q50"] <= r["d_q95"] for r in osr_steps)
    osr_done = next(r for r in log if r["event"] == "osr_done")
    assert osr_done["margin"] == chosen_margin
    summary = json.loads((out / "summary.json").read_text())
    assert summary["margin"]["value"] == pytest.approx(chosen_margin) and "0.7 of the pairs" in summary["margin"]["rule"]
