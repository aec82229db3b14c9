"""kvc.passes.mask_windows on other exporters' graphs (tests/data): the window a graph's attention masks apply,
read by evaluating them at sample lengths; graphs whose masks it cannot read give no answer (None)."""
from __future__ import annotations

import gzip
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from kvc.passes.mask_windows import graph_mask_windows

DATA = Path(__file__).resolve().parents[1] / "data"
POSITIONS = 64


def _load(case: str) -> ir.Model:
    return ir.from_proto(onnx.load_from_string(gzip.decompress((DATA / case / "model.onnx.gz").read_bytes())))


@pytest.mark.parametrize("case, window", [
    ("torch_exports/tf446_mistral_window8_torchscript", 8),  # transformers 4.46: the window lives in the mask only
    ("optimum/mistral_window8", 8), ("optimum/mistral_window48", 48),
    ("torch_exports/tf446_llama_torchscript", None), ("optimum/phi3", None), ("torch_exports/gpt2_dynamo", None)])
def test_the_masks_window_is_read(case, window):
    found = graph_mask_windows(_load(case), POSITIONS)
    assert found is not None and found.window == window and found.layer_windows == ()


def test_a_window_wider_than_the_positions_sampled_is_full_attention():
    """Only windows that bind within the model's positions are seen: a mistral masked at 48 with 40 positions."""
    found = graph_mask_windows(_load("optimum/mistral_window48"), 40)
    assert found is not None and found.window is None


@pytest.mark.parametrize("case", ["optimum/llama_merged",  # the masks are inside optimum's If branches
                                  # the causal bias is sliced by lengths read off tensors whose shapes ONNX shape
                                  # inference leaves unknown
                                  "torch_exports/tf446_gpt2_torchscript"])
def test_masks_it_cannot_read_give_no_answer(case):
    assert graph_mask_windows(_load(case), POSITIONS) is None


def test_masks_no_single_window_explains_are_refused():
    """transformers 4.46's Gemma2 fed a DynamicCache: its sliding layers' masks hide keys 8 or more positions
    behind the query in a prefill from position 0, but measure that from the first new token, so later prefills
    see nearly every key (and decode steps all of them). Full attention or width 8 would each change what the graph
    computes for some prompts: refused, naming the layer's Softmax and two samples that disagree."""
    from kvc.errors import GraphError

    with pytest.raises(GraphError, match=r"Softmax '[^']+' \(layer 0\) applies no single sliding window: in a "
                                         r"16-token prefill the query at position 8 sees the last 8 keys, but .*"):
        graph_mask_windows(_load("torch_exports/tf446_gemma2_window8_torchscript"), POSITIONS)
