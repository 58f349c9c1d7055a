"""Measured prefill cost: the CPU peak-memory tracker and the round-robin timer."""
from __future__ import annotations

import pytest
import torch

from lvlm_helpers import TINY, save_tiny_lvlm, with_lm
from vlmcompress.tokens.fastv import FastV
from vlmcompress.tokens.patch import TokenCompressor
from vlmcompress.tokens.timing import measure_prefills, peak_memory_mb


def test_cpu_peak_counts_live_storages_once():
    def work():
        a = torch.zeros(1024, 1024)            # 4 MiB
        b = a @ a                              # +4 MiB: peak 8
        del b
        v = a.view(-1)                         # a view allocates nothing
        c = torch.zeros(512, 1024)             # +2 MiB while a lives: 6 < 8
        return v, c

    assert peak_memory_mb(work, torch.device("cpu")) == pytest.approx(8.0)
    assert peak_memory_mb(lambda: torch.zeros(256, 1024), torch.device("cpu")) == pytest.approx(1.0)


def test_measure_prefills_on_a_tiny_model(tmp_path):
    from vlmcompress.lvlm import load_lvlm

    folder = save_tiny_lvlm(tmp_path / "lvlm", with_lm(TINY, lm_layers=3))
    lvlm = load_lvlm(str(folder / "llava"), str(folder / "clip"))
    imgs = torch.rand(2, 3, 56, 56)
    qs = ["what color is the circle?", "how many"]
    makers = {"full": lambda: None, "rec": lambda: TokenCompressor(lvlm, "recoverable", budget=0.25),
              "fastv": lambda: FastV(budget=0.25, layer=2)}
    costs = measure_prefills(lvlm, imgs, qs, makers, repeats=2)
    assert list(costs) == ["full", "rec", "fastv"]
    assert costs["full"].selection_ms == 0.0 and costs["rec"].selection_ms > 0 and costs["fastv"].selection_ms > 0
    for c in costs.values():
        assert c.prefill_ms > c.selection_ms and c.vision_ms > 0 and c.peak_mb > 0
    # The text tower's share is inside the selection time, and only text-guided methods have one.
    assert 0 < costs["rec"].text_ms < costs["rec"].selection_ms
    assert costs["full"].text_ms == costs["fastv"].text_ms == 0.0
    # Fewer tokens in the LM never need more memory (here the vision tower sets the peak).
    assert costs["rec"].peak_mb <= costs["full"].peak_mb
