"""Rules the suite keeps about itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent

# A float comparison with a tolerance: what another CPU's vector width or thread count can break (issue 24).
TOLERANCE = re.compile(r"rounding_bound\(|assert_same_picture\(|allclose\(|assert_close\(|atol=|rtol=|<=? 1e-")


def test_every_float_comparison_with_a_tolerance_is_marked_numerics():
    """.ci/run runs `-m numerics` a second time on PyTorch's plainest kernels at another thread count; a test that
    compares floats with a tolerance and lacks the mark would be checked on one summation order only."""
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            marks = " ".join(ast.unparse(d) for d in node.decorator_list)
            if TOLERANCE.search(ast.get_source_segment(source, node)) and "numerics" not in marks:
                unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"mark these @pytest.mark.numerics: {unmarked}"
