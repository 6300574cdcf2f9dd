"""Benchmark suite: the runner on fake benchmark modules (a result, an exception, a module past
its time limit) keeps going and records each status; the Markdown report; and the
reference-style coarse head equals our heads numerically (so the benchmark compares like with
like)."""
import json
import os
import textwrap
import time

import pytest
import torch

from tempeh.bench import runner
from tempeh.bench.reference_arch import (HEAD_IMPL, HEAD_MODES, REFERENCE_DOCUMENTED, ReferenceStyleHead,
                                         reference_style_soft_argmax, set_head_mode)
from tempeh.models.soft_argmax import SoftArgmaxHead, soft_argmax

FAKES = {
    "fakebench_ok": '''
        def run(quick=False):
            return {"quick": quick, "project_ms": 1.25, "peak_gib": 0.5, "nested": {"median_ms": 3.0},
                    "configs": [{"B": 1, "forward_s": 0.5}, {"B": 2, "forward_s": 1.0, "note": "x"}]}
    ''',
    "fakebench_md": '''
        def run(quick=False):
            return {"value_s": 2.0}
        def markdown(result):
            return "CUSTOM TABLE " + str(result["value_s"])
    ''',
    "fakebench_raise": '''
        def run(quick=False):
            raise RuntimeError("boom from the fake benchmark")
    ''',
    "fakebench_sleep": '''
        import os, subprocess, sys, time
        def run(quick=False):
            kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            with open(os.environ["FAKEBENCH_PID_FILE"], "w") as f:
                f.write(str(kid.pid))
            time.sleep(120)
            return {}
    ''',
}


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebench"  # a package: dotted names are used as given
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, src in FAKES.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("FAKEBENCH_PID_FILE", str(tmp_path / "grandchild.pid"))
    return tmp_path


def _gone(pid: int, wait: float = 5.0) -> bool:
    end = time.time() + wait
    while time.time() < end:
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("State:") and "Z" in line for line in f):
                    return True  # zombie: ended, waiting to be reaped
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_runner_records_status_and_keeps_going(fakes):
    out = fakes / "bench"
    names = [f"fakebench.{n}" for n in ("fakebench_sleep", "fakebench_raise", "fakebench_ok", "fakebench_md",
                                         "fakebench_missing")]
    t0 = time.time()
    report, status = runner.run_suite(names, quick=True, out_dir=out, timeout=3.0, cuda=False,
                                      log=lambda *a: None)
    assert time.time() - t0 < 30
    assert status == 1
    mods = report["modules"]
    assert [mods[n]["status"] for n in names] == ["timeout", "failed", "ok", "ok", "missing"]
    assert "boom from the fake benchmark" in mods["fakebench.fakebench_raise"]["error"]
    assert "RuntimeError" in mods["fakebench.fakebench_raise"]["error"]
    assert mods["fakebench.fakebench_ok"]["result"]["quick"] is True
    assert mods["fakebench.fakebench_ok"]["result"]["configs"][1]["forward_s"] == 1.0
    assert mods["fakebench.fakebench_ok"]["peak_rss_gib"] > 0 and mods["fakebench.fakebench_ok"]["wall_s"] > 0
    assert mods["fakebench.fakebench_sleep"]["wall_s"] < 20
    assert set(report["failures"]) == {names[0], names[1], names[4]}
    # the timed-out module's own subprocess was ended with it (process group)
    pid_file = fakes / "grandchild.pid"
    if pid_file.exists():
        assert _gone(int(pid_file.read_text()))

    saved = json.loads((out / "results.json").read_text())
    for key in ("machine", "date", "quick", "torch_version", "modules", "results_cuda", "failures"):
        assert key in saved
    assert saved["torch_version"] == torch.__version__
    assert saved["machine"]["torch_threads"] >= 1 and saved["machine"]["cpu"]
    assert saved["results_cuda"]["available"] is False
    md = (out / "results.md").read_text()
    assert "| fakebench.fakebench_ok | ok |" in md and "| fakebench.fakebench_sleep | timeout |" in md
    assert "| project (ms) | 1.25 |" in md and "| figure | median (ms) |" in md and "| nested | 3 |" in md
    assert "| B | forward (s) | note |" in md
    assert "CUSTOM TABLE 2.0" in md
    assert "boom from the fake benchmark" in md
    assert "not measured by this run" in md


def test_cli_exit_status(fakes):
    out = fakes / "b2"
    only = "fakebench.fakebench_ok,fakebench.fakebench_md"
    assert runner.main(["--quick", "--only", only, "--out", str(out), "--no-cuda"]) == 0
    assert json.loads((out / "results.json").read_text())["failures"] == {}
    assert runner.main(["--only", "fakebench.fakebench_raise", "--out", str(out), "--no-cuda"]) == 1


def test_units_from_keys():
    assert runner.split_unit("forward_cpu_s") == ("forward_cpu", "s")
    assert runner.split_unit("a.b.median_ms") == ("a.b.median", "ms")
    assert runner.split_unit("peak_gib") == ("peak", "GiB")
    assert runner.split_unit("peak_mb") == ("peak", "MiB")
    assert runner.split_unit("png_frames_per_s") == ("png", "frames/s")
    assert runner.split_unit("hdf5_speedup") == ("hdf5_speedup", "x")
    assert runner.split_unit("views") == ("views", "")


def _coarse_cfg(what, B, head, t, peak):
    key = {"head": "head_fwd_bwd_s", "forward": "forward_s", "train": "train_step_s"}[what]
    return {"what": what, "B": B, "head": head, key: t, "peak_gib": peak, "delta_gib": peak - 1}


def test_report_side_by_side_and_coarse_table():
    from tempeh.bench import coarse
    cfgs = [_coarse_cfg("forward", 1, "efficient", 1.9, 2.0), _coarse_cfg("forward", 1, "reference", 3.0, 6.0),
            _coarse_cfg("train", 1, "efficient", 5.0, 3.0), _coarse_cfg("train", 1, "reference", 9.0, 10.0),
            {"what": "train", "B": 2, "head": "reference", "skipped": "over budget"}]
    res = {"device": "cpu", "configs": cfgs, "summary": {"train_target": "t", "train_target_met": True}}
    md = coarse.markdown(res)
    assert "| forward (eval) | 1 | efficient | 1.90 |" in md and "| 33 |" in md  # 2.0 / 6.0
    assert "over budget" in md and "met" in md
    refine_settings = [{"num_verts": 5023, "views": 16, "chunk_size": 512, "forward_s": 10.0, "peak_mb": 2048.0}]
    report = {"machine": {"cpu": "c", "logical_cores": 2, "torch_threads": 2, "ram_gib": 1, "os": "o",
                          "python": "3", "torch": "t", "numpy": "n", "cuda": [], "embree": True},
              "date": "d", "quick": False, "failures": {}, "results_cuda": {"available": False, "note": "none"},
              "modules": {"coarse": {"module": "tempeh.bench.coarse", "status": "ok", "result": res},
                          "refine": {"module": "tempeh.bench.refine", "status": "ok",
                                     "result": {"forward": {"settings": refine_settings}}}}}
    md = runner.render_markdown(report)
    ref = REFERENCE_DOCUMENTED["coarse_forward_B1"]
    assert f"| coarse forward, batch 1 | {ref['s']} | {ref['gib']} | 1.9 | 2 | 2.00x | 1.80x |" in md
    assert "| refinement forward, batch 1, chunk 512 | 30 | 6.2 | 10 | 2 | 3.00x | 3.10x |" in md


# ---------------------------------------------------------------- the heads compared are equal
def test_reference_style_head_equals_ours():
    torch.manual_seed(0)
    B, C, N, D, H, W = 2, 5, 7, 3, 4, 5
    head = SoftArgmaxHead(C, N, chunk_size=3).double()
    feats = torch.randn(B, C, D, H, W, dtype=torch.float64, requires_grad=True)
    coords = (torch.randn(B, D, H, W, 3, dtype=torch.float64) * 50).requires_grad_(True)
    logits = head.logits(feats)
    assert torch.allclose(reference_style_soft_argmax(logits, coords.reshape(B, -1, 3)),
                          soft_argmax(logits, coords.reshape(B, -1, 3)), atol=1e-10)
    outs, grads = [], []
    for mode in HEAD_MODES:
        head.mode = HEAD_IMPL[mode]
        h = ReferenceStyleHead(head) if mode == "reference" else head
        y = h(feats, coords)
        g = torch.autograd.grad(y.square().sum(), (feats, coords, head.weight))
        outs.append(y.detach())
        grads.append(g)
    for y, g in zip(outs[1:], grads[1:]):
        assert torch.allclose(y, outs[0], atol=1e-9)
        for a, b in zip(g, grads[0]):
            assert torch.allclose(a, b, atol=1e-8)


def test_set_head_mode_same_model_output():
    from tempeh.bench.coarse import _rig
    from tempeh.models.coarse import CoarseConfig, CoarseModel
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = CoarseModel(CoarseConfig.tiny(num_verts=40, head_chunk_size=16)).eval()
        cams = _rig(3, 32, 24)[None]
        images = torch.rand(1, 3, 1, 24, 32)
        with torch.no_grad():
            ys = {m: set_head_mode(model, m)(images, cams).verts for m in HEAD_MODES}
        assert isinstance(model.head, ReferenceStyleHead)
        assert sum(p.numel() for p in model.parameters()) == sum(
            p.numel() for p in set_head_mode(model, "efficient").parameters())
        for m in ("matmul", "reference"):
            assert torch.allclose(ys[m], ys["efficient"], atol=1e-3, rtol=1e-5)
        with pytest.raises(ValueError):
            set_head_mode(model, "bogus")
    finally:
        torch.set_num_threads(n)
