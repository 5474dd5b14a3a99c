"""The head-role atlas figure (gptviz.plots.heads)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptviz.analysis.heads import ROLES
from gptviz.plots.heads import ROLE_LABELS, head_roles_figure


def table(n_layers: int, n_heads: int, seed: int) -> pd.DataFrame:
    """A head_roles-shaped table with random scores, rows shuffled (the figure must not rely on order)."""
    rng = np.random.default_rng(seed)
    rows = [dict(layer=l, head=h, **{r: float(rng.random()) for r in ROLES})
            for l in range(n_layers) for h in range(n_heads)]
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


@settings(max_examples=20, deadline=None)
@given(n_layers=st.integers(1, 6), n_heads=st.integers(1, 6), seed=st.integers(0, 2**16),
       role=st.sampled_from(ROLES))
def test_cells_hold_the_scores_of_their_head(n_layers, n_heads, seed, role):
    df = table(n_layers, n_heads, seed)
    fig = head_roles_figure(df, role)
    (heat,) = fig.data
    z = np.asarray(heat.z, dtype=float)
    custom = np.asarray(heat.customdata, dtype=float)
    assert z.shape == (n_layers, n_heads) and custom.shape == (n_layers, n_heads, 2 + len(ROLES))
    assert list(heat.y) == list(range(n_layers)) and list(heat.x) == list(range(n_heads))
    for row in df.itertuples(index=False):
        l, h = row.layer, row.head
        assert z[l, h] == pytest.approx(getattr(row, role), abs=1e-4)  # rounded to 4 decimals
        assert tuple(custom[l, h, :2]) == (l, h)  # a click maps back to the head
        assert custom[l, h, 2:] == pytest.approx([getattr(row, r) for r in ROLES], abs=1e-4)
    assert (heat.zmin, heat.zmax) == (0, 1)
    for r in ROLES:
        assert ROLE_LABELS[r] in heat.hovertemplate
    assert ROLE_LABELS[role] in fig.layout.title.text


def test_height_and_errors():
    df = table(12, 12, 0)
    assert head_roles_figure(df, "induction", height=500).layout.height == 500
    assert head_roles_figure(df, "induction").layout.height >= 12 * 20
    with pytest.raises(ValueError, match="role"):
        head_roles_figure(df, "copying")
    with pytest.raises(ValueError, match="column"):
        head_roles_figure(df.drop(columns=["self"]), "induction")
