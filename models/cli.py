"""``codec-train``: train, fine-tune, export and evaluate the codec.

    codec-train train --data ~/.cache/codec-corpus --run runs/main --steps 200000
    codec-train train --data my-voice/ --run runs/mine --init-from runs/main/latest.pt  # fine-tune
    codec-train export --checkpoint runs/main/latest.pt --out streaming/assets/default
    codec-train evaluate --checkpoint runs/main/latest.pt --data ../shared/data/dev

``train`` resumes from ``<run>/latest.pt`` when it exists, so the same command continues an
interrupted run (SIGTERM / Ctrl-C save a checkpoint before exiting).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

DEFAULT_CORPUS = Path.home() / ".cache" / "codec-corpus"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "checkpoints" / "default.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codec-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train or fine-tune (resumes automatically)")
    train.add_argument("--data", type=Path, action="append",
                       help=f"audio folder or manifest.csv (repeatable; default {DEFAULT_CORPUS})")
    train.add_argument("--run", type=Path, required=True, help="run folder for checkpoints/logs")
    train.add_argument("--steps", type=int, default=200_000, help="train until this step")
    train.add_argument("--init-from", type=Path,
                       help="start from these weights (fine-tuning): a .pt checkpoint, or "
                            "'shipped' for the weights of the bundled model")
    train.add_argument("--resume-weights", type=Path,
                       help="continue a run whose full checkpoint was lost: weights and step "
                            "from this weights-only file, fresh optimizer state")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a TrainConfig field, e.g. --set lr=3e-4 (codec.X for "
                            "codec fields, only when starting a new run)")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--device", default="auto",
                       help="where the model trains: auto (a CUDA GPU when torch sees one, "
                            "else the CPU), cpu, cuda or cuda:N; checkpoints load anywhere")

    export = sub.add_parser("export", help="export ONNX encoder/decoder steps and a model card")
    export.add_argument("--checkpoint", type=Path, help="trained checkpoint (.pt)")
    export.add_argument("--random", action="store_true", help="export random weights (tests)")
    export.add_argument("--out", type=Path, required=True, help="output model folder")
    export.add_argument("--model-id", default=None, help="model id recorded in the card")
    export.add_argument("--quality", type=Path, help="JSON of measured quality for the card")
    export.add_argument("--save-weights", type=Path,
                        help=f"also write fp16 weights for fine-tuning (the shipped ones live "
                             f"in {SHIPPED_WEIGHTS.relative_to(SHIPPED_WEIGHTS.parents[2])})")
    export.add_argument("--prior-steps", type=int, default=None, metavar="N",
                        help="steps of the runs the checkpoint was fine-tuned from (recorded in "
                             "the card's training.steps and the model id with its own; default: "
                             "what the checkpoint recorded, runs started by --init-from record "
                             "it)")
    export.add_argument("--lineage", default=None, metavar="TEXT",
                        help="how the checkpoint was trained, for the card (e.g. its runs)")
    export.add_argument("--weights", choices=("int8", "fp16", "fp32"), default="int8",
                        help="weight storage: int8 (default: the ConvNeXt blocks' Linear "
                             "layers as 8-bit integer matmuls with per-row activations, "
                             "~12 MB, the fastest from 8 streams per call; same quality "
                             "as the fp16 graphs on speech, docs/model.md), fp16 (exactly "
                             "the fp16-rounded weights) or fp32")

    evaluate = sub.add_parser("evaluate", help="quick quality check of a checkpoint on clips")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True, help="folder of 16 kHz clips")
    evaluate.add_argument("--codebooks", default="1,5,11", help="comma-separated counts")
    evaluate.add_argument("--limit", type=int, default=0, help="first N clips only (0 = all)")
    evaluate.add_argument("--json", type=Path, help="write results here too")
    return parser


def apply_overrides(config: object, pairs: list[str]) -> None:
    """Set dataclass fields from KEY=VALUE strings, casting to the field's current type."""
    for pair in pairs:
        key, _, value = pair.partition("=")
        target = config
        *path, name = key.split(".")
        for part in path:
            target = getattr(target, part)
        names = {f.name for f in fields(target)}  # type: ignore[arg-type]
        if name not in names:
            raise SystemExit(f"codec-train: unknown setting {key!r}")
        current = getattr(target, name)
        if isinstance(current, bool):
            parsed: object = bool(json.loads(value))
        elif isinstance(current, tuple):  # JSON arrays, e.g. modes=[[2,1],[3,2]]
            parsed = _as_tuples(json.loads(value))
        else:
            parsed = type(current)(value)
        setattr(target, name, parsed)


def _as_tuples(value: object) -> object:
    """JSON arrays (nested) as tuples, the type of the TrainConfig fields that hold them."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def resolve_device(name: str) -> str:
    """The torch device of `--device`: 'auto' = 'cuda' when torch sees a GPU, else 'cpu'."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"codec-train: --device {name}: torch sees no CUDA GPU here")
    if name != "cpu" and not name.startswith("cuda"):
        raise SystemExit(f"codec-train: --device must be auto, cpu, cuda or cuda:N, not {name!r}")
    return name


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from models.codec import CodecConfig
    from models.data import Corpus
    from models.train import TrainConfig, Trainer, describe

    config = TrainConfig()
    latest = args.run / "latest.pt"
    if latest.exists():
        saved = torch.load(latest, map_location="cpu", weights_only=False)["config"]
        codec = CodecConfig(**saved.pop("codec"))
        config = TrainConfig(**saved, codec=codec)
    apply_overrides(config, args.set)
    if args.threads:
        config.threads = args.threads
    torch.set_num_threads(config.threads)
    sources = args.data or [DEFAULT_CORPUS]
    corpus = Corpus.load(sources, config.codec.sample_rate)
    print(f"corpus: {corpus.files} files, {corpus.hours:.2f} h", file=sys.stderr)
    device = resolve_device(args.device)
    print(f"device: {device}", file=sys.stderr)
    trainer = Trainer(args.run, config, corpus, device=device)
    if latest.exists():
        trainer.load(latest)
        print(f"resumed {latest} at step {trainer.step}", file=sys.stderr)
    elif args.resume_weights:
        trainer.load(args.resume_weights, weights_only=True, keep_step=True)
        print(f"continuing from {args.resume_weights} at step {trainer.step}", file=sys.stderr)
    elif args.init_from:
        init = SHIPPED_WEIGHTS if str(args.init_from) == "shipped" else args.init_from
        trainer.load(init, weights_only=True)
        print(f"fine-tuning from {args.init_from}", file=sys.stderr)
    print(f"model: {describe(trainer.model)}", file=sys.stderr)
    trainer.run(args.steps)
    print(f"stopped at step {trainer.step}; checkpoint {latest}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    from models.export import export_model

    if not args.checkpoint and not args.random:
        raise SystemExit("codec-train export: give --checkpoint or --random")
    quality = card_quality(json.loads(args.quality.read_text())) if args.quality else None
    card = export_model(args.out, checkpoint=args.checkpoint, model_id=args.model_id,
                        quality=quality, weights=args.weights, prior_steps=args.prior_steps,
                        lineage=args.lineage)
    if args.save_weights:
        from models.export import save_weights

        save_weights(args.checkpoint, args.save_weights, card["model_id"])
    print(json.dumps({k: card[k] for k in ("model_id", "latency_ms", "mflops_per_second")},
                     indent=2))


def card_quality(report: dict) -> dict:
    """The model card's quality entry: our rows of a benchmarks/bench_quality.py report (or a
    plain dict, kept as it is)."""
    if report.get("benchmark") != "quality":
        return report
    ours = {}
    for row in report["results"]:
        if row["codec"] != "ours":
            continue
        idem = row.get("idempotence") or {}
        ours[row["label"]] = {
            "num_codebooks": row["num_codebooks"],
            "measured_kbps": round(row["mean"]["kbps"], 3),
            "pesq_wb": round(row["mean"]["pesq_wb"], 3),
            "stoi": round(row["mean"]["stoi"], 3),
            "pesq_kept_after_passes": round(idem["kept_fraction"], 3) if idem else None,
        }
    return {"benchmark": "benchmarks/bench_quality.py", "date": report["date"],
            "data": f"../shared/data/{Path(report['data']).name}", "clips": len(report["clips"]),
            "ours": ours}


def cmd_evaluate(args: argparse.Namespace) -> None:
    from models.evaluate import evaluate_checkpoint

    counts = [int(c) for c in args.codebooks.split(",")]
    results = evaluate_checkpoint(args.checkpoint, args.data, counts, limit=args.limit)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    {"train": cmd_train, "export": cmd_export, "evaluate": cmd_evaluate}[args.command](args)


if __name__ == "__main__":
    main()
