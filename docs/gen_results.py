"""Results for the docs site, generated from docs/results/ at build time (a mkdocs hook).

Numbers in the site's tables are never typed by hand: they are read from the files under
docs/results/ each time the site is built.

- ``docs/results.md`` holds the line ``<!-- results-index -->``; it is replaced by an index of every
  file under docs/results/, grouped by app: each CSV rendered as a table (values with more than six
  significant digits shown to six; the linked file has them in full), each verdict ``.txt`` and
  settings / fit ``.json`` as printed, each plot as an image.
- A page line ``<!-- table: NAME -->`` is replaced by the table ``TABLES[NAME]`` renders from one or
  more of those files (means with their 95% CI half-width from the ``*_seeds_summary.csv`` files,
  relative changes computed from the rows they compare, and so on).

mkdocs loads this file through ``hooks:`` in mkdocs.yml and calls :func:`on_page_markdown`. Nothing
here needs mkdocs: ``python docs/gen_results.py NAME`` prints one table (``index`` for the index),
and tests/test_docs.py renders every table without building the site.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent
RESULTS = DOCS / "results"
REPO = DOCS.parent
TABLE_MARKER = re.compile(r"^<!-- table: ([\w-]+) -->[ \t]*$", re.M)
INDEX_MARKER = "<!-- results-index -->"
APPS = ("toy", "molecule", "layout", "t2i", "flow")
DASH = "–"


# ----------------------------------------------------------------------------- reading
def read_csv(name: str) -> list[dict[str, str]]:
    with open(RESULTS / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def num(value) -> float | None:
    """A cell as a float; None for an empty cell, text or NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


# ----------------------------------------------------------------------------- formatting
def fmt(v: float | None, digits: int, sign: bool = False) -> str:
    """``v`` to ``digits`` decimals with a typographic minus; a dash when missing."""
    if v is None:
        return DASH
    text = f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    if float(text) == 0:  # no "−0.000"
        text = text.lstrip("+-")
    return text.replace("-", "−")


def pct(new: float | None, ref: float | None, digits: int = 1) -> str:
    """Relative change of ``new`` against ``ref`` in percent, e.g. ``−22.5%``."""
    if new is None or ref is None or ref == 0:
        return ""
    return fmt(100.0 * (new / ref - 1.0), digits, sign=True) + "%"


def ci(mean: float | None, lo: float | None, hi: float | None, digits: int) -> str:
    """``mean [lo, hi]``."""
    if mean is None:
        return DASH
    return f"{fmt(mean, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def pm(cell: tuple | None, digits: int) -> str:
    """``mean ± half-width`` of a summary cell (mean, lo, hi, n)."""
    if cell is None or cell[0] is None:
        return DASH
    mean, lo, hi, _ = cell
    if lo is None or hi is None:
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt((hi - lo) / 2.0, digits)}"


def sci(v: float | None) -> str:
    """A large count as ``2.19 × 10⁶``."""
    if v is None:
        return DASH
    exponent = int(math.floor(math.log10(abs(v)))) if v else 0
    sup = str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"{v / 10 ** exponent:.2f} × 10{sup}"


def table(header: list[str], body: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- seed benchmarks
class Summary:
    """A ``*_seeds_summary.csv``: per method and metric the mean over training seeds, its 95% CI, n."""

    def __init__(self, name: str):
        self.name = name
        self.cells: dict[tuple[str, str], tuple] = {}
        self.labels: dict[str, str] = {}
        for row in read_csv(name):
            self.labels.setdefault(row["method"], row["label"])
            self.cells[row["method"], row["metric"]] = (
                num(row["mean"]), num(row["ci_lo"]), num(row["ci_hi"]), num(row["n_seeds"]))

    def get(self, method: str, metric: str) -> tuple | None:
        return self.cells.get((method, metric))

    def mean(self, method: str, metric: str) -> float | None:
        cell = self.get(method, metric)
        return None if cell is None else cell[0]


def per_seed(name: str, metric: str) -> dict[str, dict[int, float]]:
    """From a long ``*_seeds.csv``: {method: {seed: value}} of one metric."""
    out: dict[str, dict[int, float]] = {}
    for row in read_csv(name):
        if row["metric"] == metric and num(row["value"]) is not None:
            out.setdefault(row["method"], {})[int(row["seed"])] = num(row["value"])
    return out


def kept_gain(gains: dict[str, dict[int, float]], key: str, ref: str) -> tuple | None:
    """The share of ``ref``'s gain over the base that ``key`` keeps: per-seed ratio, mean and 95% CI
    (the benchmarks' harness.kept_gain_lines, on the same rows)."""
    from pgraft.core.stats import mean_ci

    if key not in gains or ref not in gains:
        return None
    ratios = [gains[key][s] / gains[ref][s] for s in sorted(gains[key]) if s in gains[ref] and gains[ref][s]]
    if len(ratios) < 2:
        return None
    c = mean_ci(ratios)
    return c.mean, c.lo, c.hi, c.n


def seeds_table(name: str, columns: list[tuple[str, str, int]], methods: list[str] | None = None) -> str:
    """Methods × metrics of a summary file, each cell ``mean ± 95% CI half-width`` over seeds;
    a metric written ``mean:NAME`` shows the mean alone, ``n_seeds`` the number of seeds."""
    s = Summary(name)
    body = []
    for method in methods or list(s.labels):
        row = [s.labels[method]]
        for _, metric, digits in columns:
            if metric == "n_seeds":
                cell = next((c for (m, _), c in s.cells.items() if m == method), None)
                row.append(DASH if cell is None else f"{cell[3]:.0f}")
            elif metric.startswith("mean:"):
                row.append(fmt(s.mean(method, metric[5:]), digits))
            else:
                row.append(pm(s.get(method, metric), digits))
        body.append(row)
    return table(["method"] + [h for h, _, _ in columns], body)


def diagnose_table(name: str, extra: list[tuple[str, Callable[[str], str]]] = ()) -> str:
    """``pgraft <app> diagnose``'s CSV: per t the reward variance, E[Var(r | X_t)] and R²(t) with CIs."""
    body = []
    for row in read_csv(name):
        r = {k: num(v) for k, v in row.items()}
        body.append([row["t"], fmt(r["var_r"], 3), ci(r["evar"], r["evar_lo"], r["evar_hi"], 3),
                     ci(r["r2"], r["r2_lo"], r["r2_hi"], 3), fmt(r["F"], 1), f"{r['p_value']:.2g}"]
                    + [fn(row["t"]) for _, fn in extra])
    return table(["t", "Var(r)", "E[Var(r | X_t)] (95% CI)", "R²(t) [95% CI]", "F", "p"]
                 + [h for h, _ in extra], body)


def kept_column(long: str, metric: str, key: Callable[[str], str], ref: str) -> Callable[[str], str]:
    gains = per_seed(long, metric)

    def cell(t: str) -> str:
        k = kept_gain(gains, key(t), ref)
        return DASH if k is None else ci(k[0], k[1], k[2], 3)

    return cell


def toy_seeds() -> str:
    return seeds_table("toy_seeds_summary.csv", [
        ("W1 to own target", "W1_to_own_target", 3),
        ("target's own error", "mean:W1_floor", 3),
        ("W1 to the RS target", "W1_to_RS_target", 3),
        ("mean reward", "mean_reward", 3),
        ("reward gain per 10⁶ forward rows", "mean_reward_gain_per_1M_fwd", 3),
        ("seeds", "n_seeds", 0),
    ]) + "\n\n" + compute_table("toy_seeds_summary.csv")


def compute_table(name: str) -> str:
    """The compute each method used (mean over seeds): sampled candidates and forward-row equivalents."""
    s = Summary(name)
    body = [[s.labels[m], f"{s.mean(m, 'sampled'):,.0f}", sci(s.mean(m, "forward_equivalents"))]
            for m in s.labels if s.mean(m, "forward_equivalents")]
    return table(["method", "sampled candidates", "forward-row equivalents"], body)


def toy_diagnose() -> str:
    return diagnose_table("toy_diagnose.csv", [
        ("kept gain, RS [95% CI]", kept_column("toy_seeds.csv", "mean_reward_gain", lambda t: f"pgraft_rs_{t}",
                                               "graft_rs")),
        ("kept gain, BoN [95% CI]", kept_column("toy_seeds.csv", "mean_reward_gain", lambda t: f"pgraft_bon_{t}",
                                                "graft_bon")),
    ])


def molecule_seeds() -> str:
    return seeds_table("molecule_seeds_summary.csv", [
        ("QED of valid unique", "qed_mean", 3),
        ("V.U.N.", "vun", 3),
        ("QED of V.U.N.", "qed_novel_mean", 3),
        ("validity", "validity", 3),
        ("validity (largest fragment)", "validity_largest_fragment", 3),
        ("uniqueness", "uniqueness", 3),
        ("novelty", "novelty", 3),
        ("FCD", "fcd", 2),
        ("FCD n (mean)", "mean:fcd_n", 0),
        ("seeds", "n_seeds", 0),
    ]) + "\n\n" + compute_table("molecule_seeds_summary.csv")


def molecule_diagnose() -> str:
    return diagnose_table("molecule_diagnose.csv", [
        ("kept share of GRAFT + dedup's QED gain [95% CI]",
         kept_column("molecule_seeds.csv", "qed_mean_gain", lambda t: f"pgraft_{t}_bon_dedup", "graft_bon_dedup")),
    ])


def layout_single() -> str:
    body = []
    for row in read_csv("layout_results.csv"):
        r = {k: num(v) for k, v in row.items()}
        body.append([row["label"], fmt(r["reward_mean"], 3), fmt(r["alignment"], 5), fmt(r["overlap"], 3),
                     fmt(r["fid"], 1), fmt(r["max_iou"], 3), fmt(r["class_tv"], 3), row["n"]])
    return table(["method", "reward", "alignment ↓", "overlap ↓", "FID ↓", "max-IoU ↑", "class TV ↓", "layouts"],
                 body)


def layout_seeds() -> str:
    return seeds_table("layout_seeds_summary.csv", [
        ("reward", "reward_mean", 3),
        ("FID (own net)", "fid", 2),
        ("alignment (raw)", "alignment", 5),
        ("overlap (raw)", "overlap", 4),
        ("max-IoU", "max_iou", 3),
        ("max-IoU coverage", "max_iou_coverage", 3),
        ("class TV", "class_tv", 3),
        ("seeds", "n_seeds", 0),
    ]) + "\n\n" + compute_table("layout_seeds_summary.csv")


def layout_diagnose() -> str:
    return diagnose_table("layout_diagnose.csv")


def t2i_seeds() -> str:
    return seeds_table("t2i_seeds_summary.csv", [
        ("learned reward", "reward", 4),
        ("accuracy (all images)", "accuracy", 3),
        ("GenEval overall", "overall", 3),
        ("counting", "counting", 3),
        ("colors", "colors", 3),
        ("position", "position", 3),
        ("colour attr.", "color_attr", 3),
        ("two objects", "two_object", 3),
        ("seeds", "n_seeds", 0),
    ]) + "\n\n" + compute_table("t2i_seeds_summary.csv")


def t2i_sd3() -> str:
    return seeds_table("t2i_sd3_seeds_summary.csv", [
        ("held-out reward (redness)", "reward", 4),
        ("RMS pixel drift from the base", "drift", 4),
        ("seeds", "n_seeds", 0),
    ]) + "\n\n" + compute_table("t2i_sd3_seeds_summary.csv")


def t2i_diagnose() -> str:
    return diagnose_table("t2i_diagnose.csv")


def t2i_single() -> str:
    body = []
    for row in read_csv("t2i_results.csv"):
        r = {k: num(v) for k, v in row.items()}
        body.append([row["label"], fmt(r["reward"], 3), fmt(r["overall"], 3), fmt(r["counting"], 3),
                     fmt(r["colors"], 3), fmt(r["position"], 3), fmt(r["color_attr"], 3), row["n"]])
    return table(["method", "learned reward", "exact accuracy (mean of categories)", "counting", "colors",
                  "position", "colour attr.", "held-out images"], body)


T2I_METHODS = {"base": "base", "sft_all": "no selection (SFT on all)", "graft_bon": "GRAFT BoN",
               "graft_topk": "GRAFT Top-2", "pgraft_0.25": "P-GRAFT t=0.25", "pgraft_0.5": "P-GRAFT t=0.5",
               "pgraft_0.75": "P-GRAFT t=0.75", "pg": "PG"}


def t2i_gpu() -> str:
    configs: dict[str, dict[str, dict]] = {}
    for row in read_csv("t2i_gpu_results.csv"):
        configs.setdefault(row["config"], {})[row["method"]] = row
    methods = [m for m in T2I_METHODS if any(m in c for c in configs.values())]
    body = []
    for config, cells in configs.items():
        row = [config]
        for m in methods:
            c = cells.get(m)
            if c is None:
                row.append(DASH)
            elif num(c.get("overall")) is None:
                row.append(fmt(num(c["reward"]), 3))
            else:
                row.append(f"{fmt(num(c['reward']), 3)} / {fmt(num(c['overall']), 3)}")
        body.append(row)
    return table(["setting"] + [T2I_METHODS[m] for m in methods], body)


def t2i_anchor() -> str:
    body = []
    for row in read_csv("t2i_anchor_cpu.csv"):
        r = {k: num(v) for k, v in row.items()}

        def arrow(a: str, b: str) -> str:
            return DASH if r[a] is None else f"{fmt(r[a], 3)} → {fmt(r[b], 3)}"

        body.append([row["method"], fmt(r["anchor"], 0), row["lora"] or DASH, row["lr"] or DASH,
                     row["rounds"] or DASH, row["t"], fmt(r["heldout_reward"], 3), fmt(r["heldout_accuracy"], 3),
                     arrow("train_acc_round0", "train_acc_last"), arrow("train_reward_round0", "train_reward_last")])
    return table(["method", "anchor", "LoRA rank (0: full)", "lr", "rounds", "t", "held-out reward",
                  "held-out accuracy", "train prompts: accuracy, first → last round",
                  "train prompts: reward, first → last round"], body)


# ----------------------------------------------------------------------------- flow
def _flow_rows(name: str) -> list[dict]:
    return [{k: (num(v) if num(v) is not None else v) for k, v in row.items()} for row in read_csv(name)]


def flow_eval_table(name: str, label: Callable[[dict], str] = lambda r: r["config"]) -> str:
    """`pgraft flow evaluate` rows: FLOPs against the base's 10-step row, each FID against the base row
    with the same number of base steps (when the file has it)."""
    rows = _flow_rows(name)
    base = {int(r["steps"]): r for r in rows if str(r["config"]).startswith("base ")}
    ref = base.get(10)
    body = []
    for r in rows:
        same = base.get(int(r["steps"]))
        corrected = not str(r["config"]).startswith("base ")
        flops = f"{r['flops_per_image'] / 1e9:.2f} G"
        if corrected and ref:
            flops += f" ({r['flops_per_image'] / ref['flops_per_image']:.2f}x)"
        feature = fmt(num(r["feature_fid"]), 2)
        inception = fmt(num(r["fid"]), 2)
        if corrected and same:
            feature += f" ({pct(num(r['feature_fid']), num(same['feature_fid']))})"
            if num(r["fid"]) is not None and num(same["fid"]) is not None:
                inception += f" ({pct(num(r['fid']), num(same['fid']))})"
        body.append([label(r), flops, feature, fmt(num(r["precision"]), 3), fmt(num(r["recall"]), 3), inception])
    return table(["sampler", "FLOPs/image", "feature FID", "precision", "recall", "Inception FID (1,000)"], body)


def flow_results() -> str:
    return flow_eval_table("flow_results.csv")


def flow_gpu_a() -> str:
    return flow_eval_table("flow_gpu_A.csv")


def flow_gpu_b() -> str:
    return flow_eval_table("flow_gpu_B.csv")


def flow_noise_scaling() -> str:
    base = next(r for r in _flow_rows("flow_results.csv") if r["config"] == "base euler-10")
    body = []
    for r in _flow_rows("flow_noise_scaling.csv"):
        body.append([f"{r['inverted_images']:,.0f}", f"{r['noise_flow_steps']:,.0f}", fmt(r["feature_fid"], 2),
                     fmt(r["precision"], 3), fmt(r["recall"], 3),
                     f"{fmt(r['fid'], 2)} ({pct(r['fid'], base['fid'])})"])
    return table(["inverted images", "noise-flow steps", "feature FID", "precision", "recall",
                  "Inception FID (1,000; vs base Euler 10)"], body)


def flow_protocol() -> str:
    body = []
    for r in _flow_rows("flow_protocol.csv"):
        gflops = DASH if r["gflops"] in ("", None) else f"{r['gflops']:.2f} ({r['flops_ratio']:.2f}x)"
        body.append([r["sampler"], f"{r['inception_n']:,.0f}", gflops,
                     ci(r["inception_fid"], r["fid_ci_low"], r["fid_ci_high"], 2), fmt(r["kid"], 4),
                     fmt(r["feature_fid"], 2), fmt(r["precision"], 3), fmt(r["recall"], 3)])
    return table(["sampler", "samples", "GFLOPs/image", "Inception FID [95% CI]", "KID", "feature FID",
                  "precision", "recall"], body)


CORRECTORS = [  # (file, its fit file, what the corrector is)
    ("flow_protocol.csv", "flow_protocol_fit.json", "noise-small (156k), 3,000 steps"),
    ("flow_protocol_long.csv", "flow_protocol_long_fit.json", "noise-small, resumed to 12,000 steps (training seed 0)"),
    ("flow_protocol_long_s1.csv", "flow_protocol_long_s1_fit.json", "noise-small, 12,000 steps, training seed 1"),
    ("flow_protocol_long_s2.csv", "flow_protocol_long_s2_fit.json", "noise-small, 12,000 steps, training seed 2"),
    ("flow_protocol_medium.csv", "flow_protocol_medium_fit.json", "noise-medium (349k), 3,000 steps"),
]


def flow_correctors() -> str:
    """Every corrected row of the protocol runs, one line per corrector and K, with its Inception FID at
    each sample size and its Fréchet distance to the inverted noises in noise space."""
    rows = _flow_rows("flow_protocol.csv")
    base = {r["inception_n"]: r for r in rows if r["sampler"] == "base euler-50"}
    fit0 = {row["set"]: row for row in read_json("flow_protocol_fit.json")["rows"]}
    changes: list[list[str]] = []
    body = [["none (base euler-50)", "base 50", f"{base[5000]['gflops']:.2f} ({base[5000]['flops_ratio']:.2f}x)",
             *(ci(base[n]["inception_fid"], base[n]["fid_ci_low"], base[n]["fid_ci_high"], 2) for n in (1000, 5000)),
             f"{fit0['N(0, I) (no corrector)']['frechet_to_inverted']:.1f}"]]
    for name, fit_name, what in CORRECTORS:
        fit = {row["set"]: row for row in read_json(fit_name)["rows"]}
        by_k: dict[float, dict[float, dict]] = {}
        for r in _flow_rows(name):
            if r["kind"] == "corrected":
                by_k.setdefault(r["noise_steps"], {})[r["inception_n"]] = r
        for k, sizes in sorted(by_k.items(), reverse=True):
            any_row = next(iter(sizes.values()))
            for n in sorted(sizes, reverse=True):
                r, b = sizes[n], base[n]
                apart = r["fid_ci_high"] < b["fid_ci_low"] or r["fid_ci_low"] > b["fid_ci_high"]
                changes.append([what, f"K = {k:.0f} + base 50", f"{n:,.0f}", pct(r["inception_fid"], b["inception_fid"]),
                                "separate" if apart else "overlap"])
            dist = fit.get(f"corrector euler-{k:.0f}")
            body.append([what, f"K = {k:.0f} + base 50", f"{any_row['gflops']:.2f} ({any_row['flops_ratio']:.2f}x)",
                         *(ci(sizes[n]["inception_fid"], sizes[n]["fid_ci_low"], sizes[n]["fid_ci_high"], 2)
                           if n in sizes else DASH for n in (1000, 5000)),
                         DASH if dist is None else f"{dist['frechet_to_inverted']:.1f}"])
    perfect = next(r for r in rows if r["kind"] == "reference" and "perfect" in r["sampler"])
    body.append(["perfect corrector (the inverted noises)", "base 50", f"{perfect['gflops']:.2f} (1.00x)",
                 ci(perfect["inception_fid"], perfect["fid_ci_low"], perfect["fid_ci_high"], 2), DASH,
                 f"{fit0['inverted noises, other half (floor)']['frechet_to_inverted']:.1f} (other half)"])
    return table(["corrector", "sampler", "GFLOPs/image", "Inception FID, 1,000 [95% CI]",
                  "Inception FID, 5,000 [95% CI]", "Fréchet distance in noise space"], body) + "\n\n" + table(
        ["corrector", "sampler", "samples", "change vs base euler-50 (same samples)", "intervals"], changes)


def flow_fit() -> str:
    """Stage e of every protocol run: the corrector's output against the inverted noises in noise space."""
    body = []
    for name, fit_name, what in CORRECTORS:
        fit = read_json(fit_name)
        body.append([what, f"inverted noises ({fit['n_inverted']:,})", f"{fit['inverted_rms']:.3f}", DASH])
        for row in fit["rows"]:
            body.append([what, row["set"], f"{row['rms']:.3f}", f"{row['frechet_to_inverted']:.1f}"])
    return table(["corrector", "set", "rms", "Fréchet distance to the inverted noises"], body)


def flow_protocol_seeds() -> str:
    body = []
    for r in _flow_rows("flow_protocol_seeds.csv"):
        body.append([f"{r['correct_seed']:.0f}", f"{r['inception_n']:,.0f}", fmt(r["base_fid"], 3),
                     fmt(r["inception_fid"], 3), fmt(r["difference"], 3, sign=True),
                     fmt(100 * r["relative_change"], 2, sign=True) + "%", f"{r['flops_ratio']:.3f}x",
                     fmt(r["feature_fid"], 2), fmt(r["base_feature_fid"], 2)])
    return table(["training seed", "samples", "base Inception FID", "corrected Inception FID", "difference",
                  "relative change", "FLOPs", "corrected feature FID", "base feature FID"], body)


# ----------------------------------------------------------------------------- shipped bases
def shipped_bases() -> str:
    """The base models shipped in apps/<app>/bases/default/, from their SHIPPED.json records."""
    evals = {
        "molecule": lambda e: f"validity {e['validity']:.3f}, uniqueness {e['uniqueness']:.3f} "
                              f"({e['n_samples']:,} samples)",
        "toy": lambda e: f"W1 {e['w1_to_mixture']:.3f} to the mixture ({e['n_samples']:,} samples)",
        "layout": lambda e: f"FID {e['fid']:.1f}, alignment {e['alignment']:.4f}, overlap {e['overlap']:.3f} "
                            f"({e['n']:,} samples)",
        "flow": lambda e: "feature FID " + " / ".join(
            f"{v['feature_fid']:.1f} ({k.replace('euler', 'Euler ')})" for k, v in e.items()
            if isinstance(v, dict) and "feature_fid" in v),
        "t2i": lambda e: f"held-out checker accuracy {e['overall']:.3f}, mean learned reward {e['mean_vqa']:.3f} "
                         f"({int(e['n']):,} images)",
    }
    body = []
    for app in ("molecule", "toy", "layout", "flow", "t2i"):
        base = REPO / "apps" / app / "bases" / "default"
        record = json.loads((base / "SHIPPED.json").read_text(encoding="utf-8"))
        size = sum((base / f).stat().st_size for f in record["files"] if (base / f).exists())
        steps = record.get("pretrain_config", {}).get("steps")
        body.append([app, f"`{record['command'].replace('OMP_NUM_THREADS=1 ', '')}`",
                     DASH if steps is None else f"{steps:,}", f"{size / 1e6:.2f} MB",
                     f"{record['pretrain_seconds'] / 60:.1f} min", evals[app](record["eval"]),
                     f"`{record['commit'][:7]}`"])
    return table(["app", "made by", "steps", "size", "pretraining (1 thread)", "its evaluation", "commit"], body)


TABLES: dict[str, Callable[[], str]] = {
    "shipped-bases": shipped_bases,
    "toy-seeds": toy_seeds,
    "toy-diagnose": toy_diagnose,
    "molecule-seeds": molecule_seeds,
    "molecule-diagnose": molecule_diagnose,
    "layout-single": layout_single,
    "layout-seeds": layout_seeds,
    "layout-diagnose": layout_diagnose,
    "t2i-seeds": t2i_seeds,
    "t2i-diagnose": t2i_diagnose,
    "t2i-sd3": t2i_sd3,
    "t2i-single": t2i_single,
    "t2i-gpu": t2i_gpu,
    "t2i-anchor": t2i_anchor,
    "flow-results": flow_results,
    "flow-noise-scaling": flow_noise_scaling,
    "flow-gpu-a": flow_gpu_a,
    "flow-gpu-b": flow_gpu_b,
    "flow-protocol": flow_protocol,
    "flow-correctors": flow_correctors,
    "flow-protocol-seeds": flow_protocol_seeds,
    "flow-fit": flow_fit,
}


# ----------------------------------------------------------------------------- the index page
def short(value: str) -> str:
    """A CSV cell for display: numbers with more than six significant digits to six."""
    v = num(value)
    if v is None or re.fullmatch(r"[-+]?\d+", value.strip()):
        return value
    digits = re.sub(r"[^0-9]", "", value.split("e")[0].split("E")[0]).lstrip("0")
    return f"{v:.6g}" if len(digits) > 6 else value


def _indent(text: str) -> str:
    return "\n".join(("    " + line) if line else "" for line in text.splitlines())


def csv_block(name: str) -> str:
    with open(RESULTS / name, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    rendered = table(header, [[short(c) for c in row] for row in body])
    title = f"{name}: {len(body)} rows × {len(header)} columns"
    return f'??? note "{title}"\n\n{_indent(rendered)}\n'


def text_block(name: str, lang: str = "text") -> str:
    text = (RESULTS / name).read_text(encoding="utf-8").rstrip("\n")
    return f"```{lang}\n{text}\n```\n"


def app_of(name: str) -> str:
    return next((a for a in APPS if name.startswith(a + "_") or name.startswith(a + ".")), "other")


def results_index() -> str:
    files = sorted(p.name for p in RESULTS.iterdir() if p.is_file() and not p.name.startswith("."))
    out = ["Every file under `docs/results/`, grouped by app; the links open the files themselves.", ""]
    counts = {}
    for name in files:
        counts.setdefault(Path(name).suffix, 0)
        counts[Path(name).suffix] += 1
    out.append("Files: " + ", ".join(f"{n} `{ext}`" for ext, n in sorted(counts.items())) + ".")
    out.append("")
    for app in APPS + ("other",):
        mine = [n for n in files if app_of(n) == app]
        if not mine:
            continue
        page = f" ([the {app} page](apps/{app}.md))" if app in APPS else ""
        out += [f"## {app}", "", f"{len(mine)} files{page}.", ""]
        for name in mine:
            suffix = Path(name).suffix
            out += [f"### {name}", "", f"[{name}](results/{name})", ""]
            if suffix == ".csv":
                out.append(csv_block(name))
            elif suffix == ".txt":
                out.append(text_block(name))
            elif suffix == ".json":
                out.append(text_block(name, "json"))
            elif suffix in (".png", ".jpg", ".svg"):
                out += [f"![{name}](results/{name})", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- mkdocs hook
def expand(markdown: str) -> str:
    """Replace the table markers (and the index marker) of a page's markdown."""
    def one(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise KeyError(f"unknown results table {name!r} (known: {', '.join(TABLES)})")
        return TABLES[name]()

    markdown = TABLE_MARKER.sub(one, markdown)
    if INDEX_MARKER in markdown:
        markdown = markdown.replace(INDEX_MARKER, results_index())
    return markdown


def on_page_markdown(markdown: str, page=None, config=None, files=None) -> str:
    return expand(markdown)


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(TABLES):
        print(results_index() if arg == "index" else TABLES[arg]())
        print()
