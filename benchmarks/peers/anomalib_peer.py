"""edgecore vs anomalib PatchCore, side by side, in one run, on the same data and model configuration.

    bash benchmarks/peers/run_anomalib_peer.sh            # makes the venv, then runs this
    python benchmarks/peers/anomalib_peer.py --venv /tmp/anomalib-venv --work /tmp/peer/run

This orchestrator runs with the project's python. edgecore steps run as the project's
CLI / runtime (system python); anomalib steps run in anomalib's own virtual environment
(``--venv``) through ``anomalib_side.py``. Model configuration on both sides:
WideResNet-50-2 layer2+layer3, RANDOM INIT (no pretrained weights offline; anomalib
``pre_trained=False``, edgecore ``--random-init``), 256 -> 224 center crop, 10 % coreset,
9 neighbours, 10 % of train/good held out for the threshold, batch 16, CPU.

Measured (each in a fresh process unless said otherwise):
  fit      edgecore ``edgecore fit`` vs anomalib ``Engine.fit`` (process wall + CPU, phases)
  export   ``edgecore export`` (+ the README quickstart's ``edgecore compile --precision int8
           --portable``) vs ``Engine.export(export_type="openvino")`` from the checkpoint, as fp32
           IR and with ``compression_type=INT8_PTQ`` (NNCF calibration on its datamodule)
  coreset  on anomalib's own bank: its KCenterGreedy (timed inside Engine.fit, optionally
           re-run) vs edgecore's KCenterGreedySampler; coverage radius of both in the
           original feature space with edgecore.coreset.coverage_radius
  latency  path -> score per image, all workers alive at once, one image at a time in a
           shuffled worker order per image (interleaved), timed inside each worker
  RSS      fresh inference-only process per configuration: load + score N images,
           VmHWM and ``ru_maxrss``
Prints a Markdown report (also written to WORK/report.md, raw numbers to WORK/results.json).
Goals are reported as met / missed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image  # only to read the frames' size; the orchestrator imports neither torch nor OpenVINO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(name: str, cmd: list[str], work: Path, cwd: Path | None = None) -> dict:
    """Run one command to completion; wall and CPU seconds of the process, its last JSON line."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log(f"{name}: {' '.join(cmd)}")
    cpu0, t0 = children_cpu(), time.perf_counter()
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        proc = subprocess.run(cmd, stdout=out, stderr=err, cwd=cwd or work)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    text = (logs / f"{name}.out").read_text()
    if proc.returncode != 0:
        tail = (logs / f"{name}.err").read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); stderr tail:\n{tail}")
    payload = last_json(text)
    log(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    return {"wall_s": wall, "cpu_s": cpu, "out": payload, "cmd": " ".join(cmd)}


def last_json(text: str) -> dict:
    """The last JSON object in a process's stdout: the CLI pretty-prints one object (possibly
    after progress bars), the side scripts print one JSON line."""
    text = text.rstrip()
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and text[i + 1 : i + 2] == "{"]
    for start in reversed(starts):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    return {}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Worker:
    """A long-lived scoring process speaking the one-path-in, one-JSON-line-out protocol."""

    def __init__(self, label: str, cmd: list[str], cwd: Path, err_file: Path) -> None:
        self.label = label
        self.err = open(err_file, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True, bufsize=1, cwd=cwd)
        self.ready = self._read()
        self.ms: list[float] = []
        self.scores: dict[str, float] = {}
        self.parts: list[dict] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.err.flush()
            raise RuntimeError(f"{self.label}: worker died; see {self.err.name}")
        return json.loads(line)

    def score(self, path: str, record: bool = True) -> dict:
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if record:
            self.ms.append(reply["ms"])
            self.scores[path] = reply["score"]
            if "parts_ms" in reply:
                self.parts.append(reply["parts_ms"])
        return reply

    def close(self) -> dict:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        final = self._read()
        self.proc.wait(timeout=60)
        self.err.close()
        return final


def test_images(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "test").rglob("*.png"))


# --------------------------------------------------------------------------- stages
def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
        present = [flag for flag in wanted if f" {flag}" in text]
        flags = " ".join(present)
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "cpu_flags": flags,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": os.getloadavg(),
        "kernel": platform.release(),
    }


def uptime() -> str:
    """`uptime` as the guide asks benchmarks to record it (load of the shared machine)."""
    proc = subprocess.run(["uptime"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else " ".join(f"{x:.2f}" for x in os.getloadavg())


def bundle_search(bundle: Path) -> dict:
    """The bundle's index mode and the exporter's recorded choice (manifest.json, plain JSON)."""
    try:
        index = json.loads((bundle / "manifest.json").read_text()).get("index", {})
    except (OSError, ValueError):
        return {}
    return {"mode": index.get("mode"), "dtype": index.get("dtype"), "choice": index.get("choice")}


def project_versions(py: str) -> dict:
    """Versions of the project's environment, read in a subprocess: this orchestrator stays
    small (it imports neither torch nor OpenVINO), so the processes it spawns inherit no
    large high-water mark (see edgecore_side.vm_hwm_mib)."""
    code = ("import json, platform, sys, numpy, openvino, torch, edgecore; print(json.dumps({'edgecore': edgecore.__version__, "
            "'torch': torch.__version__, 'openvino': openvino.__version__, 'numpy': numpy.__version__, "
            "'python': platform.python_version(), 'executable': sys.executable}))")
    return json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout)


def git_state() -> dict:
    """The commit the edgecore side ran from (read-only git calls)."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"head": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def interleaved_latency(workers: list[Worker], images: list[str], warmup: int, seed: int) -> None:
    rng = random.Random(seed)
    for path in images[:warmup]:
        for worker in workers:
            worker.score(path, record=False)
    for path in images:
        order = list(workers)
        rng.shuffle(order)
        for worker in order:
            worker.score(path)


def rss_probe(name: str, cmd: list[str], work: Path, cwd: Path) -> dict:
    result = run_step(name, cmd, work, cwd=cwd)
    return {**result["out"], "wall_s": result["wall_s"]}


# --------------------------------------------------------------------------- report
def fmt(value, digits=1, unit=""):
    if value is None:
        return "–"
    if isinstance(value, float) and value != value:
        return "–"
    return f"{value:.{digits}f}{unit}"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def build_report(r: dict) -> str:
    ec_fit, an_fit = r["edgecore_fit"], r["anomalib_fit"]
    ec_exp, an_exp = r["edgecore_export"], r["anomalib_export"]
    ao, ect = an_fit["out"], ec_fit["out"]["timings_s"]
    cs, lat, rss = r["coreset"], r["latency"], r["rss"]
    extrapolated = bool(ao.get("coreset_extrapolated"))
    star = " *(extrapolated)*" if extrapolated else ""
    lines: list[str] = []
    add = lines.append
    m, v = r["machine"], ao["versions"]
    add("## edgecore vs anomalib PatchCore — MVTec AD bottle, WRN-50-2 layer2+3, random init, CPU")
    add("")
    add(f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['cpu_flags']}), {m['mem_gib']} GiB, shared with other "
        f"jobs (load average {m['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} at end). anomalib {v['anomalib']} "
        f"in its own venv (lightning {v['lightning']}, timm {v['timm']}); edgecore {r['versions']['edgecore']}; both on torch "
        f"{r['versions']['torch']} and OpenVINO {r['versions']['openvino'].split('-')[0]}.")
    add("")
    if r.get("git", {}).get("head"):
        add(f"edgecore commit {r['git']['head'][:10]}" + (f" (+{len(r['git']['dirty'])} locally modified tracked files)"
                                                          if r["git"]["dirty"] else "") + ".")
        add("")
    add("### Fit and export (one fresh process each; wall = elapsed, CPU = user+sys of the process)")
    add("")
    add("| step | edgecore | anomalib | anomalib / edgecore |")
    add("|---|---:|---:|---:|")

    def row(label, ec, an, digits=1, unit=" s"):
        ratio = an / ec if ec and an else None
        add(f"| {label} | {fmt(ec, digits, unit)} | {fmt(an, digits, unit)} | {fmt(ratio, 2, '×')} |")

    an_fit_wall = an_fit["wall_s"] + (ao["engine_fit_s"] - ao["engine_fit_measured_s"])
    row(f"fit, process wall (CLI / script, incl. imports){star}", ec_fit["wall_s"], an_fit_wall)
    row("fit, process CPU" + (" (anomalib: measured part only)" if extrapolated else ""), ec_fit["cpu_s"], an_fit["cpu_s"])
    row("· feature extraction, train images", ect["features_s"], ao["features_s"])
    row(f"· coreset selection, own bank{star}", ect["coreset_s"], ao["coreset_s"])
    row("· neighbour table (edgecore only)", ect.get("neighbour_table_s"), None)
    row("· threshold from held-out normals", ect["threshold_s"], ao["validation_s"])
    row("export, process wall", ec_exp["wall_s"], an_exp["wall_s"])
    row("export, process CPU", ec_exp["cpu_s"], an_exp["cpu_s"])
    if r.get("edgecore_compile_flash"):
        row("edgecore compile --precision int8 --portable (README quickstart), wall", r["edgecore_compile_flash"]["wall_s"], None)
    if r.get("edgecore_compile_int8"):
        row("edgecore compile --precision int8 (VNNI engine, NNCF calibration), wall", r["edgecore_compile_int8"]["wall_s"], None)
    if r.get("anomalib_export_static"):
        row("anomalib export fp32, static input, process wall", None, r["anomalib_export_static"]["wall_s"])
    if r.get("anomalib_export_int8"):
        ai8 = r["anomalib_export_int8"]
        row(f"anomalib export INT8_PTQ (NNCF, {ai8['out'].get('calibration_images')} calibration images), process wall",
            None, ai8["wall_s"])
    add("")
    if extrapolated:
        add(f"*anomalib's KCenterGreedy ran {ao['coreset_steps_measured']} of its {ao['coreset_size'] - 1} greedy steps "
            f"inside Engine.fit ({fmt(ao['coreset_measured_s'])} s measured, projection {fmt(ao['coreset_projection_s'])} s); "
            f"the rest is extrapolated linearly (every step is one distance pass over all {ao['bank_shape'][0]} rows). "
            f"Its memory bank was filled up to the full {ao['coreset_size']} rows with random bank rows, so export size and "
            f"inference cost (exact search over every row) are those of the real model.*")
        add("")
    add(f"Banks: edgecore {ec_fit['out']['train_images']} train images → coreset {ec_fit['out']['coreset_size']} × "
        f"{ec_fit['out']['embed_dim']}; anomalib {ao['train_images']} train images → bank {ao['bank_shape'][0]} × "
        f"{ao['bank_shape'][1]} → coreset {ao['coreset_size']} (anomalib keeps all 1536 channels, edgecore reduces "
        f"to 1024). Artefacts: edgecore bundle {ec_exp['bytes'] / 2**20:.0f} MiB, anomalib IR "
        f"{an_exp['out']['ir_bytes'] / 2**20:.0f} MiB"
        + (f", anomalib INT8_PTQ IR {r['anomalib_export_int8']['out']['ir_bytes'] / 2**20:.0f} MiB"
           if r.get("anomalib_export_int8") else "") + ".")
    if r.get("edgecore_search"):
        add("")
        add("edgecore search as exported (manifest `index`): " + "; ".join(
            f"{name}: {info.get('dtype')} {info.get('mode')}" + (f" (choice: {json.dumps(info['choice'])})" if info.get("choice") else "")
            for name, info in r["edgecore_search"].items()))
    if an_exp["out"].get("workaround"):
        add("")
        add(f"anomalib's default `Engine.export(export_type=\"openvino\")` gives an IR with input "
            f"`{an_exp['out']['default_input_shape']}` ({fmt(an_exp['out']['default_export_s'])} s); its own "
            f"`OpenVINOInferencer` then fails on a single image: `{an_exp['out'].get('default_inferencer_error')}`. "
            f"Re-exported with `{an_exp['out']['workaround']}` (input `{an_exp['out']['input_shape']}`, "
            f"{fmt(an_exp['out']['export_s'])} s); that IR is the one measured below. The export process time above "
            f"includes both exports.")
    add("")
    add(f"### Coreset selection on one bank (anomalib's own bank, {cs['bank_shape'][0]} × {cs['bank_shape'][1]}, ratio 0.1)")
    add("")
    add("| sampler | selected | wall | CPU | coverage radius (original space) |")
    add("|---|---:|---:|---:|---:|")
    add(f"| anomalib KCenterGreedy inside Engine.fit (SparseRandomProjection → {ao['projected_dim']}-d){star} | "
        f"{ao['coreset_size']} | {fmt(ao['coreset_s'])} s | {fmt(ao.get('coreset_cpu_s'), 1, ' s')} | "
        f"{fmt(cs.get('anomalib_radius'), 4)} |")
    rr = cs.get("anomalib_rerun")
    if rr:
        add(f"| anomalib KCenterGreedy, re-run right after edgecore's (fresh process){' *(extrapolated)*' if rr['extrapolated'] else ''} "
            f"| {rr['size']} | {fmt(rr['coreset_s'])} s | {fmt(rr.get('coreset_cpu_s'), 1, ' s')} | {fmt(rr.get('radius'), 4)} |")
    for e in cs["edgecore"]:
        add(f"| edgecore KCenterGreedySampler (projection {e['projection_dim']}-d, seed 0) | {e['size']} | {fmt(e['s'])} s | "
            f"{fmt(e['cpu_s'])} s | {fmt(e['radius'], 4)} |")
    add(f"| uniform random subset (baseline) | {cs['edgecore'][0]['size']} | – | – | {fmt(cs['random_radius'], 4)} |")
    sub = cs.get("subsample")
    if sub:
        add("")
        add(f"Both samplers in full on every {sub['every']}th row of the same bank ({sub['bank_shape'][0]} × "
            f"{sub['bank_shape'][1]}, ratio 0.1):")
        add("")
        add("| sampler | selected | wall | CPU | coverage radius |")
        add("|---|---:|---:|---:|---:|")
        if sub.get("anomalib"):
            a = sub["anomalib"]
            add(f"| anomalib KCenterGreedy ({a['projected_dim']}-d) | {a['size']} | {fmt(a['coreset_s'])} s | "
                f"{fmt(a['coreset_cpu_s'])} s | {fmt(a['radius'], 4)} |")
        for e in sub["edgecore"]:
            add(f"| edgecore KCenterGreedySampler ({e['projection_dim']}-d) | {e['size']} | {fmt(e['s'])} s | "
                f"{fmt(e['cpu_s'])} s | {fmt(e['radius'], 4)} |")
        add(f"| uniform random subset | {sub['edgecore'][0]['size']} | – | – | {fmt(sub['random_radius'], 4)} |")
    add("")
    add(f"### Per-image latency, image path → score, interleaved ({lat['images']} test images, {lat['warmup']} warm-up each)")
    add("")
    if lat.get("uptime_before"):
        add(f"Load: `{lat['uptime_before']}` before, `{lat['uptime_after']}` after the latency stage.")
        add("")
    add("| runtime | what ran | p50 ms | p90 ms | p99 ms | mean ms | worker peak RSS |")
    add("|---|---|---:|---:|---:|---:|---:|")
    for e in lat["workers"]:
        ready = e.get("ready") or {}
        ran = ready.get("engine") or (f"OV hint {ready['inference_precision_hint']}" if "inference_precision_hint" in ready else "")
        if ready.get("executed"):
            ran += " (compute layers: " + ", ".join(f"{k} {v}" for k, v in sorted(ready["executed"].items())) + ")"
        if ready.get("index"):
            ran += f"; {ready['index']}"
        p99 = e.get("p99", percentile(e["ms"], 0.99) if e.get("ms") else None)
        add(f"| {e['label']} | {ran} | {fmt(e['p50'])} | {fmt(e['p90'])} | {fmt(p99)} | {fmt(e['mean'])} | "
            f"{fmt(e['rss_mib'], 0, ' MiB')} |")
    for e in lat["workers"]:
        if e.get("parts_p50"):
            parts = ", ".join(f"{k} {v:.0f}" for k, v in e["parts_p50"].items() if k != "total")
            add("")
            add(f"{e['label']}: median stage times (ms) {parts}.")
    add("")
    add(f"### Peak RSS of a fresh inference-only process (load + score {rss['images']} images)")
    add("")
    add("| runtime | peak RSS (VmHWM) | ru_maxrss | after load (VmHWM) | load time |")
    add("|---|---:|---:|---:|---:|")
    for e in rss["probes"]:
        add(f"| {e['label']} | {fmt(e.get('vm_hwm_mib'), 0, ' MiB')} | {fmt(e['maxrss_mib'], 0, ' MiB')} | "
            f"{fmt(e['maxrss_after_load_mib'], 0, ' MiB')} | {fmt(e['load_s'], 2, ' s')} |")
    add("")
    add("### Goals (reported, not asserted)")
    add("")
    for goal in r["goals"]:
        add(f"- {goal['goal']}: {verdict(goal['met'])} — {goal['detail']}")
    add("")
    return "\n".join(lines)


SPEED_GOAL, RSS_GOAL = 5.0, 0.25  # issue #11: >= 5x faster at p50 per image, peak inference RSS <= 1/4


def evaluate_goals(r: dict) -> list[dict]:
    """Issue #11's side-by-side goals for the README's default flash path against EACH anomalib
    export (fp32 IR and INT8_PTQ), then the coreset goal. Older results (no flash / INT8_PTQ
    worker) fall back to the plain exported bundle and the fp32 IR."""
    goals = []
    lat = {w["key"]: w for w in r["latency"]["workers"]}
    probes = {p["key"]: p for p in r["rss"]["probes"]}
    ec_key = "edgecore-flash" if "edgecore-flash" in lat else "edgecore"
    ec = lat[ec_key]
    peers = [(k, name) for k, name in (("anomalib", "fp32 IR"), ("anomalib-static", "fp32 IR, static input"),
                                       ("anomalib-int8", "INT8_PTQ IR")) if k in lat]
    speed_parts, speed_ok = [], True
    for key, name in peers:
        an = lat[key]
        ratio = an["p50"] / ec["p50"]
        speed_ok &= ratio >= SPEED_GOAL
        speed_parts.append(f"vs anomalib {name}: p50 {ec['p50']:.0f} vs {an['p50']:.0f} ms = {ratio:.2f}× "
                           f"({'met' if ratio >= SPEED_GOAL else f'missed by {SPEED_GOAL / ratio:.2f}×'})")
    for key, label in (("edgecore", "bundle as exported, no compile"), ("edgecore-int8", "VNNI int8 engine")):
        if key != ec_key and key in lat:
            speed_parts.append(f"{label}: p50 {lat[key]['p50']:.0f} ms = "
                               + ", ".join(f"{lat[k]['p50'] / lat[key]['p50']:.2f}×" for k, _ in peers))
    goals.append({"goal": f"README default flash path ({ec_key}) ≥ {SPEED_GOAL:.0f}× faster at p50 per image than "
                          "anomalib's fp32 IR and its INT8_PTQ IR", "met": speed_ok, "detail": "; ".join(speed_parts)})
    rss_parts, rss_ok = [], True
    ec_rss = probes[ec_key]["vm_hwm_mib"]
    for key, name in peers:
        an_rss = probes[key]["vm_hwm_mib"]
        share = ec_rss / an_rss
        rss_ok &= share <= RSS_GOAL
        rss_parts.append(f"vs anomalib {name}: {ec_rss:.0f} vs {an_rss:.0f} MiB = {share:.2f} "
                         f"({'met' if share <= RSS_GOAL else f'missed: {ec_rss - RSS_GOAL * an_rss:.0f} MiB over'})")
    for key, name in (("anomalib-bare", "fp32 IR"), ("anomalib-int8-bare", "INT8_PTQ IR")):
        if key in probes:
            rss_parts.append(f"anomalib's {name} under bare OpenVINO (no torch/anomalib import) {probes[key]['vm_hwm_mib']:.0f} MiB "
                             f"({ec_rss / probes[key]['vm_hwm_mib']:.2f})")
    goals.append({"goal": f"peak inference RSS of the flash path ≤ {RSS_GOAL:.2f} of anomalib's (each export)",
                  "met": rss_ok, "detail": "; ".join(rss_parts)})

    cs, ao = r["coreset"], r["anomalib_fit"]["out"]
    e = cs["edgecore"][0]
    times = [("in Engine.fit" + (", extrapolated" if ao.get("coreset_extrapolated") else ""), ao["coreset_s"])]
    if cs.get("anomalib_rerun"):
        rr = cs["anomalib_rerun"]
        times.append(("same-bank re-run" + (", extrapolated" if rr.get("extrapolated") else ", full"), rr["coreset_s"]))
    speeds = [(name, t / e["s"]) for name, t in times]
    speed_ok = all(x >= 5.0 for _, x in speeds)
    parts = [f"edgecore ({e['projection_dim']}-d, its default) {e['s']:.1f} s vs anomalib "
             + ", ".join(f"{t:.0f} s ({name})" for name, t in times)
             + " = " + ", ".join(f"{x:.0f}×" for _, x in speeds) + " faster"]
    radii = [x for x in (cs.get("anomalib_radius"), (cs.get("anomalib_rerun") or {}).get("radius")) if x]
    sub = cs.get("subsample") or {}
    if radii:
        radius_ok = e["radius"] <= min(radii)
        parts.append(f"radius {e['radius']:.4f} vs {', '.join(f'{x:.4f}' for x in radii)} on the full bank "
                     f"({100 * (e['radius'] / min(radii) - 1):+.1f} %)")
    elif sub.get("anomalib"):
        se, sa = sub["edgecore"][0], sub["anomalib"]
        radius_ok = se["radius"] <= sa["radius"]
        parts.append(f"radius on the 1/{sub['every']} subsample (both in full) {se['radius']:.4f} vs {sa['radius']:.4f} "
                     f"({100 * (se['radius'] / sa['radius'] - 1):+.1f} %; there {sa['coreset_s']:.0f} s vs {se['s']:.1f} s = "
                     f"{sa['coreset_s'] / se['s']:.2f}×); anomalib's full-bank radius not measured")
    else:
        radius_ok = False
        parts.append("no anomalib radius measured")
    if len(cs["edgecore"]) > 1:
        for other in cs["edgecore"][1:]:
            parts.append(f"edgecore at {other['projection_dim']}-d (anomalib's projection size; not its default): "
                         f"{other['s']:.1f} s, radius {other['radius']:.4f}")
    goals.append({"goal": "coreset selection ≥ 5× faster than anomalib's KCenterGreedy at equal or smaller coverage radius",
                  "met": speed_ok and radius_ok, "detail": "; ".join(parts)})
    return goals


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default="/tmp/anomalib-venv", help="anomalib's virtual environment")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mvtec_bottle"))
    parser.add_argument("--work", default="/tmp/peer/run", help="scratch folder (models, bundles, logs)")
    parser.add_argument("--latency-images", type=int, default=0, help="0 = all test images")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rss-images", type=int, default=20)
    parser.add_argument("--anomalib-coreset-steps", type=int, default=0,
                        help="0 = anomalib's KCenterGreedy runs in full; K = only K greedy steps, time extrapolated "
                             "(each step is one pass over all N rows; for a loaded machine where the full run takes hours)")
    parser.add_argument("--anomalib-rerun-steps", type=int, default=-1,
                        help="steps for the same-bank re-run of anomalib's KCenterGreedy (-1 = as --anomalib-coreset-steps, 0 = full)")
    parser.add_argument("--redo-coreset", action="store_true", help="with --reuse: run the coreset stage again")
    parser.add_argument("--subsample-every", type=int, default=10,
                        help="also run both samplers in full on every S-th bank row (radius comparison); 0 = off")
    parser.add_argument("--extra-projection-dims", default="",
                        help="comma list: also run edgecore's sampler at these projection dims ('anomalib' = its JL dim)")
    parser.add_argument("--compile-int8", action="store_true",
                        help="also compile + measure edgecore's VNNI int8 engine (compile --precision int8, not --portable)")
    parser.add_argument("--flash-search", default="",
                        help="comma list of search modes: also measure the flash bundle with Detector.open(search=MODE) "
                             "(not the default path; e.g. int8 to see a mode the exporter did not choose)")
    parser.add_argument("--reuse", action="store_true", help="reuse fit/export/coreset results already in WORK")
    parser.add_argument("--redo-edgecore-export", action="store_true",
                        help="with --reuse: export + compile the edgecore bundles again from the same fitted model with "
                             "the current code (e.g. a new default search), then measure latency/RSS")
    parser.add_argument("--report-only", action="store_true", help="only re-render WORK/results.json as Markdown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    venv_python = str(Path(args.venv) / "bin" / "python")
    work.mkdir(parents=True, exist_ok=True)
    cwd = work / "cwd"  # anomalib's OpenVINOInferencer writes ./openvino_cache
    cwd.mkdir(exist_ok=True)
    mvtec_root = work / "mvtec"  # anomalib's MVTecAD wants ROOT/<category>: a symlink, no copy, no download
    mvtec_root.mkdir(exist_ok=True)
    link = mvtec_root / "bottle"
    if not link.exists():
        link.symlink_to(data, target_is_directory=True)
    results_file = work / "results.json"
    if args.report_only:
        r = json.loads(results_file.read_text())
        r["goals"] = evaluate_goals(r)
        report = build_report(r)
        (work / "report.md").write_text(report)
        print(report)
        return
    prev = json.loads(results_file.read_text()) if args.reuse and results_file.exists() else {}

    py = sys.executable
    r: dict = {"machine": machine_info(), "versions": project_versions(py), "data": str(data), "args": vars(args),
               "git": git_state(), "uptime_start": uptime()}
    ec_model, ec_bundle, an_work = work / "ec_model", work / "ec.edgecore", work / "anomalib"

    # 1-2. fit (edgecore first, then anomalib; both write only under WORK)
    if prev.get("edgecore_fit"):
        r["edgecore_fit"] = prev["edgecore_fit"]
    else:
        shutil.rmtree(ec_model, ignore_errors=True)
        r["edgecore_fit"] = run_step("edgecore_fit", [
            py, "-m", "edgecore.cli", "fit", str(data), "-o", str(ec_model), "--backbone", "wide_resnet50_2",
            "--random-init", "--coreset-ratio", "0.1", "--num-neighbors", "9", "--seed", str(args.seed)], work)
    if prev.get("anomalib_fit"):
        r["anomalib_fit"] = prev["anomalib_fit"]
    else:
        shutil.rmtree(an_work, ignore_errors=True)
        r["anomalib_fit"] = run_step("anomalib_fit", [
            venv_python, str(HERE / "anomalib_side.py"), "fit", "--root", str(mvtec_root), "--category", "bottle",
            "--work", str(an_work), "--seed", str(args.seed), "--dump-bank",
            "--coreset-steps", str(args.anomalib_coreset_steps)], work)
    (an_work / "fit.json").write_text(json.dumps(r["anomalib_fit"]["out"]))
    results_file.write_text(json.dumps(r, indent=1))

    # 3-4. export
    images = test_images(data)
    redo_ec = args.redo_edgecore_export
    if prev.get("edgecore_export") and not redo_ec:
        r["edgecore_export"] = prev["edgecore_export"]
    else:
        if prev.get("edgecore_export"):
            r["edgecore_export_previous"] = prev["edgecore_export"]
        shutil.rmtree(ec_bundle, ignore_errors=True)
        step = run_step("edgecore_export", [py, "-m", "edgecore.cli", "export", str(ec_model), "-o", str(ec_bundle)], work)
        step["bytes"] = step["out"].get("bytes", 0)
        r["edgecore_export"] = step
    # Compiled COPIES: the plain bundle stays what `edgecore export` wrote. The flash bundle is the
    # README quickstart (export, then compile --precision int8 --portable); Detector.open(bundle)
    # with no options then picks its best compiled engine and the exporter's search choice.
    ec_flash, ec_int8 = work / "ec-flash.edgecore", work / "ec-int8.edgecore"
    compiles = [("edgecore_compile_flash", ec_flash, ["--precision", "int8", "--portable"], True),
                ("edgecore_compile_int8", ec_int8, ["--precision", "int8"], args.compile_int8)]
    for name, target, flags, wanted in compiles:
        if prev.get(name) and not redo_ec:
            r[name] = prev[name]
        elif wanted:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ec_bundle, target)
            r[name] = run_step(name, [py, "-m", "edgecore.cli", "compile", str(target), *flags, "--calib", str(data)], work)
    r["edgecore_search"] = {b.name: bundle_search(b) for b in (ec_bundle, ec_flash) if b.exists()}
    if prev.get("anomalib_export"):
        r["anomalib_export"] = prev["anomalib_export"]
    else:
        r["anomalib_export"] = run_step("anomalib_export", [
            venv_python, str(HERE / "anomalib_side.py"), "export", "--work", str(an_work),
            "--fit-json", str(an_work / "fit.json"), "--probe-image", images[0]], work, cwd=cwd)
    results_file.write_text(json.dumps(r, indent=1))
    # Static-input exports at the frames' size (see anomalib_side.export_static): INT8_PTQ needs one,
    # and the fp32 one shows whether a static graph is anomalib's faster fp32 export.
    with Image.open(images[0]) as im:
        side = max(im.size)
    for name, flags in (("anomalib_export_static", []),
                        ("anomalib_export_int8", ["--compression", "int8_ptq", "--root", str(mvtec_root)])):
        if prev.get(name):
            r[name] = prev[name]
        else:
            r[name] = run_step(name, [venv_python, str(HERE / "anomalib_side.py"), "export", "--work", str(an_work),
                                      "--fit-json", str(an_work / "fit.json"), "--input-size", str(side), *flags,
                                      "--seed", str(args.seed)], work, cwd=cwd)
        results_file.write_text(json.dumps(r, indent=1))
    xml, xml_static = r["anomalib_export"]["out"]["xml"], r["anomalib_export_static"]["out"]["xml"]
    xml_int8 = r["anomalib_export_int8"]["out"]["xml"]

    # 5. coreset on one bank
    if prev.get("coreset") and not args.redo_coreset:
        r["coreset"] = prev["coreset"]
    else:
        ao = r["anomalib_fit"]["out"]
        dims = ["128"] + [str(ao["projected_dim"]) if d == "anomalib" else d
                          for d in args.extra_projection_dims.split(",") if d]
        cmd = [py, str(HERE / "coreset_compare.py"), "--bank", ao["bank_file"], "--seed", str(args.seed),
               "--work", str(work), "--projection-dims", ",".join(dims), "--rerun-anomalib", venv_python,
               "--rerun-steps", str(args.anomalib_coreset_steps if args.anomalib_rerun_steps < 0 else args.anomalib_rerun_steps), "--subsample-every", str(args.subsample_every)]
        if not ao["coreset_extrapolated"]:
            cmd += ["--anomalib-idx", str(an_work / "anomalib_coreset_idx.npy")]
        r["coreset"] = run_step("coreset_compare", cmd, work)["out"]
    results_file.write_text(json.dumps(r, indent=1))

    # 6. interleaved latency
    latency_images = images[: args.latency_images] if args.latency_images else images
    anomalib_side, edgecore_side = [venv_python, str(HERE / "anomalib_side.py")], [py, str(HERE / "edgecore_side.py")]
    configs = [
        ("anomalib", "anomalib OpenVINOInferencer, fp32 IR (Engine.export openvino; OV CPU default hint)",
         [*anomalib_side, "serve", "--xml", xml]),
        ("anomalib-static", "anomalib OpenVINOInferencer, fp32 IR with static input (Engine.export input_size)",
         [*anomalib_side, "serve", "--xml", xml_static]),
        ("anomalib-int8", "anomalib OpenVINOInferencer, INT8_PTQ IR (Engine.export compression_type=INT8_PTQ, static input)",
         [*anomalib_side, "serve", "--xml", xml_int8]),
        ("anomalib-bare", "anomalib's fp32 IR via bare openvino (no anomalib/torch import)",
         [*anomalib_side, "serve", "--xml", xml, "--bare"]),
        ("anomalib-int8-bare", "anomalib's INT8_PTQ IR via bare openvino (no anomalib/torch import)",
         [*anomalib_side, "serve", "--xml", xml_int8, "--bare"]),
        ("edgecore-flash", "edgecore README default flash path: export + compile --precision int8 --portable, "
                           "Detector.open(bundle) defaults",
         [*edgecore_side, "serve", "--bundle", str(ec_flash)]),
        ("edgecore", "edgecore Detector.open(bundle) as exported, no compile (ONNX → OV, CPU default hint)",
         [*edgecore_side, "serve", "--bundle", str(ec_bundle)]),
    ]
    if ec_int8.exists() and r.get("edgecore_compile_int8"):
        configs.append(("edgecore-int8", "edgecore Detector, VNNI int8 engine (compile --precision int8, not --portable)",
                        [*edgecore_side, "serve", "--bundle", str(ec_int8), "--precision", "int8"]))
    for mode in filter(None, args.flash_search.split(",")):
        configs.append((f"edgecore-flash-{mode}", f"edgecore flash bundle, search {mode} forced (Detector.open(search=...), not the default)",
                        [*edgecore_side, "serve", "--bundle", str(ec_flash), "--search", mode]))
    log(f"latency: {len(configs)} workers × {len(latency_images)} images, interleaved")
    uptime_before = uptime()
    workers = []
    for key, label, cmd in configs:
        worker = Worker(label, cmd, cwd, work / "logs" / f"serve_{key}.err")
        worker.key = key
        workers.append(worker)
    interleaved_latency(workers, latency_images, args.warmup, args.seed)
    uptime_after = uptime()
    entries = []
    for worker in workers:
        final = worker.close()
        entries.append({
            "key": worker.key, "label": worker.label, "p50": percentile(worker.ms, 0.5), "p90": percentile(worker.ms, 0.9),
            "p99": percentile(worker.ms, 0.99),
            "mean": statistics.fmean(worker.ms), "n": len(worker.ms), "rss_mib": final.get("rss_mib"),
            "ready": worker.ready, "ms": worker.ms,
            "parts_p50": {k: percentile([p[k] for p in worker.parts], 0.5) for k in worker.parts[0]} if worker.parts else None,
        })
    r["latency"] = {"images": len(latency_images), "warmup": args.warmup, "workers": entries,
                    "uptime_before": uptime_before, "uptime_after": uptime_after}
    results_file.write_text(json.dumps(r, indent=1))

    # 7. peak RSS, fresh inference-only processes
    rss_images = images[: args.rss_images]
    probes = []
    for key, label, cmd in configs:
        side = cmd[:2] + ["rss"] + cmd[3:] + ["--images", *rss_images]
        out = rss_probe(f"rss_{key}", side, work, cwd)
        probes.append({"key": key, "label": label, **out})
    r["rss"] = {"images": len(rss_images), "probes": probes}
    r["loadavg_end"] = os.getloadavg()
    r["uptime_end"] = uptime()
    r["goals"] = evaluate_goals(r)
    results_file.write_text(json.dumps(r, indent=1))
    report = build_report(r)
    (work / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
