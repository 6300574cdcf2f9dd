"""The benchmark suite: every benchmark module in a fresh subprocess, one report.

A benchmark module is any importable module with ``run(quick: bool = False) -> dict`` (a name
without a dot means ``tempeh.bench.<name>``). Each runs in its own process group with a time
limit, so one module's peak memory (``ru_maxrss`` of that process, and of the processes it
starts, which are reported separately) does not contaminate another's, and a module that fails,
is killed or runs past its limit is recorded as such while the others go on. A module may also
provide ``markdown(result) -> str`` to render its own tables; otherwise the result dict is
rendered generically, with the unit taken from the key's suffix (``_ms``, ``_s``, ``_gib``...).

When a CUDA device is available, modules whose ``run`` takes a ``device`` argument run a second
time with ``device="cuda"``; those results go to ``results_cuda``.

Outputs (in ``out_dir``): ``results.json`` ``{machine, date, quick, torch_version, modules:
{name: {status, wall_s, peak_rss_gib, children_peak_rss_gib, result | error}}, results_cuda,
failures}`` and ``results.md`` (Markdown tables). Both are rewritten after every module.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import inspect
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["DEFAULT_MODULES", "run_module", "run_suite", "render_markdown", "main"]

DEFAULT_MODULES: Tuple[str, ...] = ("cameras", "geometry", "data", "synth", "coarse", "refine",
                                    "fitting", "register")
TITLES = {"cameras": "Cameras: projection and calibration I/O",
          "geometry": "Geometry: point-to-surface and visibility",
          "data": "Data loading: PNG vs HDF5 cache",
          "synth": "Synthetic studio",
          "coarse": "Coarse stage at paper scale: heads side by side",
          "refine": "Refinement stage: chunked vs unchunked",
          "fitting": "Scan fitting",
          "register": "register_sequence throughput"}
DEFAULT_TIMEOUT_S = {True: 1800.0, False: 3600.0}  # per module: quick, full
_GIB = 1024.0 ** 3
_REPO = Path(__file__).resolve().parents[2]


def _full_name(name: str) -> str:
    return name if "." in name else f"tempeh.bench.{name}"


def _short(name: str) -> str:
    return name[len("tempeh.bench."):] if name.startswith("tempeh.bench.") else name


def _jsonable(x):
    """``json`` fallback: numpy / torch scalars and arrays, paths, anything else as text."""
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    tmp.replace(path)


# ---------------------------------------------------------------------------- child side
def _child(name: str, quick: bool, device: Optional[str], out: Path) -> int:
    """In the fresh subprocess: import, run, write ``{"result": ...}`` to ``out``."""
    mod = importlib.import_module(_full_name(name))
    kw = {"quick": quick}
    if device:
        kw["device"] = device
    result = mod.run(**kw)
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 / _GIB
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024.0 / _GIB
    _dump({"result": result, "peak_rss_gib": me, "children_peak_rss_gib": kids or None}, out)
    return 0


# ---------------------------------------------------------------------------- parent side
def _tail(*texts: str, lines: int = 25, chars: int = 3000) -> str:
    body = "\n".join(t.strip() for t in texts if t and t.strip())
    return "\n".join(body.splitlines()[-lines:])[-chars:]


def _load1() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    """End the child's process group (it and what it started), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _module_info(name: str) -> Tuple[bool, bool, object]:
    """``(found, takes_device, module or None)``; importing here only to inspect it."""
    full = _full_name(name)
    try:
        if importlib.util.find_spec(full) is None:
            return False, False, None
    except (ImportError, ValueError):
        return False, False, None
    try:
        mod = importlib.import_module(full)
        return True, "device" in inspect.signature(mod.run).parameters, mod
    except Exception:  # the child reports the error with its traceback
        return True, False, None


def run_module(name: str, quick: bool = False, timeout: Optional[float] = None,
               device: Optional[str] = None) -> Dict:
    """Run one benchmark module in a fresh subprocess (own process group).

    Returns ``{"status": "ok" | "failed" | "timeout" | "missing", "wall_s", "peak_rss_gib",
    "children_peak_rss_gib", "result" | "error"}``; ``error`` is the tail of the child's output.
    """
    entry: Dict = {"module": _full_name(name), "device": device or "cpu"}
    if not _module_info(name)[0]:
        return dict(entry, status="missing", wall_s=0.0, error=f"module {_full_name(name)} not found")
    timeout = DEFAULT_TIMEOUT_S[bool(quick)] if timeout is None else float(timeout)
    with tempfile.TemporaryDirectory(prefix="tempeh_bench_") as tmp:
        tmp = Path(tmp)
        res_path = tmp / "result.json"
        cmd = [sys.executable, "-m", "tempeh.bench.runner", "--child", name, "--result", str(res_path)]
        if quick:
            cmd.append("--quick")
        if device:
            cmd += ["--device", device]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
        with open(tmp / "stdout", "w+") as fo, open(tmp / "stderr", "w+") as fe:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, timed_out = proc.returncode, True
            entry["wall_s"] = time.perf_counter() - t0
            fo.seek(0)
            fe.seek(0)
            out_text, err_text = fo.read(), fe.read()
        if timed_out:
            return dict(entry, status="timeout", timeout_s=timeout,
                        error=f"timed out after {timeout:g} s (process group killed)\n"
                              + _tail(out_text, err_text))
        if rc != 0 or not res_path.exists():
            why = f"exit code {rc}" + (" (killed by signal: out of memory?)" if rc and rc < 0 else "")
            return dict(entry, status="failed", returncode=rc, error=why + "\n" + _tail(out_text, err_text))
        data = json.loads(res_path.read_text())
    return dict(entry, status="ok", peak_rss_gib=data.get("peak_rss_gib"),
                children_peak_rss_gib=data.get("children_peak_rss_gib"), result=data["result"])


def run_suite(modules: Optional[Sequence[str]] = None, quick: bool = False,
              out_dir="benchmarks", timeout: Optional[float] = None,
              cuda: Optional[bool] = None, log=print) -> Tuple[Dict, int]:
    """Run ``modules`` (default :data:`DEFAULT_MODULES`) one by one; write ``results.json`` and
    ``results.md`` in ``out_dir`` after each. ``cuda``: run the GPU variants (default: when a
    CUDA device is available). Returns ``(report, exit_status)``: 0 when every module
    succeeded, 1 otherwise."""
    from tempeh.bench.machine import cuda_available, describe

    modules = list(modules or DEFAULT_MODULES)
    out_dir = Path(out_dir)
    machine = describe()
    cuda = cuda_available() if cuda is None else bool(cuda)
    report: Dict = {
        "machine": machine,
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "quick": bool(quick),
        "torch_version": machine["torch"],
        "command": " ".join([Path(sys.executable).name, "-m", "tempeh.bench"] + sys.argv[1:]),
        "modules": {},
        "results_cuda": ({"available": True, "modules": {}} if cuda else
                         {"available": False, "note": "no CUDA device available: GPU variants not run"}),
        "failures": {},
    }

    def save():
        _dump(report, out_dir / "results.json")
        (out_dir / "results.md").write_text(render_markdown(report))

    for name in modules:
        key = _short(name)
        log(f"[bench] {key} ...")
        load0 = _load1()
        e = run_module(name, quick=quick, timeout=timeout)
        e["load_1min_before_after"] = [load0, _load1()]
        report["modules"][key] = e
        if e["status"] != "ok":
            report["failures"][key] = {"status": e["status"], "error": e.get("error", "")}
        log(f"[bench] {key}: {e['status']} in {e['wall_s']:.1f} s")
        save()
    if cuda:
        for name in modules:
            key = _short(name)
            found, takes_device, _ = _module_info(name)
            if not (found and takes_device):
                continue
            log(f"[bench] {key} (cuda) ...")
            e = run_module(name, quick=quick, timeout=timeout, device="cuda")
            report["results_cuda"]["modules"][key] = e
            if e["status"] != "ok":
                report["failures"][f"{key} (cuda)"] = {"status": e["status"], "error": e.get("error", "")}
            save()
    save()
    return report, (1 if report["failures"] else 0)


# ---------------------------------------------------------------------------- Markdown
_UNITS = (("frames_per_s", "frames/s"), ("_per_s", "1/s"), ("_ms", "ms"), ("_s", "s"),
          ("_gib", "GiB"), ("_mib", "MiB"), ("_mb", "MiB"), ("_mm", "mm"), ("_px", "px"),
          ("_pct", "%"), ("_percent", "%"), ("_ratio", "x"), ("_speedup", "x"))
_SPECIAL = {"params_m": ("params", "M"), "frames_per_s": ("throughput", "frames/s")}


def split_unit(key: str) -> Tuple[str, str]:
    """``"forward_cpu_s"`` -> ``("forward_cpu", "s")``; the unit is read from the last dotted
    component's suffix; ``("key", "")`` when none applies."""
    head, _, last = key.rpartition(".")
    pre = head + "." if head else ""
    if last in _SPECIAL:
        lab, unit = _SPECIAL[last]
        return pre + lab, unit
    for suf, unit in _UNITS:
        if last.endswith(suf) and len(last) > len(suf):
            keep = unit == "x"  # "hdf5_speedup (x)", "memory_ratio (x)": the name says what
            return pre + (last if keep else last[: -len(suf)].rstrip("_")), unit
    return key, ""


def _header(key: str) -> str:
    lab, unit = split_unit(key)
    return f"{lab} ({unit})" if unit else lab


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_cell(e) for e in x) + "]"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _flatten(x, prefix: str, scalars: List, tables: List) -> None:
    if isinstance(x, dict):
        for k, v in x.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), scalars, tables)
    elif isinstance(x, list) and x and all(isinstance(e, dict) for e in x):
        tables.append((prefix, x))
    else:
        scalars.append((prefix, x))


def generic_markdown(result) -> str:
    """Tables of any result dict: top-level dicts of scalars as one table (a row each); other
    scalars as ``figure (unit) | value`` rows; every list of dicts as its own table, one row per
    dict; units in the headers."""
    if not isinstance(result, dict):
        return f"Result: `{_cell(result)}`"
    scalars: List = []
    tables: List = []
    groups = {k: v for k, v in result.items() if isinstance(v, dict) and v
              and not any(isinstance(e, (dict, list)) for e in v.values())}
    _flatten({k: v for k, v in result.items() if k not in groups}, "", scalars, tables)
    parts = []
    if groups:  # {"p2s": {"median_ms": .., "min_ms": ..}, ...}: one row per figure
        cols: List[str] = []
        for v in groups.values():
            cols += [c for c in v if c not in cols]
        rows = ["| figure | " + " | ".join(_header(c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
        rows += [f"| {k} | " + " | ".join(_cell(v.get(c)) for c in cols) + " |" for k, v in groups.items()]
        parts.append("\n".join(rows))
    if scalars:
        rows = ["| figure (unit) | value |", "|---|---|"]
        rows += [f"| {_header(k)} | {_cell(v)} |" for k, v in scalars]
        parts.append("\n".join(rows))
    for name, rows_in in tables:
        flat_rows = []
        for r in rows_in:
            s: List = []
            _flatten(r, "", s, [])
            flat_rows.append(dict(s))
        cols: List[str] = []
        for r in flat_rows:
            cols += [c for c in r if c not in cols]
        rows = [f"**{name}**", "", "| " + " | ".join(_header(c) for c in cols) + " |",
                "|" + "---|" * len(cols)]
        rows += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in flat_rows]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def _module_markdown(name: str, result) -> str:
    _, _, mod = _module_info(name)
    fn = getattr(mod, "markdown", None) if mod is not None else None
    if callable(fn):
        try:
            return fn(result)
        except Exception:  # fall back to the generic tables
            return generic_markdown(result) + "\n\n(module markdown failed: " + \
                _cell(traceback.format_exc().strip().splitlines()[-1]) + ")"
    return generic_markdown(result)


def _reference_rows(report: Dict) -> List[str]:
    """Our paper-scale figures next to the reference's documented ones (DESIGN.md section 6)."""
    from tempeh.bench.reference_arch import REFERENCE_DOCUMENTED as REF

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else ""

    rows = []
    co = report["modules"].get("coarse", {})
    cfgs = co.get("result", {}).get("configs", []) if co.get("status") == "ok" else []
    coarse_rows = (("coarse_forward_B1", "forward", 1, "coarse forward, batch 1"),
                   ("coarse_forward_B2", "forward", 2, "coarse forward, batch 2"),
                   ("coarse_train_step_B2", "train", 2, "coarse training step, batch 2"),
                   ("coarse_train_step_B1", "train", 1, "coarse training step, batch 1"))
    for key, what, B, label in coarse_rows:
        t_key = "forward_s" if what == "forward" else "train_step_s"
        ref = REF[key]
        ours = next((c for c in cfgs if c.get("what") == what and c.get("B") == B
                     and c.get("head") == "efficient" and "peak_gib" in c), None)
        t, m = (ours.get(t_key), ours.get("peak_gib")) if ours else (None, None)
        note = "" if ours else (("not run (--quick)" if report.get("quick") else "not run")
                                if co.get("status") == "ok" else "coarse benchmark not run/failed")
        if "note" in ref:
            note = (note + "; " if note else "") + "reference: " + ref["note"]
        rows.append(f"| {label} | {_cell(ref.get('s'))} | {_cell(ref.get('gib'))} | {_cell(t)} | "
                    f"{_cell(m)} | {ratio(ref.get('s'), t)} | {ratio(ref.get('gib'), m)} | {note} |")
    rf = report["modules"].get("refine", {})
    settings = (rf.get("result", {}).get("forward", {}).get("settings", [])
                if rf.get("status") == "ok" else [])
    ref = REF["refine_forward_B1"]
    paper = [s for s in settings
             if s.get("num_verts") == 5023 and s.get("views") == 16 and "peak_mb" in s]
    if not paper:
        why = ("quick run: not at paper scale" if settings else "refine benchmark not run/failed")
        rows.append(f"| refinement forward, batch 1 | {_cell(ref['s'])} | {_cell(ref['gib'])} | "
                    f"|  |  |  | {why} |")
    for s in paper:
        m = s["peak_mb"] / 1024.0
        t = s.get("forward_s")
        rows.append(f"| refinement forward, batch 1, chunk {s.get('chunk_size') or 'none'} | "
                    f"{_cell(ref['s'])} | {_cell(ref['gib'])} | {_cell(t)} | {_cell(m)} | "
                    f"{ratio(ref['s'], t)} | {ratio(ref['gib'], m)} |  |")
    return rows


def render_markdown(report: Dict) -> str:
    """``results.md`` of a :func:`run_suite` report."""
    from tempeh.bench.machine import one_line
    from tempeh.bench.reference_arch import REFERENCE_DOCUMENTED as REF

    m = report["machine"]
    out = ["# tempeh benchmarks", "",
           f"- date: {report['date']}", f"- mode: {'quick' if report['quick'] else 'full'}",
           f"- machine: {one_line(m)}",
           f"- load average at start (1/5/15 min): {_cell(m.get('load_average_1_5_15'))} "
           "(a loaded, shared machine gives noisy figures)",
           f"- git: {m.get('git_commit')}", f"- command: `{report.get('command', '')}`", "",
           "Every module ran in a fresh subprocess; peak RSS is that process's `ru_maxrss` "
           "(modules that start their own subprocesses report those separately).", "",
           "| module | status | wall (s) | peak RSS (GiB) | peak RSS of its subprocesses (GiB) | "
           "load average, 1 min, before / after |",
           "|---|---|---|---|---|---|"]
    for k, e in report["modules"].items():
        out.append(f"| {k} | {e['status']} | {_cell(e.get('wall_s'))} | {_cell(e.get('peak_rss_gib'))} | "
                   f"{_cell(e.get('children_peak_rss_gib'))} | "
                   f"{' / '.join(_cell(x) for x in e.get('load_1min_before_after') or [])} |")
    out += ["", "## Side by side with the reference TEMPEH", "",
            f"Reference figures: {REF['source']}. Ours: measured by this run (wall time; peak "
            "memory = whole-process peak RSS of the configuration's subprocess; coarse: our "
            "default memory-efficient head). Ratio = reference / ours (target: >= 3x on each).", "",
            "| figure | reference time (s) | reference peak (GiB) | ours time (s) | ours peak (GiB) | "
            "time ratio | memory ratio | note |", "|" + "---|" * 8]
    out += _reference_rows(report)
    for k, e in report["modules"].items():
        out += ["", f"## {TITLES.get(k, k)} (`{e['module']}`)", ""]
        if e["status"] == "ok":
            out.append(_module_markdown(k, e["result"]))
        else:
            out.append(f"**{e['status']}**")
    out += ["", "## CUDA", ""]
    rc = report["results_cuda"]
    if not rc.get("available"):
        out.append(rc.get("note", "no CUDA device available"))
    else:
        gpus = ", ".join(g["name"] for g in m.get("cuda") or [])
        out.append(f"Device: {gpus}. Modules whose `run` takes a `device` argument, run with `device='cuda'`.")
        for k, e in rc.get("modules", {}).items():
            out += ["", f"### {TITLES.get(k, k)} (cuda)", ""]
            out.append(_module_markdown(k, e["result"]) if e["status"] == "ok" else f"**{e['status']}**")
    if report["failures"]:
        out += ["", "## Failures", ""]
        for k, f in report["failures"].items():
            out += [f"### {k}: {f['status']}", "", "```", f.get("error", "").strip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tempeh.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (fewer repeats, smaller sizes)")
    p.add_argument("--only", default="", help="comma-separated modules, e.g. coarse,geometry "
                   f"(default: {','.join(DEFAULT_MODULES)})")
    p.add_argument("--out", default="benchmarks", help="output folder (results.json, results.md)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per module (default %g quick, %g full)" % (DEFAULT_TIMEOUT_S[True],
                                                                          DEFAULT_TIMEOUT_S[False]))
    p.add_argument("--no-cuda", action="store_true", help="do not run the CUDA variants")
    return p


def main(argv: Optional[Iterable[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        c = argparse.ArgumentParser()
        c.add_argument("--child")
        c.add_argument("--result", type=Path)
        c.add_argument("--quick", action="store_true")
        c.add_argument("--device", default=None)
        a = c.parse_args(argv)
        return _child(a.child, a.quick, a.device, a.result)
    a = _parser().parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()] or None
    report, status = run_suite(only, quick=a.quick, out_dir=a.out, timeout=a.timeout,
                               cuda=False if a.no_cuda else None)
    n_ok = sum(e["status"] == "ok" for e in report["modules"].values())
    print(f"[bench] {n_ok}/{len(report['modules'])} modules ok; wrote {Path(a.out) / 'results.json'} "
          f"and {Path(a.out) / 'results.md'}")
    for k, f in report["failures"].items():
        print(f"[bench] {k}: {f['status']}: {f['error'].splitlines()[0] if f['error'] else ''}")
    return status


if __name__ == "__main__":
    sys.exit(main())
