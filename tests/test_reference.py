"""Greedy answers and the training loss of fixed weights, pinned against a stored reference.

The reference (tests/data/greedy_reference.json) was written by the code as it stood before the
forward was restructured (issue 10). Every later change to the model (fused matmuls, a new
forward, a compiled decode step) must still give the same tokens, so this test is the contract.
Weights come from `reference_vlm` in conftest: every tensor drawn from one seeded generator, so
they do not depend on how transformers initialises a CLIP. Regenerate (only on purpose) with
`python tests/test_reference.py`.
"""
import json
import os
import warnings

import pytest
import torch

from conftest import REFERENCE, ROOT, pinned_reference, reference_inputs, reference_prompts, reference_vlm


def compute(tmp_dir, compiled=False):
    model = reference_vlm(tmp_dir)
    if compiled:
        model.compile_decoding(cuda_graph=False)
    out = {}
    with torch.no_grad():
        for name, input_ids, kwargs in reference_prompts():
            out[name] = model.generate(input_ids, max_new_tokens=24, eos_token_id=-1, **kwargs).tolist()
        batch = reference_inputs()["loss"]
        out["loss"] = float(model(batch["input_ids"], labels=batch["labels"],
                                  pixel_values=batch["pixel_values"]).loss)
    return out


def test_greedy_answers_and_loss_match_the_stored_reference(tmp_path):
    expected = pinned_reference()
    got = compute(tmp_path)
    for name in expected:
        if name != "loss":
            assert got[name] == expected[name], name
    assert abs(got["loss"] - expected["loss"]) <= 1e-4 * abs(expected["loss"])


@pytest.mark.slow
def test_compiled_decoding_gives_the_reference_tokens(tmp_path):
    """torch.compile of the decoding step (3-eval_chat.py --compile) on this CPU: the same
    greedy tokens as eager, batched and not; it must compile, not quietly fall back to eager."""
    expected = pinned_reference()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of the decoding step failed")
        got = compute(tmp_path, compiled=True)
    for name in expected:
        if name != "loss":
            assert got[name] == expected[name], name


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    with tempfile.TemporaryDirectory() as tmp:
        result = compute(tmp)
    with open(REFERENCE, "w", encoding="utf-8") as f:
        json.dump(result, f)
    print(json.dumps(result)[:400])
