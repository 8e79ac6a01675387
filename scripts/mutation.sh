#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3.8.1 ([tool.mutmut] in pyproject.toml). Writes
# docs/results/mutation.md (scripts/mutation_report.py, which also lists the targets); survivors judged equivalent
# are explained in scripts/mutation_equivalent.py.
#
#   scripts/mutation.sh                              # one mutant in 4 of every core target: 26 min on 2 cores
#   MUTATION_SHARD=3 scripts/mutation.sh             # another quarter (0-3; the 4 shards cover every mutant)
#   MUTATION_SAMPLE=1 scripts/mutation.sh            # every mutant at once: about 1.5 hours on 2 cores
#   MUTATION_SAMPLE=1 scripts/mutation.sh loss src/dreambooth/training/data.py  # some modules
#   scripts/mutation.sh 'dreambooth.training.loop.x_loop*' dreambooth.training.loss.x_snr_from_alphas__mutmut_3   # mutant names
#   scripts/mutation.sh --estimate [TARGET ...]      # the time if every mutant survived; runs no mutants
#
# The sample: a hash of each mutant's name picks it, so a shard is the same mutants every time, spread evenly over
# the modules and functions (names given explicitly are always run whole).
#
# The report always covers every core target, so runs of a few modules at a time fill it up. MUTATION_WORKERS:
# mutants tested at once (default 2). mutmut keeps its copy of the project and the results in mutants/
# (git-ignored); every mutant named is tested again. The first run, and one after the tests changed, starts with
# a pass of the selected tests that learns which tests call which function, and their times. To try the
# mechanics on a few test files, narrow that pass with pytest's own options, then remove mutants/:
#   PYTEST_ADDOPTS='-k "test_loss.py or test_step_known_answers.py"' scripts/mutation.sh loss; rm -rf mutants
# Do not run `mutmut print-time-estimates`: in 3.8.1 it empties the test map in mutants/mutmut-stats.json, and
# every mutant of the next run then has "no tests" (remove mutants/ if it happened).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
if ! $py -c 'import importlib.metadata as m; assert m.version("mutmut") == "3.8.1"' 2>/dev/null; then
    .venv/bin/pip install --quiet mutmut==3.8.1
fi
workers=${MUTATION_WORKERS:-2}
estimate=0
if [[ "${1:-}" == --estimate ]]; then estimate=1; shift; fi
list=$($py scripts/mutation_report.py --globs "$@")
mapfile -t globs <<< "$list"

# The venv has the project installed in editable mode (src/ on sys.path). mutmut puts mutants/src first in its
# own process; this does the same for the Python processes a test starts (python -m dreambooth ...). The folder
# must exist before Python starts: a sys.path entry missing at start-up stays unsearched.
mkdir -p mutants/src
export PYTHONPATH="$PWD/mutants/src${PYTHONPATH:+:$PYTHONPATH}"
# Two workers of two torch threads each on two cores: OpenMP threads spinning while they wait took 8 times the CPU
# time for the same mutants (loss.py: 0.24 mutants/s instead of 1.9).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
first_pass() {  # the mutants and the first pass of the tests (with one mutant), if they are not there yet
    [[ -f mutants/mutmut-stats.json ]] ||
        .venv/bin/mutmut run --max-children "$workers" dreambooth.training.loss.x_snr_from_alphas__mutmut_1
}
if ((estimate)); then
    first_pass
    exec $py scripts/mutation_report.py --estimate "$@"
fi
explicit=0
for target in "$@"; do [[ "$target" == *.*.* ]] && explicit=1; done
if ((!explicit)) && [[ ${MUTATION_SAMPLE:-4} -gt 1 ]]; then
    first_pass
    list=$($py scripts/mutation_report.py --sample "${MUTATION_SAMPLE:-4}" "$@")
    [[ -n "$list" ]] || { echo "no mutant of $* is in the sample"; exit 1; }
    mapfile -t globs <<< "$list"
fi
status=0
.venv/bin/mutmut run --max-children "$workers" "${globs[@]}" || status=$?
$py scripts/mutation_report.py "$@"
exit $status
