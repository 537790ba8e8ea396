"""The README and the docs pages: size, the two commands CI runs, result numbers, links.

Fast, offline, and without mkdocs: the tables the site generates are rendered by importing
docs/gen_results.py directly.

The number rule (test b)
------------------------
Every number that *reports a result* in README.md or in a page under docs/apps/ must be one of the
numbers in the results files it may draw on, as printed or rounded to fewer decimals.

- **Which numbers are checked.** In prose and tables outside fenced code blocks, inline code spans,
  HTML comments and link targets: every number with a decimal point (``0.527``, ``−0.606``), every
  percentage (``28.64%``, ``−28.6%``, ``25%``) and every ratio written with ``x`` (``1.24x``); a
  mantissa written ``2.19 × 10⁶`` is checked as the number it writes. Not checked: integers without
  ``%`` (counts of seeds, samples, steps, rounds; sizes; dates), scientific notation (``1e-4``, the
  settings' learning rates and tolerances), versions (``0.1.3``, ``torch ≥ 2.2``), references
  (``Lemma 2.3``, ``arXiv 2510.02692``) and quantities with a unit of size or time (``0.84 MB``, ``1.5 min``).
- **Where they may come from.** A page docs/apps/APP.md may draw on the files docs/results/APP_*
  and on the tables its ``<!-- table: NAME -->`` markers generate from them (docs/gen_results.py
  prints the files' values at a fixed precision and computes relative changes, FLOPs ratios and CI
  half-widths at build time). README.md may draw on the files under docs/results/ it links to and
  every generated table.
- **Which values of a file count.** Every number in a ``.txt`` file (verdict lines: printed for
  people, at a fixed precision). In a ``.csv`` or ``.json`` file, every number written with at most
  six significant digits (``0.6828``, ``0.847``, ``1000``). A value written at full float precision
  (``0.45546730324775...``) is machine output: prose quotes it through a generated table, which
  prints it at a fixed precision beside its method and metric. Without this, the thousands of
  full-precision values of the per-seed CSVs would leave almost no 3-decimal number unmatched.
- **When a number matches.** A number ``x`` printed with ``d`` decimals matches a value ``v`` of
  those files when ``|v − x| ≤ ½·10⁻ᵈ`` (so ``v`` rounds to ``x``, either way at a tie); a number
  written with a sign (``+0.100``, ``−28.6%``) must have the value's sign, one written without
  (``lowers FID by 28.6%``) may quote either. A percentage ``x%`` also matches a fraction ``v`` with ``100·v`` rounding to
  ``x`` (e.g. ``relative_change −0.2864`` → ``−28.64%``). The values of a results file are every
  number in it as text (CSV cells, JSON values, the numbers inside verdict lines).

Quoted verdict lines (code-block lines holding ``[95% CI``, and the budget sweep's answer lines)
must appear verbatim in a results file the page may draw on. The budget sweep's verdict and
validation files are quoted that way only: their per-cell values are no source of prose numbers. ``test_a_wrong_number_is_caught`` checks that the rule rejects retyped numbers
(``0.5279`` among them), and ``test_rule_rejects_most_one_digit_typos`` measures how many one-digit
changes of the pages' real numbers it still lets through (a value-only rule cannot know which metric
a number belongs to: a typo that lands on another value the page may quote passes).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RESULTS = DOCS / "results"
README = REPO / "README.md"
APPS = ("toy", "molecule", "layout", "t2i", "flow")
MAX_README_LINES = 250


# ----------------------------------------------------------------------------- helpers
def gen_results():
    """docs/gen_results.py, imported by path (it is the mkdocs hook, not part of the package)."""
    if "gen_results" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gen_results", DOCS / "gen_results.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gen_results"] = module
        spec.loader.exec_module(module)
    return sys.modules["gen_results"]


FENCE = re.compile(r"^(```|~~~)")


def split_code(text: str) -> tuple[str, list[str]]:
    """(the text outside fenced code blocks, the lines inside them)."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            prose.append("")
            continue
        (code if inside else prose).append(line)
    return "\n".join(prose), code


def prose_of(text: str) -> str:
    """Markdown without code blocks, inline code, HTML comments and link targets."""
    prose, _ = split_code(text)
    prose = re.sub(r"<!--.*?-->", " ", prose, flags=re.S)
    prose = re.sub(r"``.+?``|`[^`\n]+`", " ", prose)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)
    return prose


SUPERSCRIPT = str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")
UNITS = r"(?:MB|GB|KB|kB|MiB|GiB|KiB|min|minutes|ms|s|h|hours|k|M)\b"
REFERENCES = re.compile(r"(?:(?:Lemma|Sec\.|Section|Alg\.|Algorithm|Eq\.|Table|Fig\.|issue|arXiv:?|version|v)\s*"
                        r"|(?:torch|python|Python)\s*[≥>=<]*\s*)$")
DOC_NUMBER = re.compile(
    r"(?<![\w.,/\-−+])"
    r"(?P<sign>[−+-])?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)"
    r"(?P<frac>\.\d+)?"
    r"(?![\d.]*\.\d)"  # not a version 1.2.3
    r"(?![eE][-+]?\d)"  # not scientific 1e-4
    r"(?P<exp>\s*×\s*10[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)?"
    r"(?P<unit>%|x(?![\w]))?"
)


@dataclass(frozen=True)
class Number:
    text: str
    value: float
    decimals: int  # of the printed mantissa; the tolerance is half a unit of the last printed digit
    tolerance: float
    percent: bool
    signed: bool  # written with + or −: the value's sign must match too


def doc_numbers(text: str) -> list[Number]:
    """The result-reporting numbers of a markdown text, by the rule in the module docstring."""
    out = []
    prose = prose_of(text)
    for m in DOC_NUMBER.finditer(prose):
        frac, unit, exp = m["frac"], m["unit"], m["exp"]
        if not (frac or unit or exp):
            continue  # an integer: a count, a size, a date
        if REFERENCES.search(prose[max(0, m.start() - 12):m.start()]):
            continue
        if not unit and re.match(r"\s*" + UNITS, prose[m.end():]):
            continue
        decimals = len(frac) - 1 if frac else 0
        value = float(m["int"].replace(",", "") + (frac or ""))
        tolerance = 0.5 * 10.0 ** -decimals
        if exp:
            power = int(exp.split("10", 1)[1].translate(SUPERSCRIPT))
            value, tolerance = value * 10.0 ** power, tolerance * 10.0 ** power
        if m["sign"] in ("−", "-"):
            value = -value
        out.append(Number(m.group(0).strip(), value, decimals, tolerance, unit == "%", bool(m["sign"])))
    return out


FILE_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
MAX_SIGNIFICANT = 6  # a CSV / JSON value printed with more digits is machine output (see the module docstring)


def text_files(names: list[str]) -> dict[str, str]:
    return {n: (RESULTS / n).read_text(encoding="utf-8") for n in names
            if (RESULTS / n).suffix in (".csv", ".txt", ".json")}


def significant(token: str) -> int:
    mantissa = re.split(r"[eE]", token.lstrip("+-"))[0]
    return len(mantissa.replace(".", "").lstrip("0"))


def file_values(text: str, name: str) -> list[float]:
    """The values of one results file the rule counts: every number of a .txt file (printed for
    people), the numbers of a .csv / .json file written with at most MAX_SIGNIFICANT digits."""
    tokens = FILE_NUMBER.findall(text.replace("−", "-"))
    if not name.endswith(".txt"):
        tokens = [t for t in tokens if significant(t) <= MAX_SIGNIFICANT]
    return [float(t) for t in tokens]


class Pool:
    """The values a page may draw on: the numbers in its results files and in its generated tables."""

    def __init__(self, values: list[float]):
        self.values = sorted(set(values))

    def matches(self, n: Number) -> bool:
        import bisect

        slack = n.tolerance * (1 + 1e-9) + 1e-12
        targets = [n.value] + ([n.value / 100.0] if n.percent else [])
        if not n.signed:  # "lowers FID by 28.6%" may quote a value printed as −28.64%
            targets += [-t for t in targets]
        for target in targets:
            tol = slack / 100.0 if n.percent and abs(abs(target) - abs(n.value) / 100.0) < 1e-15 else slack
            lo = bisect.bisect_left(self.values, target - tol)
            hi = bisect.bisect_right(self.values, target + tol)
            for v in self.values[lo:hi]:
                if target == 0 or v == 0 or (v > 0) == (target > 0):
                    return True
        return False


def scope(page: Path) -> list[str]:
    """The results files a page may draw on (the rule's second point)."""
    names = sorted(p.name for p in RESULTS.iterdir() if p.is_file())
    if page.parent.name == "apps":
        return [n for n in names if n.startswith(page.stem + "_")]
    linked = set(re.findall(r"docs/results/([\w.\-]+)", page.read_text(encoding="utf-8")))
    return [n for n in names if n in linked]


# The budget sweep's verdict and validation files print hundreds of per-cell values; pages quote
# their lines whole, in code blocks (checked verbatim below), so their numbers are no source of prose
# (they would let most one-digit typos through).
QUOTED_ONLY = re.compile(r"_budget_(verdicts|validation)\.txt$")
QUOTED_LINE = re.compile(r"^\w+: (is there a budget|recommended t)")


@lru_cache(maxsize=None)
def pool_for(page: Path) -> Pool:
    text = page.read_text(encoding="utf-8")
    values = [v for name, t in text_files(scope(page)).items() if not QUOTED_ONLY.search(name)
              for v in file_values(t, name)]
    gr = gen_results()
    tables = gr.TABLE_MARKER.findall(text) if page.parent.name == "apps" else list(gr.TABLES)
    for name in tables:
        values += [n.value for n in doc_numbers(gr.TABLES[name]())]
    return Pool(values)


def checked_pages() -> list[Path]:
    return [README] + [DOCS / "apps" / f"{app}.md" for app in APPS]


def unmatched(page: Path, text: str | None = None) -> list[str]:
    pool = pool_for(page)
    text = page.read_text(encoding="utf-8") if text is None else text
    return [n.text for n in doc_numbers(text) if not pool.matches(n)]


# ----------------------------------------------------------------------------- (a) README
def two_commands_section(text: str) -> list[str]:
    """The lines of the '## Two commands' section, as .ci/run's awk reads them."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("## Two commands"):
            inside = True
            continue
        if inside and line.startswith("## "):
            break
        if inside:
            lines.append(line)
    return lines


def bash_blocks(lines: list[str]) -> list[str]:
    blocks, current = [], None
    for line in lines:
        if current is None and line.startswith("```bash"):
            current = []
        elif current is not None and line.startswith("```"):
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_readme_two_commands_section_holds_exactly_two_bash_blocks():
    blocks = bash_blocks(two_commands_section(README.read_text(encoding="utf-8")))
    assert len(blocks) == 2, f"'## Two commands' holds {len(blocks)} ```bash blocks, .ci/run runs exactly two"
    install, tests = blocks
    assert "pip install" in install and "pgraft " in install
    assert "pytest" in tests


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")
def test_ci_extracts_the_same_two_commands():
    """.ci/run's own awk program (read from .ci/run) finds the blocks this test finds."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    program = re.search(r"awk -v want=\"\$1\" '(.*?)' README\.md", ci, re.S)
    assert program, ".ci/run: the awk program that reads the README's two commands moved"
    blocks = bash_blocks(two_commands_section(README.read_text(encoding="utf-8")))
    for want, expected in ((1, blocks[0]), (2, blocks[1])):
        got = subprocess.run(["awk", "-v", f"want={want}", program.group(1), str(README)],
                             capture_output=True, text=True, check=True).stdout
        assert got.rstrip("\n") == expected and got.strip()


# ----------------------------------------------------------------------------- (b) numbers
@pytest.mark.parametrize("page", checked_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_result_number_is_in_a_results_file(page):
    missing = unmatched(page)
    assert not missing, (f"{page.relative_to(REPO)}: numbers found in no file it may draw on "
                         f"({', '.join(scope(page)[:3])}...; rule: tests/test_docs.py docstring): {missing}")


@pytest.mark.parametrize("page", checked_pages()[1:], ids=lambda p: p.stem)
def test_quoted_verdict_lines_are_verbatim(page):
    _, code = split_code(page.read_text(encoding="utf-8"))
    files = text_files(scope(page))
    lines = {line.strip() for text in files.values() for line in text.splitlines()}
    quoted = [line.strip() for line in code if "[95% CI" in line or QUOTED_LINE.match(line.strip())]
    missing = [line for line in quoted if line not in lines]
    assert not missing, f"{page.name}: verdict lines not in any of its results files: {missing}"


def test_a_wrong_number_is_caught():
    page = DOCS / "apps" / "molecule.md"
    for wrong in ("QED 0.5279 after fine-tuning", "validity 0.8643", "FCD 9.93", "V.U.N. −0.2881"):
        assert unmatched(page, wrong), f"the rule let a retyped number through: {wrong!r}"
        assert unmatched(README, wrong), f"the rule let a retyped number through in the README: {wrong!r}"
    # the same numbers as the results files print them pass
    assert not unmatched(page, "QED of valid unique 0.555, V.U.N. 0.717, FCD 9.89, −0.029 [95% CI −0.037, −0.022]")
    # rounding to fewer decimals passes; a sign flip does not
    assert not unmatched(README, "relative change −30.6% at 1.24x")
    assert unmatched(README, "relative change +30.63%")


def one_digit_typos(n: Number) -> list[str]:
    """The number with its last digit moved by ±1 (what a slip of the finger does)."""
    digits = n.text.rstrip("%x")
    last = max(i for i, c in enumerate(digits) if c.isdigit())
    out = []
    for step in (-1, 1):
        d = int(digits[last]) + step
        if 0 <= d <= 9:
            out.append(digits[:last] + str(d) + digits[last + 1:] + n.text[len(digits):])
    return out


def test_rule_rejects_most_one_digit_typos():
    """Move the last digit of every checked number by one, on every checked page: the rule must reject
    most of them (the rest hit another value the page may draw on; many of those are settings such as
    t = 0.25, whose neighbours 0.24 / 0.26 occur as values). Measured when written: 24% pass."""
    tried = passed = 0
    for page in checked_pages():
        for n in doc_numbers(page.read_text(encoding="utf-8")):
            if n.decimals < 2:
                continue
            for typo in one_digit_typos(n):
                tried += 1
                passed += not unmatched(page, f"value {typo} here")
    assert tried > 100
    assert passed / tried < 1 / 3, f"{passed} of {tried} one-digit typos pass the rule"


# ----------------------------------------------------------------------------- (c) links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files(path):
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    prose = re.sub(r"``.+?``|`[^`\n]+`", " ", prose)
    bad = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file).is_file():
            bad.append(target)
    assert not bad, f"{path.relative_to(REPO)}: links to missing files: {bad}"


# ----------------------------------------------------------------------------- generated content
def test_every_table_marker_renders():
    gr = gen_results()
    used = set()
    for page in sorted(DOCS.rglob("*.md")):
        for name in gr.TABLE_MARKER.findall(page.read_text(encoding="utf-8")):
            assert name in gr.TABLES, f"{page.name}: unknown table {name!r}"
            used.add(name)
    for name in used:
        table = gr.TABLES[name]()
        assert table.startswith("| ") and table.count("\n") >= 2, name


def test_results_index_lists_every_file_and_its_links_resolve():
    gr = gen_results()
    index = gr.expand((DOCS / "results.md").read_text(encoding="utf-8"))
    assert "<!-- results-index -->" not in index
    for p in RESULTS.iterdir():
        assert f"### {p.name}" in index, f"results index misses {p.name}"
    for target in LINK.findall(index):
        if not re.match(r"[a-z]+:", target):
            assert (DOCS / target).is_file(), target
