"""`difflower bench` on tiny artifacts: every field present, with sane values."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import difflower  # noqa: E402
from difflower.cli import main  # noqa: E402
from difflower.validate.bench import bench, render  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = [root / "onnx"]
    difflower.export(tiny_dirs["sd"], "onnx", out[0], progress=False)
    try:
        import openvino  # noqa: F401

        out.append(root / "openvino")
        difflower.export(tiny_dirs["sd"], "openvino", out[1], progress=False)
    except ImportError:
        pass
    return out


def test_bench_report_holds_every_field(tiny_dirs, artifacts):
    result = bench(artifacts, tiny_dirs["sd"], steps=2, runs=2)
    report = result.to_json()
    assert report["machine"]["cores"] >= 1 and "torch" in report["machine"]["versions"]
    assert report["settings"]["bucket"] == "1x64x64" and report["settings"]["cfg_denoiser_batch"] == 2
    targets = report["targets"]
    assert list(targets)[0] == "eager" and targets["eager"]["kind"] == "reference"
    assert len(targets) == 1 + len(artifacts)
    for name, t in targets.items():
        assert t["load_s"]["cold"] > 0 and t["load_s"]["warm"] > 0
        assert set(t["components"]) == {"text_encoder", "unet", "vae_decoder"}
        for c in t["components"].values():
            assert 0 < c["min_s"] <= c["median_s"] <= c["max_s"] and c["runs"] == 2
        assert t["end_to_end_s"] > 0 and t["denoiser_calls"] == 3  # PNDM: 2 steps + its warm-up call
        assert t["size_bytes"] > 0 and t["rss_after_load_gib"] > 0
        if name != "eager":
            assert t["parity"]["final_latents"]["passed"] and t["parity"]["image"]["passed"]
            assert t["end_to_end_vs_eager"] > 0 and set(t["components_vs_eager"]) == set(t["components"])
            assert all(s is not None for s in t["export_parity"].values())
    assert report["peak_rss_gib"] > 0
    assert "avx2" in report["machine"]["cpu_flags"] or report["machine"]["cpu_flags"] == []
    text = render(result)
    assert "eager" in text and "onnx" in text and "parity" in text


def test_bench_cli_writes_json_and_plot(tiny_dirs, artifacts, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the bench extra is not installed")
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", str(artifacts[0]), "--reference", str(tiny_dirs["sd"]), "--steps", "1", "--runs", "1"]
    assert main([*args, "--json", str(out), "--plot", str(chart)]) == 0
    assert json.loads(out.read_text())["targets"]["onnx"]["parity"]["image"]["passed"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    assert "end-to-end" in capsys.readouterr().out
