"""The mutation-testing targets, and the report of mutmut's results: docs/results/mutation.md.

    python scripts/mutation_report.py [TARGET ...]          # writes the report (scripts/mutation.sh runs it)
    python scripts/mutation_report.py --globs [TARGET ...]  # the mutant-name globs for `mutmut run`, one a line
    python scripts/mutation_report.py --sample K [TARGET ...]  # one in K of their mutants by name (after a run)
    python scripts/mutation_report.py --estimate [TARGET ...]  # their worst-case test time (after a run)

A TARGET is a module (`loss`, `training.loss`, `src/dreambooth/training/loss.py`), or a mutant name or glob as
mutmut spells them:
`dreambooth.<module>.x_<function>__mutmut_<n>`, and `dreambooth.<module>.xǁ<Class>ǁ<method>__mutmut_<n>` for a
method. No TARGET: every core target below. The report covers the core targets and the TARGETs, so runs of a few
modules at a time add up to the whole report; a mutant not tested yet counts as "not checked".
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "results" / "mutation.md"

# Modules mutated whole, and the modules of which only some functions (or classes, capitalised) are. The files
# must also be in [tool.mutmut] only_mutate in pyproject.toml.
WHOLE = ["training.loss", "training.images", "training.data", "training.components", "training.checkpoint",
         "training.tokens", "training.outputs", "generate"]
SOME = {
    "training.loop": ["training_step", "batch_stream", "loop", "make_accelerator", "setup"],
    "training.speed": ["GradientClipping", "cpu_convolution", "speed_up"],
    # the key maps between the diffusers, peft, kohya and original (LDM) state-dict layouts
    "formats.lora": ["is_kohya", "_to_peft_names", "lora_state_for_peft"],
    "formats.kohya": ["_kohya_name"],
    "formats.single_file": ["unet_rules", "vae_rules", "_check_mid_block", "_attentions", "apply_rules",
                            "text_encoder_tensors", "checkpoint_tensors"],
}
COLUMNS = ["killed", "survived", "timeout", "no tests", "skipped", "other", "not checked"]


def module_globs(module: str) -> list[str]:
    # A function's glob ends right after its name: mutmut also matches it against the function's own name (no
    # `__mutmut_<n>`) to pick the tests to run first, unmutated. So no other function's name may start with it.
    if module not in SOME:
        return [f"dreambooth.{module}.*"]
    return [f"dreambooth.{module}." + (f"xǁ{name}ǁ*" if name[0].isupper() else f"x_{name}*") for name in SOME[module]]


def globs(targets: list[str]) -> list[str]:
    if not targets:
        return [g for module in WHOLE + list(SOME) for g in module_globs(module)]
    out = []
    for target in targets:
        if target.endswith(".py"):
            out += module_globs(".".join(Path(target).resolve().relative_to(ROOT / "src" / "dreambooth")
                                         .with_suffix("").parts))
        elif target in WHOLE or target in SOME:
            out += module_globs(target)
        elif "." in target or "*" in target:
            out.append(target)
        else:  # a module's last name: `loss` for training.loss
            out += module_globs(next((m for m in WHOLE + list(SOME) if m.rsplit(".", 1)[-1] == target), target))
    return out


def results(patterns: list[str]) -> dict[str, str]:
    """{mutant name: mutmut's status} of the mutants matching `patterns`, from mutants/**/*.py.meta."""
    from mutmut.stats import status_by_exit_code

    found = {}
    for meta_file in sorted((ROOT / "mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta_file.read_text())["exit_code_by_key"].items():
            if any(fnmatch(name, p) for p in patterns):
                found[name] = status_by_exit_code[code]
    return found


def estimate(patterns: list[str], workers: int) -> None:
    """mutmut's estimate of a mutant: the time of the tests that call its function, all of which run if it survives.
    Read from its stats here, because `mutmut print-time-estimates` (3.8.1) empties their test map."""
    stats = json.loads((ROOT / "mutants" / "mutmut-stats.json").read_text())
    seconds = {function: sum(stats["duration_by_test"].get(t, 0) for t in tests)
               for function, tests in stats["tests_by_mangled_function_name"].items() if tests}
    per_module: dict[str, Counter] = {}
    for name in results(patterns):
        c = per_module.setdefault(name.rsplit(".", 1)[0], Counter())
        function = name.split("__mutmut_")[0]
        c["mutants"] += 1
        c["no tests"] += function not in seconds
        c["s"] += seconds.get(function, 0)
    for module, c in sorted(per_module.items()) + [("all", sum(per_module.values(), Counter()))]:
        print(f"{module:24} {c['mutants']:5} mutants {c['no tests']:5} without tests "
              f"{c['s'] / 60 / workers:7.1f} min if all survive, with {workers} workers")


def diff(name: str) -> str:
    """What `mutmut show NAME` prints, without its header line."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    module = name.rsplit(".", 1)[0]
    return get_diff_for_mutant(name, path=Path("src", *module.split(".")).with_suffix(".py"))


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def report(found: dict[str, str], extra: list[str], equivalent: dict[str, str]) -> str:
    by_module: dict[str, Counter] = {}
    for name, status in found.items():
        by_module.setdefault(name.rsplit(".", 1)[0], Counter())[status if status in COLUMNS else "other"] += 1
    survivors = sorted(n for n, status in found.items() if status in ("survived", "suspicious"))
    targets = ", ".join(WHOLE) + "; " + "; ".join(f"{m}.py: {', '.join(names)}" for m, names in SOME.items())
    lines = ["# Mutation testing", "",
             "Written by `scripts/mutation_report.py` from mutmut's results in `mutants/` (`scripts/mutation.sh`).",
             "Score: (killed + timeout) / (checked - skipped); non-equivalent: the same without the survivors "
             "explained in `scripts/mutation_equivalent.py`.", "",
             f"Targets: {targets}" + "".join(f"; `{p}`" for p in extra), "",
             "| module | " + " | ".join(COLUMNS) + " | score | non-equivalent |", "|---" * (len(COLUMNS) + 3) + "|"]
    rows = sorted(by_module.items()) + ([("all", sum(by_module.values(), Counter()))] if len(by_module) > 1 else [])
    for module, c in rows:
        prefix = "" if module == "all" else module + "."
        equivalents = sum(1 for n in survivors if n in equivalent and n.startswith(prefix))
        caught, tested = c["killed"] + c["timeout"], sum(c[k] for k in COLUMNS[:-1]) - c["skipped"]
        lines.append(f"| {module} | " + " | ".join(str(c[k]) for k in COLUMNS)
                     + f" | {percent(caught, tested)} | {percent(caught, tested - equivalents)} |")
    others = sorted(f"`{n}`: {status}" for n, status in found.items() if status not in COLUMNS + ["suspicious"])
    if others:
        lines += ["", "Other outcomes (a SIGKILL at the CPU limit also reads as `segfault`): " + ", ".join(others)]
    no_tests = Counter(n.split("__mutmut_")[0] for n, status in found.items() if status == "no tests")
    if no_tests:
        lines += ["", "## Functions no selected test calls", ""]
        lines += [f"- `{name}`: {count} mutants" for name, count in sorted(no_tests.items())]
    lines += ["", f"## Survivors ({len(survivors)})", ""]
    for name in survivors:
        reason = equivalent.get(name, "not explained yet")
        lines += [f"### `{name}`", "", f"{'Equivalent' if name in equivalent else 'Open'}: {reason}", "",
                  "```diff", diff(name), "```", ""]
    stale = sorted(set(equivalent) - set(survivors))
    if stale:
        lines += ["## Stale entries of scripts/mutation_equivalent.py", "",
                  "Not a survivor of this report (killed now, renumbered, or not in its mutants):", ""]
        lines += [f"- `{name}`" for name in stale]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> None:
    os.chdir(ROOT)
    if argv[:1] == ["--globs"]:
        print("\n".join(globs(argv[1:])))
        return
    if argv[:1] == ["--estimate"]:
        estimate(globs(argv[1:]), int(os.environ.get("MUTATION_WORKERS", "2")))
        return
    if argv[:1] == ["--sample"]:  # the same mutants every time: a hash of the name picks them, k shards cover all
        k, shard = int(argv[1]), int(os.environ.get("MUTATION_SHARD", "0"))
        print("\n".join(n for n in results(globs(argv[2:])) if zlib.crc32(n.encode()) % k == shard % k))
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    from mutation_equivalent import EQUIVALENT

    extra = [p for p in globs(argv) if p not in globs([])]
    found = results(globs([]) + extra)
    if not found:
        sys.exit("no mutmut results in mutants/: run scripts/mutation.sh first")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report(found, extra, EQUIVALENT), encoding="utf-8")
    print(f"wrote {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
