"""Compare variants of a training recipe as ensembles, on the validation split only (a research tool).

Usage (from the repository root; a GPU makes it ~25x faster than the 2-core CPU, the numbers are the same kind):
  python benchmarks/sweep_recipes.py --sweep configs/sweeps/recipe-study-2026-11-22.yaml --out runs/sweep \
      [--only base,e3x3] [--parallel 3] [--workers 4] [--device auto] [--keep-best]

Each variant is ``--config`` (default configs/default.yaml) with its ``overrides``, trained as an ensemble of its
``seeds`` (one seed: a single model) by the pipeline's own code (in RUNS/<variant>/member-seed<s>/, export off),
then joined, prior-corrected and calibrated on validation exactly as the shipped model is
(dermscreen.training.finish). Printed per variant and written to OUT/sweep.jsonl: validation balanced accuracy,
malignant and melanoma AUC, ECE, the specificity at the sensitivity-first operating point, each member's balanced
accuracy and best epoch, and the training seconds. The test split is never read. Variants run in
parallel processes (``--parallel``), so on a GPU the seconds are those of a shared device. ``--keep-best`` copies
the best variant's checkpoints to OUT (by the score below, fixed before the first study) so `dermscreen export`
can finish it on another machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def score(m: dict) -> float:
    """The study's ranking, fixed before its first result: the sum of the four measures the targets name."""
    return m["balanced_accuracy"] + m["malignant_auc"] + m["auc_per_class"]["mel"] + m["spec_at_sens_first"]


def run_variant(name: str, spec: dict, args) -> dict:
    """Train one variant's members, join and calibrate them; the validation record."""
    import numpy as np
    import torch

    from dermscreen.metadata import MetadataSpec
    from dermscreen.preprocess import Preprocessing
    from dermscreen.training import distributed as D
    from dermscreen.training.calibrate import calibrate, validation_metrics
    from dermscreen.training.config import dump_config, load_config
    from dermscreen.training.data import LesionDataset
    from dermscreen.training.ensemble import member_config, member_folder
    from dermscreen.training.finish import _correct_prior
    from dermscreen.training.fit import _run, load_data, predict, read_split, training_data
    from dermscreen.training.model import EnsembleClassifier, build_model

    recipe = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    recipe.update(spec.get("overrides") or {})
    seeds = list(spec["seeds"])
    # one seed: a single model (the recipe's validation does not accept an ensemble of one)
    recipe.update(ensemble_seeds=seeds if len(seeds) > 1 else [], device=args.device, num_workers=args.workers,
                  export=False)
    out = Path(args.runs) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "variant.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    cfg = load_config(out / "variant.yaml", data=args.data)
    dump_config(cfg, out / "config.yaml")  # resolved (the data path included): the run folder's config for export
    ctx = D.setup(cfg.device)
    t0 = time.perf_counter()
    members = []
    for seed in seeds:
        folder = member_folder(out, seed)
        if args.reuse and (folder / "checkpoints" / "last.pt").is_file():
            # an already trained member (e.g. copied back from a GPU machine): evaluate, do not train
            state = torch.load(folder / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]
            members.append({"seed": seed, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"]})
            continue
        r = _run(member_config(cfg, seed), folder, False, False, ctx, time.perf_counter(), finish=False)
        members.append({"seed": seed, "epochs_run": r.epochs_run, "best_epoch": r.best_epoch})
    train_s = time.perf_counter() - t0
    shutil.copyfile(member_folder(out, seeds[0]) / "split.csv", out / "split.csv")
    data, taxonomy = load_data(cfg)
    split = read_split(data, out / "split.csv")
    train_data = training_data(data, split, cfg, taxonomy)
    meta_spec = MetadataSpec() if cfg.metadata_fusion else None  # (a single model: ensembles are image-only)

    def evaluate(model, info) -> dict:
        # what finish_run does before export: prior correction (tau on validation), temperature, operating points
        spec_ = Preprocessing(image_size=cfg.image_size, resize=cfg.resize, mean=info.mean, std=info.std)
        val = LesionDataset(data.subset(split["val"]), spec_, None, meta_spec)
        model = copy.deepcopy(model).to(ctx.device)  # the prior correction below edits the classifier bias
        logits, _ = predict(model, val, range(len(val)), ctx.device, cfg.batch_size * 2, args.workers)
        labels = np.asarray(val.labels)
        logits, prior = _correct_prior(model, cfg, train_data, logits, labels, taxonomy)
        calibration, points = calibrate(logits, labels, taxonomy)
        m = validation_metrics(logits, labels, taxonomy, calibration.temperature)
        first = next((p for p in points if p.name == "sensitivity_first"), None)
        m.update(ece_after=calibration.ece_after, temperature=calibration.temperature, tau=prior["tau"],
                 points=[p.model_dump() for p in points],
                 spec_at_sens_first=first.specificity if first else float("nan"),
                 sens_at_sens_first=first.sensitivity if first else float("nan"))
        return m

    models, infos = [], []
    for seed in seeds:
        model, info = build_model(member_config(cfg, seed), taxonomy.num_classes, meta_spec.dim if meta_spec else 0,
                                  weights="none")
        model.load_state_dict(torch.load(member_folder(out, seed) / "checkpoints" / "best.pt", map_location="cpu",
                                         weights_only=True)["model"])
        models.append(model)
        infos.append(info)
    member_bacc = [round(evaluate(m, i)["balanced_accuracy"], 4) for m, i in zip(models, infos)]
    record = {"name": name, "overrides": spec.get("overrides") or {}, "seeds": seeds, "members": members,
              "member_bacc": member_bacc, "train_s": round(train_s, 1), "device": str(ctx.device),
              "ensemble": evaluate(EnsembleClassifier(models, cfg.freeze_stages) if len(models) > 1 else models[0],
                                   infos[0])}
    if args.compare_split:
        record["same_split_as"] = {args.compare_split: (out / "split.csv").read_bytes()
                                   == Path(args.compare_split).read_bytes()}
    (out / "result.json").write_text(json.dumps(record), encoding="utf-8")
    return record


def summarise(rows: list[dict], out: Path) -> None:
    with open(out / "sweep.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{'variant':11s} {'score':>6s} {'bacc':>6s} {'malAUC':>6s} {'melAUC':>6s} {'spec@s1':>7s} {'ECE':>6s} "
          "tau  member bacc (best epochs), train s")
    for r in sorted(rows, key=lambda r: -score(r["ensemble"])):
        m = r["ensemble"]
        print(f"{r['name']:11s} {score(m):6.3f} {m['balanced_accuracy']:6.3f} {m['malignant_auc']:6.3f} "
              f"{m['auc_per_class']['mel']:6.3f} {m['spec_at_sens_first']:7.3f} {m['ece_after']:6.3f} "
              f"{m['tau']:<4g} {r['member_bacc']} ({[x['best_epoch'] for x in r['members']]}), {r['train_s']}",
              flush=True)


def keep(name: str, runs: Path, out: Path) -> None:
    """The variant's checkpoints (best.pt) and small files, laid out as a run folder for `dermscreen export`."""
    import torch

    run = runs / name
    members = sorted(run.glob("member-seed*"))
    single = len(members) == 1  # a single model's run folder is its member's folder itself
    with tarfile.open(out / f"{name}-run.tar", "w") as tar:
        if not single:
            tar.add(run / "config.yaml", arcname=f"{name}/config.yaml")
            tar.add(run / "split.csv", arcname=f"{name}/split.csv")
        for member in members:
            prefix = f"{name}/" if single else f"{name}/{member.name}/"
            for f in ("config.yaml", "split.csv", "train.log", "history.csv"):
                if (member / f).is_file():
                    tar.add(member / f, arcname=prefix + f)
            # export reads the training history from last.pt: keep that, not the optimizer state
            state = torch.load(member / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]
            stripped = out / f".{member.name}-last.pt"
            torch.save({"state": state}, stripped)
            tar.add(stripped, arcname=prefix + "checkpoints/last.pt")
            stripped.unlink()
    for member in members:  # one file each, beside the tar: a device's copy-back may cap file sizes
        shutil.copyfile(member / "checkpoints" / "best.pt",
                        out / (f"{name}-best.pt" if single else f"{name}-{member.name}-best.pt"))
    print(f"kept {name}: {out}/{name}-run.tar and the best.pt beside it (into <run>/[member-seed*/]checkpoints/)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, help="YAML: variant name -> {overrides: {...}, seeds: [...]}")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"), help="The recipe to vary.")
    ap.add_argument("--data", default="../shared/data/ham10000_224/HAM10000_metadata.csv")
    ap.add_argument("--only", default="", help="Comma-separated variant names (default: all, in file order).")
    ap.add_argument("--runs", default="runs/sweep-runs", help="Where the variants' run folders go.")
    ap.add_argument("--out", required=True, help="Folder for sweep.jsonl (and --keep-best's files).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--parallel", type=int, default=1, help="Variants trained at once (separate processes).")
    ap.add_argument("--workers", type=int, default=1, help="Data-loading processes per variant.")
    ap.add_argument("--budget", type=float, default=float("inf"), help="Seconds after which no variant starts.")
    ap.add_argument("--deadline", type=float, default=float("inf"),
                    help="Seconds after which running variants are stopped (so a time-limited job still reports).")
    ap.add_argument("--compare-split", default=None, help="A split.csv the variants' split must equal (recorded).")
    ap.add_argument("--keep-best", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="Members that already have checkpoints are evaluated, "
                    "not trained again (train_s then counts only the others).")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: train this variant
    args = ap.parse_args()
    sweep = yaml.safe_load(Path(args.sweep).read_text(encoding="utf-8"))
    if args.one:
        run_variant(args.one, sweep[args.one], args)
        return
    names = [n for n in args.only.split(",") if n] or list(sweep)
    unknown = [n for n in names if n not in sweep]
    if unknown:
        sys.exit(f"Unknown variant(s) {', '.join(unknown)}; {args.sweep} has {', '.join(sweep)}.")
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    (runs / "logs").mkdir(parents=True, exist_ok=True)
    child = sys.argv[1:]
    running: dict[str, subprocess.Popen] = {}
    done: list[dict] = []
    start = time.time()
    while names or running:
        while names and len(running) < args.parallel and time.time() - start < args.budget:
            name = names.pop(0)
            log = open(runs / "logs" / f"{name}.log", "w", encoding="utf-8")
            running[name] = subprocess.Popen([sys.executable, __file__, *child, "--one", name],
                                             stdout=log, stderr=subprocess.STDOUT)
            print(f"{time.time() - start:6.0f} s  start {name}", flush=True)
        if not running:
            break
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is None and time.time() - start > args.deadline:
                proc.kill()
                print(f"{time.time() - start:6.0f} s  stopped {name} at the deadline", flush=True)
            if proc.poll() is not None:
                del running[name]
                result = runs / name / "result.json"
                if proc.returncode == 0 and result.is_file():
                    done.append(json.loads(result.read_text(encoding="utf-8")))
                    print(f"{time.time() - start:6.0f} s  done {name}", flush=True)
                else:
                    print(f"{name} failed (exit {proc.returncode}); its log's end:\n"
                          + (runs / "logs" / f"{name}.log").read_text(encoding="utf-8")[-2000:], flush=True)
                summarise(done, out)
        if time.time() - start > args.deadline:
            names = []
    if done and args.keep_best:
        keep(max(done, key=lambda r: score(r["ensemble"]))["name"], runs, out)


if __name__ == "__main__":
    main()
