"""precision.py is the one place that decides dtypes: no other module names a floating dtype, kernels assert the
policy instead of casting around it, and what the policy derives (TRL's flags, the attention kernel's dtype, the
lm_head's dtype in the loss) comes from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import qlorakit
from qlorakit.errors import PrecisionError
from qlorakit.precision import Precision, attention_kernel_dtype

SRC = Path(qlorakit.__file__).parent
# A floating dtype named in code: torch.float16 / bfloat16 / float32 / float64 / half, or a cast by method.
DTYPE_DECISION = re.compile(r"torch\.(float16|bfloat16|float32|float64|half|double)\b|\.(half|bfloat16|float|double)\(\)")


def _code_lines(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        code = line.split("#", 1)[0]
        if code.strip() and not code.lstrip().startswith(('"', "'")):
            yield number, code


def test_no_module_but_precision_names_a_torch_floating_dtype():
    """Kernels are the documented exception: their fp32 accumulations (LoRA gradients, softmax, norms) are the
    arithmetic of the policy's table, not a choice of dtype for anything the user sees."""
    found = [f"{path.relative_to(SRC)}:{number}: {code.strip()}"
             for path in sorted(SRC.rglob("*.py")) if path.name != "precision.py" and "kernels" not in path.parts
             for number, code in _code_lines(path) if DTYPE_DECISION.search(code)]
    assert found == []


def test_kernels_name_no_half_or_double_dtype():
    """Inside kernels/, fp32 appears only as accumulation: .float() on operands of products and sums, and the fp32
    branch of lora_product that skips the one-rounding concatenation (nothing to round)."""
    for path in sorted((SRC / "kernels").glob("*.py")):
        for number, code in _code_lines(path):
            for match in re.finditer(r"torch\.(float16|bfloat16|half|float64|double)\b", code):
                pytest.fail(f"{path.name}:{number}: a half or double dtype named in a kernel: {code.strip()}")


def test_a_frozen_weight_out_of_the_policy_is_refused_not_cast(tiny_model_dir):
    """The fused LoRA kernel used to cast the dense base weight to the compute dtype, which hid a policy violation
    on paths that never call Precision.check (eval, chat). Now it is an error naming the rule."""
    model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="bf16", device="cpu")
    model = qlorakit.add_lora(model, rank=4)
    ids = torch.tensor([[1, 5, 9, 4]])
    with torch.no_grad():
        model(input_ids=ids)  # in the policy: fine
        base = model.base_model.model.model.layers[0].self_attn.o_proj.base_layer
        base.weight.data = base.weight.data.float()  # something changed the model after qlorakit set it up
        with pytest.raises(PrecisionError, match=r"^base_model\.model\.model\.layers\.0\.self_attn\.o_proj\.base_layer: "
                                                 r"the frozen weight is fp32 but the compute dtype is bf16 .*"
                                                 r"precision_of\(model\)\.apply\(model\)"):
            model(input_ids=ids)
    qlorakit.precision_of(model).apply(model)
    with torch.no_grad():
        model(input_ids=ids)


def test_the_loss_head_runs_in_the_policy_dtype(tiny_model_dir, tiny_batch):
    """The chunked loss multiplies by lm_head in the head's (policy) dtype whatever the hidden states carry, and a
    head that left the policy is refused."""
    from qlorakit.loss import batch_loss

    model, _ = qlorakit.load(tiny_model_dir, quant="nf4", dtype="bf16", device="cpu")
    model = qlorakit.add_lora(model, rank=4)
    inputs = {"input_ids": tiny_batch, "use_cache": False}
    with torch.no_grad():
        loss, n = batch_loss(model, inputs, tiny_batch)
        logits = model(**inputs).logits
        reference, _ = qlorakit.causal_lm_loss(logits, tiny_batch)
    assert loss.dtype == torch.float32 and n > 0
    assert abs(float(loss) - float(reference)) / float(reference) < 1e-3  # bf16 logits vs chunked bf16 product
    head = model.base_model.model.lm_head
    head.weight.data = head.weight.data.float()
    with pytest.raises(PrecisionError, match=r"lm_head.weight is fp32 but the compute dtype is bf16"):
        batch_loss(model, inputs, tiny_batch)


@pytest.mark.parametrize("dtype, flags", [("fp32", {"fp16": False, "bf16": False}),
                                          ("bf16", {"fp16": False, "bf16": True}),
                                          ("fp16", {"fp16": True, "bf16": False})])
def test_trainer_flags_come_from_the_policy(dtype, flags):
    assert Precision.resolve(dtype, device="cpu").trainer_flags() == flags


def test_the_attention_kernel_dtype_follows_the_cpu_probe(monkeypatch):
    from qlorakit import precision

    for has_amx, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "_cpu_has_amx_tiles", lambda: has_amx)
        assert attention_kernel_dtype(torch.bfloat16) == expected
        assert attention_kernel_dtype(torch.float32) == torch.float32
