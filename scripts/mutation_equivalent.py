"""Surviving mutants judged equivalent or harmless, with the reason: read by scripts/mutation_report.py.

A survivor listed here still appears in docs/results/mutation.md with its reason, but leaves the denominator of
the "non-equivalent killed" score. Keys are mutmut's mutant names (`mutmut results --all true`); mutmut numbers
the mutants of a function in order, so an edit to that function can renumber them: the report flags entries
that no longer name a survivor.
"""

EQUIVALENT: dict[str, str] = {
    # "dreambooth.loss.x_example__mutmut_1": "why no test can tell the mutant from the original",
}
