"""Figures from synthetic result tables: any token string draws, PNG and SVG are written."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recallscope.methods.general.summaries import BUCKETS
from recallscope.report.figures import (
    causal_trace_average,
    causal_trace_fact,
    logit_lens_curves,
    save_figure,
    token_label,
    token_text,
)

HOSTILE = ["$x$", "a$b", "\n", "", " ", "<script>", "\\frac{1}{2}", "$$"]


def _trace_rows(fact_id: str, tokens: list[str], layers: int = 4) -> pd.DataFrame:
    n = len(tokens)
    buckets = ["first subject", "last subject"] + ["further tokens"] * (n - 3) + ["last token"]
    rng = np.random.default_rng(0)
    rows = []
    for kind in ("hidden", "mlp"):
        for position in range(n):
            for layer in range(layers):
                score = float(rng.random())
                rows.append(
                    dict(
                        fact_id=fact_id,
                        kind=kind,
                        position=position,
                        layer=layer,
                        token=tokens[position],
                        bucket=buckets[position],
                        score=score,
                        indirect_effect=score - 0.1,
                        low=0.1,
                        high=0.9,
                        target="$5",
                    )
                )
    return pd.DataFrame(rows)


def test_token_labels_are_safe():
    assert token_text("\n") == "⏎" and token_text("") == "∅" and token_text(" ") == "' '"
    assert token_label("$x$") == r"\$x\$" and token_text("$x$") == "$x$"


def test_causal_trace_figures_draw_any_token(tmp_path):
    frame = pd.concat([_trace_rows("a", HOSTILE), _trace_rows("b", ["x", "y", "z"])])
    written = save_figure(causal_trace_average(frame, "mlp", BUCKETS, 2), tmp_path, "avg", "caption")
    assert written.png.stat().st_size > 1000 and written.svg.exists()
    assert (
        written.width > 100 and written.height > 100 and written.data_uri.startswith("data:image/png;base64,")
    )
    figure = causal_trace_fact(frame[frame.fact_id == "a"], ["hidden", "mlp"], "$ title $")
    fact = save_figure(figure, tmp_path, "fact", "c")
    assert fact.height > written.height / 2


def test_logit_lens_curves(tmp_path):
    rows = [
        dict(fact_id=f, site=s, layer=layer, position="last", target=t, prob=0.1 * layer, rank=10 - layer)
        for f in ("a", "b", "c")
        for s in ("resid_post", "mlp_out")
        for t in ("gold", "top1")
        for layer in range(5)
    ]
    written = save_figure(logit_lens_curves(pd.DataFrame(rows)), tmp_path, "lens", "c")
    assert written.png.stat().st_size > 1000


def test_head_grid_clips_a_few_extreme_cells_and_says_so():
    from recallscope.report.figures import head_grid

    values = np.linspace(-1, 1, 12)
    values[0] = -40.0
    table = pd.DataFrame({"layer": np.repeat(range(3), 4), "head": np.tile(range(4), 3), "coef": values})
    fig = head_grid(table, "coef", "t", "β", diverging=True, clip=0.9)
    colorbar = fig.axes[-1]
    low, high = colorbar.get_ylim()
    assert high == -low and high < 2 and "clipped" in colorbar.get_ylabel()
    plain = head_grid(table, "coef", "t", "β", diverging=True).axes[-1]
    assert plain.get_ylim()[1] == 40.0 and "clipped" not in plain.get_ylabel()


def test_causal_tracing_section_reads_a_table_of_recallscope_0_1(tmp_path):
    from recallscope.methods.general.report import causal_tracing_section
    from recallscope.report.section import Options
    from report.fake_store import FakeStore

    frame = pd.concat(
        [_trace_rows("a", ["x", "y", "z"]), _trace_rows("b", ["x", "y", "z"])], ignore_index=True
    )
    assert not {"partner", "span", "corruption", "direction"} & set(frame)  # written before they existed
    facts = pd.DataFrame({"fact_id": ["a", "b"], "prompt": ["x y z"] * 2, "target": ["$5"] * 2})
    section = causal_tracing_section(FakeStore({"causal_tracing": frame}), facts, tmp_path, Options())
    assert section.figures and section.tables and set(section.per_fact) == {"a", "b"}
