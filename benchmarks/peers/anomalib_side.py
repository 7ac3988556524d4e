"""anomalib half of the peer benchmark. Runs with the anomalib venv's python, never the project's.

    anomalib_side.py fit    --root R --category C --work W     # Engine.fit, phase timings, bank dump
    anomalib_side.py export --work W                            # Engine.export(openvino) from the checkpoint
    anomalib_side.py export --work W --input-size 900 [--compression int8_ptq --root R]
                                                                # static input; NNCF INT8_PTQ on its datamodule
    anomalib_side.py serve  --xml X                             # stdin/stdout worker for interleaved latency
    anomalib_side.py rss    --xml X --images I... [--bare]      # fresh inference-only process: ru_maxrss
    anomalib_side.py kcenter --bank B.npy --ratio 0.1           # anomalib's KCenterGreedy alone, on any bank

Every command prints one JSON line (last line of stdout) for the orchestrator
(``anomalib_peer.py``). Nothing here downloads anything: the backbone is built with
``pre_trained=False`` and the MVTec datamodule finds ``root/category`` on disk.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()


from _probe import emit, max_rss_mib, vm_hwm_mib  # shared by both sides (each runs as a script)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def versions() -> dict:
    import anomalib
    import lightning
    import openvino
    import timm
    import torch

    return {
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "openvino": openvino.__version__,
        "python": sys.version.split()[0],
        "executable": sys.executable,
    }


def build_model(args):
    from anomalib.models import Patchcore

    pre = Patchcore.configure_pre_processor(image_size=(args.resize, args.resize), center_crop_size=(args.crop, args.crop))
    # evaluator/visualizer off: edgecore's fit computes no metrics and draws nothing either.
    # The post-processor (threshold + normalisation from the validation split) stays: edgecore fits its threshold too.
    return Patchcore(
        backbone="wide_resnet50_2",
        layers=["layer2", "layer3"],
        pre_trained=False,
        coreset_sampling_ratio=args.ratio,
        num_neighbors=args.num_neighbors,
        pre_processor=pre,
        evaluator=False,
        visualizer=False,
    )


def run_kcenter(sampler, select, steps: int, seed: int) -> tuple[list[int], dict]:
    """Run anomalib's ``select_coreset_idxs`` (``select``, the unpatched method) on ``sampler``.

    ``steps`` = 0: the full selection, timed. ``steps`` = K > 0 (and smaller than the
    coreset): anomalib's own loop runs only K greedy steps; its projection (fit +
    transform of SparseRandomProjection) is timed separately, and the full time is
    extrapolated as projection + loop x (size - 1) / K; every greedy step costs the same
    (one distance pass over all N projected rows), so this is linear by construction.
    The returned indices are then the K + 1 greedy picks followed by distinct random
    rows up to the full coreset size, so the model keeps anomalib's bank size (its
    inference cost is exact search over all rows, independent of which rows they are).
    """
    import numpy as np

    full = sampler.coreset_size
    info: dict = {"size": full, "steps_measured": full - 1, "extrapolated": False}
    projection = {"s": 0.0}
    if steps and steps < full - 1:
        model = sampler.model
        for name in ("fit", "transform"):
            method = getattr(model, name)

            def timed(*a, _method=method, **k):
                t = time.perf_counter()
                try:
                    return _method(*a, **k)
                finally:
                    projection["s"] += time.perf_counter() - t

            setattr(model, name, timed)
        sampler.coreset_size = steps + 1
    start, cpu_start = time.perf_counter(), time.process_time()
    idxs = [int(i) for i in select(sampler)]
    measured, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    info.update(measured_s=measured, measured_cpu_s=cpu, projected_dim=int(sampler.features.shape[1]))
    if sampler.coreset_size != full:
        loop = measured - projection["s"]
        scale = (full - 1) / steps
        info.update(
            extrapolated=True, steps_measured=steps, projection_s=projection["s"],
            coreset_s=projection["s"] + loop * scale, coreset_cpu_s=None,  # CPU time is not extrapolated
        )
        rng = np.random.default_rng(seed)
        rest = np.setdiff1d(np.arange(sampler.n_observations), np.asarray(idxs))
        idxs += rng.choice(rest, size=full - len(idxs), replace=False).tolist()
        sampler.coreset_size = full
    else:
        info.update(coreset_s=measured, coreset_cpu_s=cpu)
    return idxs, info


# --------------------------------------------------------------------------- fit
def cmd_fit(args) -> None:
    import numpy as np
    import torch
    from lightning.pytorch import Callback, seed_everything

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models.components.sampling import k_center_greedy

    t_imported = time.perf_counter()
    torch.set_num_threads(args.threads) if args.threads else None
    seed_everything(args.seed, workers=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    # Time anomalib's own KCenterGreedy as the Engine calls it, and keep its input bank and
    # selection so the orchestrator can run edgecore's sampler on the very same bank.
    record: dict = {}
    original = k_center_greedy.KCenterGreedy.select_coreset_idxs

    def timed_select(self):
        idxs, info = run_kcenter(self, original, args.coreset_steps, args.seed)
        record.update(info)
        record["bank_shape"] = list(self.embedding.shape)
        record["embedding"] = self.embedding  # a reference, dumped after the timed fit
        record["idxs"] = idxs
        return idxs

    k_center_greedy.KCenterGreedy.select_coreset_idxs = timed_select

    marks: dict[str, float] = {}

    class Phases(Callback):
        def on_train_start(self, trainer, pl_module):
            marks["train_start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            marks["features_end"] = time.perf_counter()  # the last one wins: all train features extracted

        def on_validation_start(self, trainer, pl_module):
            # callbacks run before the module's own on_validation_start, which is where
            # MemoryBankMixin runs the coreset selection; validation_s below excludes it
            marks["val_start"] = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            marks["val_end"] = time.perf_counter()

    datamodule = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
        # like edgecore: hold out val_ratio of train/good to set the threshold (edgecore: --val-ratio 0.1)
        val_split_mode="from_train",
        val_split_ratio=args.val_ratio,
        seed=args.seed,
    )
    model = build_model(args)
    engine = Engine(
        callbacks=[Phases()],
        default_root_dir=str(work / "results"),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        **({"limit_train_batches": args.limit_train_batches} if args.limit_train_batches else {}),
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    if record.get("extrapolated"):  # add the greedy steps that were not run
        fit_s_measured, fit_s = fit_s, fit_s + record["coreset_s"] - record["measured_s"]
    else:
        fit_s_measured = fit_s
    ckpt = engine.best_model_path or ""
    if not ckpt:
        ckpt = str(work / "patchcore.ckpt")
        engine.trainer.save_checkpoint(ckpt)

    bank_file = ""
    if args.dump_bank and "embedding" in record:
        bank_file = str(work / "anomalib_bank.npy")
        np.save(bank_file, record["embedding"].detach().cpu().numpy().astype(np.float32, copy=False))
        np.save(work / "anomalib_coreset_idx.npy", np.asarray(record["idxs"], dtype=np.int64))

    features_s = marks.get("features_end", float("nan")) - marks.get("train_start", float("nan"))
    emit(
        {
            "side": "anomalib",
            "cmd": "fit",
            "engine_fit_s": fit_s,
            "engine_fit_measured_s": fit_s_measured,
            "features_s": features_s,
            "coreset_s": record.get("coreset_s"),
            "coreset_cpu_s": record.get("coreset_cpu_s"),
            "coreset_measured_s": record.get("measured_s"),
            "coreset_steps_measured": record.get("steps_measured"),
            "coreset_extrapolated": record.get("extrapolated"),
            "coreset_projection_s": record.get("projection_s"),
            "validation_s": marks.get("val_end", float("nan")) - marks.get("val_start", float("nan"))
            - record.get("measured_s", 0.0),
            "cpu_s": _cpu_seconds(),
            "import_s": t_imported - T_PROCESS,
            "bank_shape": record.get("bank_shape"),
            "projected_dim": record.get("projected_dim"),
            "coreset_size": record.get("size"),
            "train_images": len(datamodule.train_data),
            "val_images": len(datamodule.val_data),
            "checkpoint": ckpt,
            "bank_file": bank_file,
            "threads": torch.get_num_threads(),
            "versions": versions(),
        }
    )


# --------------------------------------------------------------------------- export
def _ir_input_shape(xml: Path) -> str:
    import openvino as ov

    return str(ov.Core().read_model(str(xml)).input(0).get_partial_shape())


def _dynamic_hw(torch) -> dict:
    """The export work-around (see cmd_export): batch 1, height and width dynamic."""
    return {"dynamic_shapes": ({2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)},)}


def export_static(args, engine, model) -> dict:
    """``Engine.export(openvino, input_size=(H, W))`` with a fully static batch-1 input, optionally
    ``compression_type=CompressionType.INT8_PTQ`` (anomalib's post-training quantization:
    ``nncf.quantize`` of the converted IR, calibrated on the datamodule's ``val_dataloader()``;
    with ``val_split_mode="from_train"`` that is the 10 % of train/good held out at fit, as in
    ``cmd_fit``).

    Why static: anomalib 2.7's INT8_PTQ reads ``model.input(0).shape[0]``, which OpenVINO refuses
    on any dynamic input ("to_shape was called on a dynamic shape"), so the dynamic-H/W IR of
    the fp32 work-around cannot be quantized; and its default (dynamic batch) gives a batch-2
    IR. ``input_size`` = the frames' size (bottle: 900 x 900; resize/crop stay in the graph) and
    ``dynamic_shapes=None`` give [1,3,H,W], which both its quantizer and its inferencer accept
    (anomalib's own CLI example for INT8_PTQ passes ``--input_size`` too). The datamodule's
    eval batch is 1 to match that IR (anomalib adapts only the *train* batch size).
    """
    from anomalib.data import MVTecAD
    from anomalib.deploy import CompressionType, ExportType

    size = (args.input_size, args.input_size)
    kwargs: dict = {}
    datamodule = None
    if args.compression == "int8_ptq":
        datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=1, eval_batch_size=1,
                             num_workers=0, val_split_mode="from_train", val_split_ratio=args.val_ratio, seed=args.seed)
        kwargs = {"compression_type": CompressionType.INT8_PTQ, "datamodule": datamodule}
    start = time.perf_counter()
    xml = Path(engine.export(model=model, export_type=ExportType.OPENVINO, input_size=size,
                             export_root=str(Path(args.work) / f"export_{args.compression}_{args.input_size}"),
                             onnx_kwargs={"dynamic_shapes": None}, **kwargs))
    result = {"compression": args.compression, "export_s": time.perf_counter() - start, "input_size": list(size),
              "workaround": f"input_size={size}, onnx_kwargs dynamic_shapes=None -> static [1,3,H,W]", "xml": xml}
    if datamodule is not None:
        result["calibration_images"] = len(datamodule.val_data)
    return result


def cmd_export(args) -> None:
    """Engine.export(export_type="openvino") from the fit checkpoint, as anomalib documents it.

    anomalib 2.7's default export marks batch, height and width dynamic and traces a
    (2, 3, 2, 2) example with the dynamo ONNX exporter; with torch 2.14 the batch axis comes
    out specialised to 2 (IR input [2,3,?,?]), so its own OpenVINOInferencer cannot score one
    image. When that happens (checked on the IR, not assumed) the export is redone with
    ``onnx_kwargs={"dynamic_shapes": ({2: Dim("height"), 3: Dim("width")},)}``: batch 1,
    height/width still dynamic (resize + crop + normalise stay inside the graph, as in the
    default export). Both exports are timed; ``export_s`` is the one that is used.
    """
    import torch

    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    t_imported = time.perf_counter()
    fit = json.loads(Path(args.fit_json).read_text())
    ckpt = fit["checkpoint"]
    start = time.perf_counter()
    model = Patchcore.load_from_checkpoint(ckpt, map_location="cpu")
    load_s = time.perf_counter() - start
    engine = Engine(default_root_dir=str(Path(args.work) / "results"), accelerator="cpu", devices=1, enable_progress_bar=False)

    if args.input_size or args.compression != "none":
        if not args.input_size:
            raise SystemExit("--compression int8_ptq needs --input-size (anomalib's quantizer needs a static input)")
        result = export_static(args, engine, model)
        xml = result.pop("xml")
        emit(_export_payload(result, xml, model, load_s, t_imported, torch))
        return

    start = time.perf_counter()
    xml = Path(engine.export(model=model, export_type="openvino", export_root=str(Path(args.work) / "export_default")))
    default_s = time.perf_counter() - start
    default_shape = _ir_input_shape(xml)
    result = {
        "default_export_s": default_s,
        "default_input_shape": default_shape,
        "workaround": None,
        "export_s": default_s,
    }
    if not default_shape.startswith("[1,") and not default_shape.startswith("[?,"):
        if args.probe_image:  # show what a user of the default export gets
            try:
                open_inferencer(str(xml), bare=False).predict(args.probe_image)
                result["default_inferencer_error"] = None
            except Exception as exc:  # noqa: BLE001 - reported verbatim
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                result["default_inferencer_error"] = f"{type(exc).__name__}: " + " ".join(lines[-2:])
        start = time.perf_counter()
        xml = Path(engine.export(model=model, export_type="openvino", export_root=str(Path(args.work) / "export"),
                                 onnx_kwargs=_dynamic_hw(torch)))
        result["export_s"] = time.perf_counter() - start
        result["workaround"] = "onnx_kwargs dynamic_shapes=({2: Dim('height'), 3: Dim('width')},) -> batch 1"
    emit(_export_payload(result, xml, model, load_s, t_imported, torch))


def _export_payload(result: dict, xml: Path, model, load_s: float, t_imported: float, torch) -> dict:
    return {
        "side": "anomalib",
        "cmd": "export",
        **result,
        "input_shape": _ir_input_shape(xml),
        "load_ckpt_s": load_s,
        "import_s": t_imported - T_PROCESS,
        "xml": str(xml),
        "ir_bytes": xml.stat().st_size + xml.with_suffix(".bin").stat().st_size,
        "memory_bank": list(model.model.memory_bank.shape),
        "threads": torch.get_num_threads(),
        "cpu_s": _cpu_seconds(),
    }


# --------------------------------------------------------------------------- inference
class BareOpenVINO:
    """anomalib's exported IR with only openvino + numpy + Pillow (no torch, no anomalib import).

    Same input contract as anomalib's OpenVINOInferencer (float32 RGB in [0,1], NCHW, full
    resolution; resize/crop/normalise are inside the exported graph), so it measures what
    the IR itself needs, as a lower bound for any anomalib-exported deployment.
    """

    def __init__(self, xml: str) -> None:
        import openvino as ov

        core = ov.Core()
        self.model = core.compile_model(core.read_model(xml), "CPU")
        self.request = self.model.create_infer_request()

    def predict(self, path: str):
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        result = self.request.infer({0: image.transpose(2, 0, 1)[None]})
        return {next(iter(k.names)): v for k, v in result.items()}


_COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}


def executed_precisions(compiled) -> dict[str, int]:
    """Runtime precision per executed compute layer (the hint alone does not say whether the
    INT8_PTQ IR's convolutions really run in i8/u8); same rule as edgecore's OpenVINO backend."""
    counts: dict[str, int] = {}
    try:
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info and "layerType" in info and str(info["layerType"].astype(str)) in _COMPUTE_LAYERS:
                key = str(info["runtimePrecision"].astype(str))
                counts[key] = counts.get(key, 0) + 1
    except Exception:  # noqa: BLE001 - reporting only
        return {}
    return counts


def open_inferencer(xml: str, bare: bool):
    if bare:
        return BareOpenVINO(xml)
    from anomalib.deploy import OpenVINOInferencer

    return OpenVINOInferencer(path=xml, device="CPU")


def score_of(prediction) -> float:
    if isinstance(prediction, dict):
        return float(prediction["pred_score"].reshape(-1)[0])
    return float(prediction.pred_score.reshape(-1)[0])


def cmd_serve(args) -> None:
    """Line protocol: one image path in, one JSON line out (ms measured around predict only)."""
    inferencer = open_inferencer(args.xml, args.bare)
    try:  # what OpenVINO will execute: its CPU default on bf16-capable CPUs is bf16, on both sides
        hint = str(inferencer.model.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # noqa: BLE001
        hint = "unknown"
    emit({"ready": True, "rss_mib": vm_hwm_mib(), "inference_precision_hint": hint,
          "executed": executed_precisions(inferencer.model)})
    for line in sys.stdin:
        path = line.strip()
        if not path:
            break
        start = time.perf_counter()
        prediction = inferencer.predict(path)
        ms = (time.perf_counter() - start) * 1e3
        emit({"ms": ms, "score": score_of(prediction)})
    emit({"done": True, "rss_mib": vm_hwm_mib()})


def cmd_rss(args) -> None:
    start = time.perf_counter()
    inferencer = open_inferencer(args.xml, args.bare)
    load_s = time.perf_counter() - start
    rss_loaded = vm_hwm_mib()
    scores = [score_of(inferencer.predict(path)) for path in args.images]
    emit(
        {
            "side": "anomalib-bare-ov" if args.bare else "anomalib",
            "cmd": "rss",
            "images": len(scores),
            "load_s": load_s,
            "maxrss_after_load_mib": rss_loaded,
            "maxrss_mib": max_rss_mib(),
            "vm_hwm_mib": vm_hwm_mib(),
        }
    )


# --------------------------------------------------------------------------- coreset
def cmd_kcenter(args) -> None:
    """anomalib's KCenterGreedy class, unchanged, on a bank given as .npy (e.g. edgecore's)."""
    import numpy as np
    import torch

    from anomalib.models.components.sampling import KCenterGreedy

    torch.manual_seed(args.seed)
    bank = torch.from_numpy(np.load(args.bank))
    sampler = KCenterGreedy(embedding=bank, sampling_ratio=args.ratio)
    idxs, info = run_kcenter(sampler, KCenterGreedy.select_coreset_idxs, args.steps, args.seed)
    if not info["extrapolated"]:
        np.save(args.out, np.asarray(idxs, dtype=np.int64))
    emit({"cmd": "kcenter", **info})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fit")
    p.add_argument("--root", required=True)
    p.add_argument("--category", default="bottle")
    p.add_argument("--work", required=True)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--num-neighbors", type=int, default=9)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--val-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--limit-train-batches", type=int, default=0, help="smoke tests only")
    p.add_argument("--dump-bank", action="store_true")
    p.add_argument("--coreset-steps", type=int, default=0,
                   help="run only K greedy steps of anomalib's KCenterGreedy and extrapolate (0 = full)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("export")
    p.add_argument("--work", required=True)
    p.add_argument("--fit-json", required=True)
    p.add_argument("--probe-image", default="", help="score this with the default export to record its error")
    p.add_argument("--compression", choices=("none", "int8_ptq"), default="none",
                   help="int8_ptq: CompressionType.INT8_PTQ, NNCF calibration on the datamodule (needs --root)")
    p.add_argument("--root", default="", help="MVTec root (int8_ptq calibration data)")
    p.add_argument("--input-size", type=int, default=0, help="static square input H = W (0: the dynamic-H/W export)")
    p.add_argument("--category", default="bottle")
    p.add_argument("--val-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_export)

    for name, func in (("serve", cmd_serve), ("rss", cmd_rss)):
        p = sub.add_parser(name)
        p.add_argument("--xml", required=True)
        p.add_argument("--bare", action="store_true", help="openvino only, no anomalib/torch import")
        if name == "rss":
            p.add_argument("--images", nargs="+", required=True)
        p.set_defaults(func=func)

    p = sub.add_parser("kcenter")
    p.add_argument("--bank", required=True)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=0, help="K greedy steps, extrapolated (0 = full run)")
    p.set_defaults(func=cmd_kcenter)

    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
