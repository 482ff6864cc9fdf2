"""SQ-VAE IV (plain, decoder-calibrated) vs VQ-VAE-EMA baselines on a mini speech corpus at one budget.

Trains each chosen model for every seed (one process per run, one thread each, `--jobs` at a time, each run and
its evaluation under `--timeout`; finished runs are skipped, cut-off runs resumed), evaluates each on the test
split and prints test mel-MSE (dB^2), perplexity and used codes per seed and as mean +- std, then the
acceptance check of `--option` against the best VQ-VAE-EMA model run (lowest mean mel-MSE among the `vq*` models,
plain or calibrated): mean mel-MSE at least 5% below it, lower on at least 80% of the seeds (4 of 5, 3 of 3)
paired by seed, and a higher mean perplexity. Writes every result and the check to `--json`, rewritten
(atomically) each time a run ends. A run still training at its `--timeout` or at the `--deadline` gets SIGTERM
(`sqaudio train` saves a checkpoint at the step boundary and exits) and is reported as cut, with the step it
saved and its last training-log row; it is not evaluated.

Corpora: `vctk` (recipes vctk/mini_*) and `zerospeech` (zerospeech2019/mini_*). Data: `--feats DIR`, an
already-prepared feature store (`sqaudio prepare` output), or (vctk) `--data RAW`, prepared into WORK/feats.
`--steps N` shrinks the budget of every model alike (calibration steps and lr milestones scale with it), for
smoke tests and time-boxed GPU runs.

A calibrated model whose plain twin is also run (`sq` and `sq_calibrated`, `vq_decay099` and
`vq_decay099_calibrated`, ...) is, by default, a branch: the twin keeps its checkpoint at `steps - calibration
steps`, and the calibrated run resumes a copy of it with the calibration phase on. The phase is a pure function
of the step, so the branch equals a straight calibrated run bit for bit (tests/test_comparison_benchmark.py), and
the pair costs 1.15 runs instead of 2 (`--no-branch`: straight runs, all concurrent, e.g. on a GPU). The branch's
`config.yaml` and eval JSON name the twin's recipe, with its `train.calibration_steps` set.

    .venv/bin/python benchmarks/vctk_mini_comparison.py --corpus vctk --feats /work/feats/vctk-mini \
        --work runs/cmp-vctk --seeds 1234 1 2 3 4 --jobs 2 \
        [--models sq sq_calibrated vq vq_decay099 vq_decay099_calibrated] [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

from sqaudio.config import load_recipe, to_dict

CORPORA = {"vctk": "vctk", "zerospeech": "zerospeech2019"}
# key -> (label, recipe name under the corpus folder)
MODELS = {"sq": ("SQ-VAE IV", "mini_sqvae_gauss4"),
          "sq_calibrated": ("SQ-VAE IV + decoder calibration", "mini_sqvae_gauss4_calibrated"),
          "vq": ("VQ-VAE-EMA textbook 0.999", "mini_vqvae_ema"),
          "vq_decay099": ("VQ-VAE-EMA textbook 0.99", "mini_vqvae_ema_decay099"),
          "vq_calibrated": ("VQ-VAE-EMA textbook 0.999 + calibration", "mini_vqvae_ema_calibrated"),
          "vq_decay099_calibrated": ("VQ-VAE-EMA textbook 0.99 + calibration", "mini_vqvae_ema_decay099_calibrated"),
          "vq_mle_sigma": ("VQ-VAE-EMA MLE-sigma 0.999", "mini_vqvae_ema_mle_sigma")}  # vctk only
DEFAULT_MODELS = ["sq", "sq_calibrated", "vq", "vq_decay099", "vq_decay099_calibrated"]
METRICS = ("mel_mse_db2", "perplexity", "used_codes")


GRACE_S = 30.0  # after SIGTERM, time to save a checkpoint before SIGKILL


class Cut(RuntimeError):
    """A command stopped at its time limit; `step`: the run's last saved step (None before the first)."""

    step: int | None = None


def sqaudio(args: list[str], timeout: float | None, log: Path | None = None) -> None:
    """Run `sqaudio ARGS` (one thread); at `timeout` send SIGTERM, then SIGKILL after GRACE_S, and raise Cut."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = open(log, "a") if log is not None else None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sqaudio", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT if out else None)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise Cut(f"sqaudio {args[0]} stopped at its time limit ({timeout:.0f} s)") from None
    finally:
        if out is not None:
            out.close()
    if code != 0:
        raise subprocess.CalledProcessError(code, ["sqaudio", *args])


def last_step(run: Path) -> int | None:
    """The step of the newest checkpoint in a run directory (None when there is none)."""
    steps = [int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pt") if p.stem.split("-")[1].isdigit()]
    return max(steps, default=None)


def last_log_row(run: Path) -> dict | None:
    history = run / "history.jsonl"
    if history.exists() and history.read_text().strip():
        return json.loads(history.read_text().splitlines()[-1])
    return None


def budget_overrides(recipe: str, steps: int | None) -> list[str]:
    """--set items that scale a recipe to `steps` (None: the recipe's own budget, no overrides)."""
    if steps is None:
        return []
    r = load_recipe(recipe)
    frac = steps / r.train.steps
    out = [f"train.steps={steps}", f"train.calibration_steps={round(r.train.calibration_steps * frac)}",
           f"train.milestones={[max(1, round(m * frac)) for m in r.train.milestones]}",
           f"train.checkpoint_every={max(1, min(r.train.checkpoint_every, steps))}",
           f"train.log_every={max(1, min(r.train.log_every, steps // 4 or 1))}"]
    return out


def twin(name: str) -> str | None:
    """The plain model a calibrated one can branch from (`sq_calibrated` -> `sq`), or None."""
    return name.removesuffix("_calibrated") if name.endswith("_calibrated") else None


def run_one(feats: Path, run: Path, recipe: str, seed: int, steps: int | None, device: list[str],
            timeout: float, deadline: float, extra: tuple[str, ...] = (), start: Path | None = None) -> dict:
    """Train (or resume, or skip) one run and evaluate its final checkpoint on the test split; the run ends
    after `timeout` seconds or at the monotonic `deadline`, whichever comes first. `extra`: further --set
    items; `start`: a checkpoint (and its run's config.yaml) the run resumes from when it has none yet."""
    started = time.monotonic()
    timeout = min(timeout, deadline - started)
    if timeout < 30:
        raise RuntimeError("no time left before the deadline (not started)")
    overrides = [*budget_overrides(recipe, steps), f"train.seed={seed}", *extra]
    expected = load_recipe(recipe, overrides)
    total = expected.train.steps
    saved = run / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text())["quantizer"] != to_dict(expected.quantizer):
        raise RuntimeError(f"{run} was trained with another quantizer config than {recipe} now has; "
                           f"choose another --work")
    run.mkdir(parents=True, exist_ok=True)
    log = run / "benchmark.log"
    if start is not None and not any(run.glob("checkpoint-*.pt")):
        shutil.copy2(start.parent / "config.yaml", run / "config.yaml")
        shutil.copy2(start, run / start.name)
    if not (run / f"checkpoint-{total}.pt").exists():
        resume = ["--resume"] if any(run.glob("checkpoint-*.pt")) else []
        sets = [a for o in overrides for a in ("--set", o)]
        try:
            sqaudio(["train", recipe, "--data", str(feats), "--out", str(run), "--quiet", *resume, *device, *sets],
                    timeout, log)
        except Cut as cut:
            cut.step = last_step(run)
            raise
    trained = time.monotonic() - started
    result = run / "eval-test.json"
    if not result.exists() or json.loads(result.read_text()).get("step") != total:
        left = max(60.0, timeout - (time.monotonic() - started))
        sqaudio(["evaluate", str(run), "--data", str(feats), "--split", "test", "--overwrite", *device], left, log)
    out = json.loads(result.read_text())
    out.update({"train_s": round(trained, 1), "wall_s": round(time.monotonic() - started, 1)})
    if last_log_row(run) is not None:
        out["train_last"] = last_log_row(run)
    return out


def run_pair(feats: Path, trunk: Path, branch: Path, recipe: str, calibration: int, seed: int,
             steps: int | None, device: list[str], timeout: float, deadline: float) -> tuple[dict, dict]:
    """A plain run that keeps its checkpoint at `total - calibration`, then its calibrated branch from there."""
    total = load_recipe(recipe, budget_overrides(recipe, steps)).train.steps
    at = total - calibration
    keep = (f"train.checkpoint_every={math.gcd(total, at)}", "train.keep_last=0")
    plain = run_one(feats, trunk, recipe, seed, steps, device, timeout, deadline, keep)
    calibrated = run_one(feats, branch, recipe, seed, steps, device, timeout, deadline,
                         (*keep, f"train.calibration_steps={calibration}"), trunk / f"checkpoint-{at}.pt")
    return plain, calibrated


def _log_tail(run: Path, lines: int = 6) -> str:
    log = run / "benchmark.log"
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) if log.exists() else ""


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def acceptance(results: dict, option: str, seeds: list[int]) -> dict:
    """The acceptance check of `option` against the best (lowest mean mel-MSE) VQ model that finished every seed."""
    def done(name, seed):
        return "mel_mse_db2" in results.get((name, seed), {})

    asked = len(seeds)
    seeds = [s for s in seeds if done(option, s)]  # a failed or cut-off seed is left out (and reported)
    vqs = sorted(n for n in {k[0] for k in results} if n.startswith("vq") and all(done(n, s) for s in seeds))
    if not seeds or not vqs:
        return {"passed": False, "reason": "the option or every VQ baseline is missing runs"}
    mean = {n: statistics.fmean(results[(n, s)]["mel_mse_db2"] for s in seeds) for n in vqs + [option]}
    best = min(vqs, key=mean.get)
    need = math.ceil(0.8 * len(seeds))
    wins = sum(results[(option, s)]["mel_mse_db2"] < results[(best, s)]["mel_mse_db2"] for s in seeds)
    ppl = {n: statistics.fmean(results[(n, s)]["perplexity"] for s in seeds) for n in (option, best)}
    rel = mean[option] / mean[best] - 1
    checks = {"mse_5pct_below": rel <= -0.05, "enough_wins": wins >= need, "higher_perplexity": ppl[option] > ppl[best]}
    return {"option": option, "best_vq": best, "option_mse": mean[option], "best_vq_mse": mean[best],
            "relative": rel, "wins": wins, "seeds": len(seeds), "wins_needed": need,
            "option_perplexity": ppl[option], "best_vq_perplexity": ppl[best], **checks,
            "complete": len(seeds) == asked, "passed": all(checks.values()) and len(seeds) == asked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=list(CORPORA), default="vctk")
    parser.add_argument("--feats", default=None, help="an already-prepared feature store (skips prepare)")
    parser.add_argument("--data", default="../shared/data/vctk-mini", help="raw vctk-mini, prepared when no --feats")
    parser.add_argument("--work", default="runs/vctk-mini", help="runs (and prepared features) go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--option", default="sq_calibrated", choices=list(MODELS), help="model checked for acceptance")
    parser.add_argument("--steps", type=int, default=None, help="scale every budget to this many steps")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds per run (train + evaluate)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from now after which no run starts and running ones are stopped")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    parser.add_argument("--json", default=None, help="write all results and the check here")
    parser.add_argument("--branch", action=argparse.BooleanOptionalAction, default=True,
                        help="calibrated runs branch from their plain twin's checkpoint (default) or run straight")
    args = parser.parse_args()
    folder = CORPORA[args.corpus]
    if args.corpus != "vctk" and "vq_mle_sigma" in args.models:
        parser.error("vq_mle_sigma has a recipe for vctk only")
    recipes = {name: f"{folder}/{MODELS[name][1]}" for name in args.models}
    device = ["--device", args.device] if args.device else []

    work = Path(args.work)
    if args.feats:
        feats = Path(args.feats)
        if not (feats / "manifest.jsonl").exists():
            sys.exit(f"{feats} is not a prepared feature store (no manifest.jsonl)")
    else:
        if args.corpus != "vctk":
            sys.exit("--corpus zerospeech needs --feats (a prepared store)")
        feats = work / "feats"
        if not (feats / "manifest.jsonl").exists():
            sqaudio(["prepare", args.data, str(feats)], None)
    budgets = {name: load_recipe(r, budget_overrides(r, args.steps)).train.steps for name, r in recipes.items()}
    if len(set(budgets.values())) != 1:
        sys.exit(f"the recipes must share one budget, got {budgets}")
    steps = next(iter(budgets.values()))
    deadline = time.monotonic() + (args.deadline if args.deadline is not None else 10 * 365 * 86400)
    branched = {name: twin(name) for name in recipes if args.branch and twin(name) in recipes}
    # plain model -> (its calibrated twin, that twin's calibration steps at this budget)
    branch_of = {plain: (cal, load_recipe(r := recipes[cal], budget_overrides(r, args.steps)).train.calibration_steps)
                 for cal, plain in branched.items()}
    common = (args.steps, device, args.timeout, deadline)
    run_dir = {(name, seed): work / f"{MODELS[name][1]}-seed{seed}" for seed in args.seeds for name in recipes}
    results: dict = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        # seeds outermost: when the deadline cuts the last wave, every model has lost the same seeds
        futures = {}
        for seed in args.seeds:
            for name, recipe in recipes.items():
                if name in branch_of:
                    pair, cal = branch_of[name]
                    futures[pool.submit(run_pair, feats, run_dir[name, seed], run_dir[pair, seed], recipe, cal, seed,
                                        *common)] = ((name, pair), seed)
                elif name not in branched:
                    futures[pool.submit(run_one, feats, run_dir[name, seed], recipe, seed, *common)] = ((name,), seed)
        header = {"corpus": args.corpus, "steps": steps, "seeds": args.seeds, "feats": str(feats), "recipes": recipes}
        for fut in as_completed(futures):
            names, seed = futures[fut]
            results.update(outcome(fut, names, seed, run_dir))
            if args.json:
                write_json(Path(args.json), header, results, summarize(results, recipes, args.seeds),
                           acceptance(results, args.option, args.seeds), done=False)
    summary = summarize(results, recipes, args.seeds)
    check = acceptance(results, args.option, args.seeds)
    print_report(args, steps, recipes, results, summary, check)
    if args.json:
        write_json(Path(args.json), header, results, summary, check, done=True)


def outcome(fut, names: tuple[str, ...], seed: int, run_dir: dict) -> dict:
    """{(model, seed): result} of a finished future: the results, or for each model the failure (cut or not)."""
    try:
        outs = fut.result()
        return dict(zip([(n, seed) for n in names], outs if len(names) > 1 else [outs]))
    except Exception as err:  # a failed or timed-out run is reported, the others still count
        failed = {}
        for n in names:
            row = {"error": f"{type(err).__name__}: {err}", "log": _log_tail(run_dir[n, seed])}
            if isinstance(err, Cut):
                row.update({"cut": True, "step": err.step, "train_last": last_log_row(run_dir[n, seed])})
            failed[(n, seed)] = row
            print(f"{'CUT' if isinstance(err, Cut) else 'FAILED'} {n} seed {seed}: {err}", file=sys.stderr)
        return failed


def summarize(results: dict, recipes: dict, seeds: list[int]) -> dict:
    """Mean and std of every metric per model over its finished runs."""
    summary = {}
    for name in recipes:
        rows = [results[(name, s)] for s in seeds if "error" not in results.get((name, s), {"error": ""})]
        if rows:
            stats = {m: _mean_std([float(r[m]) for r in rows]) for m in METRICS}
            summary[name] = {m: {"mean": v[0], "std": v[1]} for m, v in stats.items()} | {"runs": len(rows)}
    return summary


def write_json(path: Path, header: dict, results: dict, summary: dict, check: dict, done: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**header, "finished": done, "runs": [{"model": n, "seed": s, **r} for (n, s), r in results.items()],
           "summary": summary, "acceptance": check}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def print_report(args, steps: int, recipes: dict, results: dict, summary: dict, check: dict) -> None:
    print(f"\n{args.corpus}-mini test split, {steps} steps per run\n")
    print("| model | seed | mel-MSE (dB^2) | perplexity | used codes |\n|---|---|---|---|---|")
    for (name, seed), r in sorted(results.items(), key=lambda kv: (list(recipes).index(kv[0][0]),
                                                                   args.seeds.index(kv[0][1]))):
        if r.get("cut"):
            print(f"| {MODELS[name][0]} | {seed} | cut at step {r['step']} | | |")
        elif "error" in r:
            print(f"| {MODELS[name][0]} | {seed} | failed | | |")
        else:
            print(f"| {MODELS[name][0]} | {seed} | {r['mel_mse_db2']:.2f} | {r['perplexity']:.1f} | {r['used_codes']} |")
    for name, stats in summary.items():
        mse, ppl = stats["mel_mse_db2"], stats["perplexity"]
        print(f"| {MODELS[name][0]} | mean +- std ({stats['runs']}) | {mse['mean']:.2f} +- {mse['std']:.2f} | "
              f"{ppl['mean']:.1f} +- {ppl['std']:.1f} | {stats['used_codes']['mean']:.0f} |")
    print(f"\nacceptance ({args.corpus}): {json.dumps(check)}")
    if "best_vq" in check:
        print(f"{MODELS[args.option][0]} vs best VQ ({MODELS[check['best_vq']][0]}): mean mel-MSE "
              f"{check['option_mse']:.2f} vs {check['best_vq_mse']:.2f} ({100 * check['relative']:+.1f}%, need <= -5%), "
              f"lower on {check['wins']}/{check['seeds']} seeds (need {check['wins_needed']}), perplexity "
              f"{check['option_perplexity']:.1f} vs {check['best_vq_perplexity']:.1f} -> "
              f"{'PASS' if check['passed'] else 'FAIL'}")


if __name__ == "__main__":
    main()
