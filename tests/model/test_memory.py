"""The memory seam: LocalMemory satisfies the Memory / MemoryFetch protocols, and update(fetch)
steps exactly the rows that fetch read, with the gradient autograd gives the table."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram_ray import config as C
from engram_ray.config import OptimizerConfig
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.model import EngramLM, LocalMemory, Memory, MemoryFetch
from engram_ray.model.memory import LocalFetch


@pytest.fixture(scope="module")
def layout():
    return TableLayout.build(C.tiny(), CompressedVocab(np.arange(50)))


def _rows(layout, seed=0, shape=(2, 3, 5)):
    """Random global rows [L, B, T, H], with repeats so that some rows are read twice."""
    rows = np.random.default_rng(seed).integers(0, 300, size=(*shape, layout.num_heads))
    rows[:, :, 1:3] = rows[:, :, :2]
    return rows + layout.offsets[:, None, None, :]


def test_local_memory_satisfies_the_protocols(layout):
    memory = LocalMemory(layout)
    fetch = memory.fetch(_rows(layout))
    assert isinstance(memory, Memory) and isinstance(fetch, MemoryFetch)
    assert memory.layout is layout and fetch.fetch_seconds == 0.0
    assert not isinstance(object(), Memory)


def test_update_equals_an_sgd_step_on_the_autograd_gradient_of_the_table(layout):
    lr = 0.5
    memory = LocalMemory(layout, init_std=0.5, optimizer=OptimizerConfig(kind="sgd", lr=lr))
    table = memory.table.detach().clone().requires_grad_(True)    # the same table, by autograd
    rows = _rows(layout)
    fetch = memory.fetch(rows)
    weights = torch.randn(3, 5, layout.num_heads * layout.row_dim)
    loss = sum((fetch.rows(i) * weights * (i + 1)).sum() for i in range(2))
    ref = sum((F.embedding(torch.as_tensor(rows[i]), table).flatten(-2) * weights * (i + 1)).sum()
              for i in range(2))
    loss.backward()
    ref.backward()
    assert memory.table.grad is None                 # the table is stepped, never autograd's
    assert memory.update(fetch) == np.unique(rows).size
    want = (table - lr * table.grad).detach()
    assert torch.allclose(memory.table, want, atol=1e-6)
    assert memory.update(fetch) == 0                 # applied once


def test_a_fetch_without_gradients_updates_nothing(layout):
    memory = LocalMemory(layout)
    before = memory.table.clone()
    fetch = memory.fetch(_rows(layout), requires_grad=False)
    assert not fetch.rows(0).requires_grad
    assert memory.update(fetch) == 0 and torch.equal(memory.table, before)


def test_update_steps_only_the_fetch_it_is_given(layout):
    memory = LocalMemory(layout, optimizer=OptimizerConfig(kind="sgd", lr=1.0))
    a, b = memory.fetch(_rows(layout, 0)), memory.fetch(_rows(layout, 1))
    (a.rows(0).sum() + b.rows(0).sum()).backward()
    before = memory.table.clone()
    assert memory.update(a) == np.unique(a.row_ids[0]).size
    changed = torch.nonzero((memory.table != before).any(dim=1)).ravel().numpy()
    assert set(changed) == set(np.unique(a.row_ids[0]))
    with pytest.raises(ValueError, match="LocalMemory.update: pass a fetch of this memory"):
        LocalMemory(layout).update(b)


def test_capped_local_memory_reads_residues_and_refuses_updates(layout):
    full, capped = LocalMemory(layout), LocalMemory(layout, resident_rows=500)
    assert capped.table.shape == (500, layout.row_dim)
    rows = np.array([[[[3, 503, 1003, 7]]], [[[8000, 8, 9, 10]]]])
    fetch = capped.fetch(rows)
    got = fetch.rows(0)
    assert torch.equal(got, full.fetch(rows % 500).rows(0))
    got.sum().backward()
    with pytest.raises(ValueError, match="capped LocalMemory .* lookups only"):
        capped.update(fetch)


def test_the_model_reads_rows_through_the_protocol_only(layout):
    """Any MemoryFetch will do: the model asks rows(i) of each Engram layer, in layer order."""
    ec, mc = C.tiny(), C.model_tiny()
    asked = []

    class Fetch:
        wait_seconds = fetch_seconds = 0.0

        def rows(self, layer_index):
            asked.append(layer_index)
            return torch.zeros(1, 4, ec.memory_dim)

    assert isinstance(Fetch(), MemoryFetch) and not isinstance(Fetch(), LocalFetch)
    logits = EngramLM(mc, ec)(torch.zeros(1, 4, dtype=torch.long), Fetch())
    assert logits.shape == (1, 4, mc.vocab_size) and asked == [0, 1]
