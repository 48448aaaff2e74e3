"""The quantized base model itself, in bitsandbytes' serialization: reloading it skips quantization (seconds instead
of minutes for a large model, and no 16-bit copy has to fit in memory), and qlorakit.load brings it to any compute
dtype the precision policy allows — whatever dtype it was quantized under."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..outputs import check_output, staged_output


def save_quantized(model, tokenizer, output: str | Path, overwrite: bool = False) -> Path:
    """Save a model from qlorakit.load (quantized, no adapters), its tokenizer and a model card (README.md) to the
    directory `output`."""
    from ..data.tokenize import chat_template
    from ..model_card import quantized_card
    from ..upstream import bitsandbytes as bnb

    if hasattr(model, "peft_config"):
        raise ConfigError("save_quantized saves the base model from qlorakit.load; this one carries LoRA adapters, "
                          "which the training run saves on their own (PEFT format)")
    if not any(bnb.quantized_layers(model)):
        raise ConfigError("this model is not quantized (quant='none'); save it with save_pretrained, or load it "
                          "with quant='nf4', 'fp4' or 'int8' first")
    for name, module, _ in bnb.quantized_layers(model, "4bit"):
        if bnb.repacked_for_cpu(module.weight):
            raise ConfigError(
                f"{name}: bitsandbytes repacked this 4-bit layer for its bf16 CPU inference kernel (block scales "
                "rounded to bf16); saving it would keep that loss. Load the model through qlorakit.load, which "
                "keeps 4-bit layers out of it, and save that one."
            )
    with staged_output(output, "quantize", overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.chat_template = chat_template(tokenizer)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(quantized_card(model, output), encoding="utf-8")
    return Path(output).expanduser()


def quantize(source: str, output: str | Path, quant: str = "nf4", double_quant: bool = True, device: str = "auto",
             overwrite: bool = False, log=print) -> Path:
    """Quantize `source` (from its fp32 weights, for the most faithful scales) and save it with save_quantized."""
    from ..load import load, quantization_summary
    from ..precision import EXPORT_DTYPE

    if quant == "none":
        raise ConfigError("quant='none' leaves nothing to save quantized; use nf4, fp4 or int8")
    check_output(output, "quantize", overwrite)  # before the minutes of loading
    model, tokenizer = load(source, quant=quant, double_quant=double_quant, dtype=EXPORT_DTYPE, device=device)
    path = save_quantized(model, tokenizer, output, overwrite=overwrite)
    size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
    log(f"wrote {path} ({quantization_summary(model)}; {size / 1e6:.1f} MB of weights)")
    return path
