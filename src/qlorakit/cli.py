"""The `qlorakit` command: a thin layer over the Python API.

    qlorakit train [CONFIG.yaml] [--data FILE] [--model SRC] ...   fine-tune (no data: the built-in demo task)
    qlorakit dpo [CONFIG.yaml] [--data PAIRS] [--loss sigmoid] ...  tune on preference pairs (DPO, IPO, ORPO...)
    qlorakit chat --adapter DIR [--prompt TEXT]                     talk to base model + adapter
    qlorakit eval --adapter DIR --data FILE [--output F.jsonl]      loss, perplexity, exact match, wrong answers
    qlorakit precision [--dtype D]                                  what the precision policy resolves to here
    qlorakit merge --adapter DIR --output DIR2 [--dtype bf16]       base + adapter -> transformers model directory
    qlorakit export gguf --adapter DIR --output F.gguf [--type f16] a GGUF file for llama.cpp / Ollama
    qlorakit quantize --model SRC --output DIR [--quant nf4]        the quantized base, reloadable as is
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
from pathlib import Path

# Only torch-free modules at the top: the parser is built from these, and `qlorakit --help` must answer at once.
# Each command imports what it runs (torch, transformers, PEFT...) in its function.
from .choices import (
    BASES, COMPUTE_CHOICES, DEFAULT_MODEL, DEFAULT_SAVED_DTYPE, DTYPE_NAMES, GGUF_TYPES, QUANT_KINDS,
    REFERENCE_FREE_LOSSES,
)
from .config import (
    CONFIG_CLASSES, PARSE_SPECIAL_HELP, GRPOConfig, PreferenceConfig, TrainConfig, choices_of, parse_field_map,
    read_yaml, value_kinds,
)
from .errors import ConfigError, QLoraKitError

BASE_HELP = ("what the adapter's delta is added to: quantized (default), the base it was trained against, quantized "
             "and dequantized as training did (qlorakit.json says how), so the merged model answers as the evaluated "
             "one; or original, the unquantized source weights (adapters trained outside qlorakit need it)")


# A training command -> (the module and function that run it, the demo.py function of its built-in demo, the
# demo's held-out score that must rise for the command to succeed).
_RUNS = {"train": ("train", "train", "run_demo", "accuracy"),
         "dpo": ("preference", "train_preference", "run_preference_demo", "accuracy"),
         "grpo": ("grpo", "train_grpo", "run_grpo_demo", "reward")}


def _train(args) -> int:
    """`qlorakit train`, `qlorakit dpo` and `qlorakit grpo`: one run (on this process or, with --nproc-per-node, on
    torchrun's), or without data the command's built-in demo."""
    import importlib

    from .launcher import launch, launched, launched_rank

    config_class = next(c for c in CONFIG_CLASSES.values() if c.COMMAND == args.command)
    module, function, demo_function, score = _RUNS[args.command]
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_class)}
    config = config_class.build(args.config, **flags)  # checked here, before torchrun starts processes
    if args.nproc_per_node is not None:
        if launched():
            raise ConfigError("--nproc-per-node starts torchrun, and this process is one that a launcher (torchrun, "
                              "accelerate launch) started already: leave --nproc-per-node to the launcher")
        if config.data is None:
            raise ConfigError("--nproc-per-node trains on several processes, and the built-in demo (no --data) runs "
                              "on one: give --data, or leave --nproc-per-node out")
        if args.nproc_per_node >= 1:
            from .distributed import check_launch

            check_launch(config, args.nproc_per_node)
        return launch(_without_nproc(args.argv, args.command), args.nproc_per_node, args.command)
    if config.data is None:
        if launched():
            raise ConfigError("the built-in demo (no --data) runs on one process; under torchrun give --data")
        settings = (read_yaml(args.config) if args.config else {}) | {k: v for k, v in flags.items() if v is not None}
        run_demo = getattr(importlib.import_module(".demo", __package__), demo_function)
        demo = run_demo(progress=not args.quiet, overwrite=args.overwrite, **settings)
        return 0 if demo["after"][score] > demo["before"][score] else 1
    run = getattr(importlib.import_module(f".{module}", __package__), function)
    result = run(config, overwrite=args.overwrite, progress=not args.quiet)
    if launched_rank() == 0:
        preference = config_class is PreferenceConfig
        extra = ", reference_logps.safetensors" if preference and config.loss not in REFERENCE_FREE_LOSSES else ""
        print(f"adapter (PEFT format) written to {result.output.resolve()}: adapter_config.json, "
              f"adapter_model.safetensors; metrics.jsonl, loss.png, config.json{extra} beside it")
    return 0


def _without_nproc(argv: list[str], command: str = "train") -> list[str]:
    """The train (or dpo) command's arguments for each process torchrun starts: those given, less
    --nproc-per-node."""
    rest = list(argv[argv.index(command) + 1:])
    out, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def _load_with_adapter(args):
    from .adapters import adapter_base, load_adapter, read_adapter_info
    from .load import load

    info = read_adapter_info(args.adapter) if args.adapter else None
    saved = info["qlorakit"] if info else {}
    source = args.model or (adapter_base(info, args.adapter) if info else DEFAULT_MODEL)
    model, tokenizer = load(source, quant=args.quant or saved.get("quant", "nf4"),
                            double_quant=saved.get("double_quant", True), dtype=args.dtype or "auto",
                            device=args.device)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    return model, tokenizer


def _sampling_settings(args) -> dict:
    """generate()'s sampling keywords from the chat flags: --temperature above 0 samples, 0 (the default) is greedy,
    and the other knobs need sampling. Checked (Sampling) before the model loads."""
    from .generation import Sampling

    if args.temperature is not None and not args.temperature >= 0:  # nan fails this too
        raise ConfigError(f"--temperature {args.temperature}: use 0 (greedy) or a positive temperature (typical: 0.6 "
                          "to 1.0)")
    sampling = bool(args.temperature)
    knobs = {"--top-k": args.top_k, "--top-p": args.top_p, "--min-p": args.min_p}
    given = [flag for flag, value in knobs.items() if value is not None]
    if given and not sampling:
        raise ConfigError(f"{', '.join(given)} shape(s) sampling, and answers are greedy without --temperature "
                          "above 0; add --temperature (e.g. 0.7)")
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling, stop=tuple(args.stop or ()),
                    repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty,
                    seed=args.seed)
    if sampling:
        settings |= dict(temperature=args.temperature, top_k=args.top_k or 0,
                         top_p=1.0 if args.top_p is None else args.top_p,
                         min_p=0.0 if args.min_p is None else args.min_p)
    Sampling(**settings)  # every value checked now, not after the model loads
    return settings


def _chat(args) -> int:
    from .generation import Generator, generate

    settings = _sampling_settings(args)
    model, tokenizer = _load_with_adapter(args)
    generator = Generator(model, tokenizer, batch_size=1)  # the dense decoder is built once for the session
    history = [{"role": "system", "content": args.system}] if args.system else []
    special = args.parse_special_tokens

    def answer(turns: list[dict], name: str, turn: int) -> str:
        def show(_index, piece):
            print(piece, end="", flush=True)

        seed = None if settings["seed"] is None else settings["seed"] + turn
        text = generate(model, tokenizer, [turns], parse_special_tokens=special, names=[name], generator=generator,
                        on_text=None if args.no_stream else show, **(settings | {"seed": seed}))[0]
        print("" if not args.no_stream else text, flush=True)
        return text

    if args.prompt is not None:
        answer(history + [{"role": "user", "content": args.prompt}], "--prompt", 0)
        return 0
    print("chat with the model; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    turns = list(history)
    turn = 0
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            turns = list(history)
            continue
        if not text.strip():
            continue
        asked = turns + [{"role": "user", "content": text}]
        try:
            from .generation import check_context, encode_prompts

            # A conversation grown past the context: say so (before printing "model> ") and keep the session.
            check_context(model, [len(encode_prompts(tokenizer, [asked], special, ["chat"])[0])],
                          args.max_new_tokens, ["chat"])
        except QLoraKitError as e:
            print(f"qlorakit: {e}", file=sys.stderr)
            continue
        print("model> ", end="", flush=True)
        reply = answer(asked, "chat", turn)
        turn += 1
        turns = asked + [{"role": "assistant", "content": reply}]


def _eval(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: evaluate the first N examples with N of 1 or more, or leave "
                          "--limit out for all of them")
    if args.show < 0:
        raise ConfigError(f"--show {args.show}: the number of wrong answers to print must be 0 (none) or more")
    if args.output is not None and args.no_exact_match:
        raise ConfigError("--output writes each example's exact-match answer, and --no-exact-match asks for none; "
                          "leave out one of them")
    if args.output is not None and Path(args.output).suffix.lower() != ".jsonl":
        raise ConfigError(f"--output {args.output}: name the output file *.jsonl (one JSON line per example)")
    if args.reward_weights is not None and not args.reward:
        raise ConfigError(f"--reward-weights {args.reward_weights} weighs the rewards --reward names, and none is "
                          "given; add --reward SPEC (one per weight), or leave out --reward-weights")
    fields = parse_field_map(args.field)
    # What the command runs (torch, transformers), imported once its flags are known to be good.
    import contextlib
    import json

    from .data import TokenizeReport, check_trainable, read_examples, tokenize_examples
    from .data import pad_id_of
    from .evaluate import ANSWER_FIELDS, eval_loss, exact_match, prompt_and_reference
    from .outputs import staged_output

    with contextlib.ExitStack() as stack:
        # Everything that can be refused is refused before the model loads (minutes): the output first (a foreign
        # or earlier file, a directory that cannot be written), held under its lock until the answers are written
        # in one piece; then the data (a missing, empty or broken file).
        answers_file = stack.enter_context(staged_output(args.output, "eval", args.overwrite)) if args.output else None
        report = TokenizeReport()
        examples, fmt = read_examples(args.data, args.format, args.skip_bad_rows, report, fields=fields,
                                      config=args.data_config, split=args.split)
        matched = examples[: args.limit] if args.limit else examples
        if fmt == "prompt":  # (--limit: the first N prompts)
            result, written, fields_written = _eval_prompts(args, matched, report, answers_file)
        else:
            if args.reward:
                raise ConfigError(
                    f"--reward {args.reward[0]}: --reward scores the model's answers to prompt data (rows of a "
                    f"'prompt' and the fields the rewards read: format prompt), and {args.data} holds {fmt} data, "
                    "which eval scores against the answers it holds; leave out --reward, or evaluate on prompt data")
            if fmt == "preference":  # (--limit: the first N pairs; no answers to match)
                return _eval_pairs(args, matched, report, answers_file)
            if fmt == "text" and answers_file is not None:
                raise ConfigError(f"--output {args.output}: {args.data} is plain text (format text), which has no "
                                  "reference answers to match; leave out --output")
            if fmt != "text" and not args.no_exact_match:
                for example in matched:
                    prompt_and_reference(example)  # every example has a prompt to answer
            model, tokenizer = _load_with_adapter(args)
            items, report = tokenize_examples(tokenizer, examples, args.max_length, "assistant", "truncate", report,
                                              args.parse_special_tokens)
            check_trainable(items, report, args.data, "assistant")
            result = {"data": args.data, "examples": len(items)}
            result.update(eval_loss(model, items, pad_id_of(tokenizer), args.batch_size))
            print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  ({result['tokens']} tokens, "
                  f"{len(items)} examples)")
            if fmt != "text" and not args.no_exact_match:
                match = exact_match(model, tokenizer, matched, max_new_tokens=args.max_new_tokens,
                                    parse_special_tokens=args.parse_special_tokens)
                result["exact_match"] = match["accuracy"]
                print(f"exact match {match['accuracy']:.1%} ({match['correct']}/{match['total']})")
                for line in _wrong_answers(match["samples"], args.show, shutil.get_terminal_size((100, 24)).columns,
                                           suggest_output=answers_file is None):
                    print(line)
                if answers_file is not None:
                    with open(answers_file, "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in match["samples"])
                written, fields_written = match["total"], ANSWER_FIELDS
    if args.output is not None:  # (once the file is in place)
        print(f"{written} answers written to {args.output} (a JSON line each: {', '.join(fields_written)})")
    if args.json:
        print(json.dumps(result))
    return 0


# What `qlorakit eval --reward ... --output FILE.jsonl` writes for each prompt: where it is (file and line), what the
# model was asked (the prompt as the row gives it), the row's other fields (what the rewards read), the model's
# greedy answer, its total (weighted) reward and each reward's value by spec.


def _eval_prompts(args, prompts, report, answers_file) -> tuple[dict, int, tuple[str, ...]]:
    """`qlorakit eval` on prompt data (format prompt, GRPO's): the mean reward of the model's greedy answers, overall
    and per --reward (evaluate.mean_reward, as a GRPO run's held-out prompts are scored), the lowest-reward answers
    (--show) and, with --output, every answer. A prompt too long for --max-length with --max-new-tokens is dropped
    and counted, as GRPO's data drops it. Returns the results, the answers written and their fields."""
    import json

    from .data.prompts import check_lengths, limit_words, prompt_tokenizer
    from .errors import DataError
    from .evaluate import REWARD_ANSWER_FIELDS, mean_reward
    from .generation import Generator, context_length
    from .rewards import check_rows, parse_rewards

    # Refused before the model loads: no way to score the answers, the rewards (their specs and weights; a user
    # function is imported here), a row without a field a reward reads, lengths that leave no room for a prompt.
    if not args.reward:
        raise ConfigError(f"{args.data} holds prompts (format prompt), with no reference answers to match: name how "
                          "to score the model's answers with --reward SPEC (e.g. --reward exact:answer, --reward "
                          "numeric:answer, or your own --reward my_rewards:score), repeatable")
    if args.no_exact_match:
        raise ConfigError(f"--no-exact-match: {args.data} holds prompts (format prompt), which have no answers to "
                          "take a loss over; their generated answers are scored by --reward: leave out "
                          "--no-exact-match")
    rewards = parse_rewards(args.reward, args.reward_weights)
    check_rows(rewards, [p.row for p in prompts], [p.where for p in prompts])
    check_lengths(args.max_length, args.max_new_tokens, "drop")
    model, tokenizer = _load_with_adapter(args)
    context = context_length(model)  # (past it generation is refused: such prompts are dropped too)
    fit = prompt_tokenizer(tokenizer, args.max_length, args.max_new_tokens, "drop", report, args.parse_special_tokens,
                           context)
    items = [item for item in map(fit, prompts) if item is not None]
    limit, why, fix = limit_words(args.max_length, args.max_new_tokens, context)
    dropped = f"longer than the {limit} tokens {why}"
    if not items:
        raise DataError(f"{args.data}: nothing to evaluate — all {report.dropped_long} prompts are {dropped}; {fix}")
    scored = mean_reward(Generator(model, tokenizer), items, rewards, args.max_new_tokens)
    result = {"data": args.data, "prompts": scored["prompts"], "dropped_long": report.dropped_long,
              "reward": scored["reward"], "rewards": scored["rewards"]}
    print(f"mean reward {scored['reward']:.4f} over {scored['prompts']} prompts (greedy answers of at most "
          f"{args.max_new_tokens} tokens)")
    width = max(len(r.spec) for r in rewards)
    for r in rewards:
        print(f"  {r.spec:<{width}}  {scored['rewards'][r.spec]: .4f}  (weight {r.weight:g})")
    if report.dropped_long:
        print(f"  ({report.dropped_long} dropped: {dropped})")
    answers = [{"where": item.where, "prompt": item.prompt, "row": item.row, "answer": sample["answer"],
                "reward": sample["reward"], "rewards": {r.spec: sample[r.spec] for r in rewards}}
               for item, sample in zip(items, scored["samples"])]
    for line in _lowest_rewards(answers, args.show, shutil.get_terminal_size((100, 24)).columns,
                                suggest_output=answers_file is None):
        print(line)
    if answers_file is not None:
        with open(answers_file, "w", encoding="utf-8") as f:
            # (default=str: a row's value JSON has no type for, a parquet date, is written as its text)
            f.writelines(json.dumps(answer, ensure_ascii=False, default=str) + "\n" for answer in answers)
    return result, len(answers), REWARD_ANSWER_FIELDS


def _eval_pairs(args, pairs, report, answers_file) -> int:
    """`qlorakit eval` on preference pairs: loss and perplexity of the chosen answers, and how often the model
    prefers the chosen answer to the rejected one (its log-probability)."""
    from .data import pad_id_of
    from .data.preference import check_pairs, tokenize_pairs
    from .evaluate import eval_loss, preference_accuracy

    if answers_file is not None:
        raise ConfigError(f"--output {args.output}: {args.data} holds preference pairs, which have no answers to "
                          "generate and match; leave out --output")
    model, tokenizer = _load_with_adapter(args)
    items, report = tokenize_pairs(tokenizer, pairs, args.max_length, "truncate", report, args.parse_special_tokens)
    check_pairs(items, report, args.data)
    pad_id = pad_id_of(tokenizer)
    chosen = eval_loss(model, [pair.chosen for pair in items], pad_id, args.batch_size)
    print(f"chosen answers: loss {chosen['loss']:.4f}  perplexity {chosen['perplexity']:.3f}  ({chosen['tokens']} "
          "tokens)")
    preferred = preference_accuracy(model, items, pad_id, args.batch_size)
    print(f"preference accuracy {preferred['accuracy']:.1%} ({preferred['correct']}/{preferred['total']} pairs "
          f"whose chosen answer has the higher log-probability; mean margin {preferred['logp_margin']:.3f})")
    if args.json:
        import json

        print(json.dumps({"data": args.data, "pairs": len(items), "chosen_loss": chosen["loss"],
                          "chosen_perplexity": chosen["perplexity"], "preference_accuracy": preferred["accuracy"],
                          "logp_margin": preferred["logp_margin"]}))
    return 0


def _asked(prompt: list[dict] | str) -> str:
    """What a prompt asks, in one text: the last user message of a conversation, or the plain prompt."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def _cell(text: str, width: int) -> str:
    """`text` on one terminal line of at most `width` characters: control characters escaped (a newline shows as
    \\n; model output must not move the cursor or recolour the terminal), and a longer text's middle cut out (its
    start and end are what tell answers apart)."""
    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)
    if len(text) <= width:
        return text
    kept = max(width - 3, 2)
    return text[: kept - kept // 2] + "..." + text[len(text) - kept // 2:]


def _wrong_answers(samples: list[dict], show: int, width: int, suggest_output: bool = True) -> list[str]:
    """A table of the first `show` wrong answers of exact_match's `samples` (where, the prompt's last user message,
    expected, got), fitted to `width` columns: the widest column gives way first. Then how many more were wrong."""
    wrong = [s for s in samples if not s["correct"]]
    if not wrong or show == 0:
        return []
    rows = [(s["where"], _asked(s["prompt"]), s["expected"], s["got"]) for s in wrong[:show]]
    lines = [f"wrong answers ({len(rows)} of {len(wrong)}):"]
    lines += _fitted(("where", "prompt", "expected", "got"), rows, width)
    if len(wrong) > len(rows):
        where = " (--output FILE.jsonl writes every answer)" if suggest_output else ""
        lines.append(f"  ... and {len(wrong) - len(rows)} more wrong; --show {len(wrong)} prints them all{where}")
    return lines


def _lowest_rewards(answers: list[dict], show: int, width: int, suggest_output: bool = True) -> list[str]:
    """A table of the `show` answers with the lowest total reward (where, the prompt's last user message, the
    answer, its reward), lowest first (ties in the data's order), fitted to `width` columns as _wrong_answers's."""
    if not answers or show == 0:
        return []
    lowest = sorted(answers, key=lambda a: a["reward"])[:show]
    rows = [(a["where"], _asked(a["prompt"]), a["answer"], f"{a['reward']:.4g}") for a in lowest]
    lines = [f"lowest rewards ({len(rows)} of {len(answers)}):"]
    lines += _fitted(("where", "prompt", "answer", "reward"), rows, width)
    if len(answers) > len(rows):
        where = " (--output FILE.jsonl writes every answer)" if suggest_output else ""
        lines.append(f"  ... and {len(answers) - len(rows)} more; --show {len(answers)} prints them all{where}")
    return lines


def _fitted(header: tuple[str, ...], rows: list[tuple[str, ...]], width: int) -> list[str]:
    """`header` and `rows` as indented columns of at most `width` characters a line: the widest column gives way
    first, down to 8 characters."""
    widths = [max(len(_cell(row[i], 1 << 30)) for row in (header, *rows)) for i in range(len(header))]
    room = width - 2 - 2 * (len(header) - 1)  # an indent, two spaces between columns
    while sum(widths) > room and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1
    return ["  " + "  ".join(f"{_cell(text, w):<{w}}" for text, w in zip(row, widths)).rstrip()
            for row in (header, *rows)]


def _precision(args) -> int:
    from .precision import Precision, cpu_has_native_bf16

    p = Precision.resolve(args.dtype, device=args.device)
    print(p.describe())
    if p.device_type == "cpu":
        print(f"cpu native bf16 units: {'yes' if cpu_has_native_bf16() else 'no'}")
    return 0


def _merge(args) -> int:
    from .export import merge

    merge(args.adapter, args.output, dtype=args.dtype, model=args.model, max_shard_size=args.max_shard_size,
          overwrite=args.overwrite, base=args.base)
    print(f"merged model written to {args.output} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _export_gguf(args) -> int:
    from .export import export_gguf

    export_gguf(args.output, adapter=args.adapter, model=args.model, gguf_type=args.type, overwrite=args.overwrite,
                base=args.base)
    return 0


def _quantize(args) -> int:
    from .export import quantize

    quantize(args.model, args.output, quant=args.quant, double_quant=args.double_quant, device=args.device,
             overwrite=args.overwrite)
    return 0


def _default_text(f: dataclasses.Field) -> str:
    """How the help shows a field's default: ' (default 1024)', ' (default on)', ' (default 0: at the end)'."""
    note = f.metadata["default_note"]
    if f.default is None:
        return f" (default {note})" if note else ""
    if isinstance(f.default, bool):
        shown = "on" if f.default else "off"
    else:
        shown = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
    return f" (default {shown}: {note})" if note else f" (default {shown})"


class _NotApplicable(argparse.Action):
    """A flag of `qlorakit train` that another training command does not have: refused, saying why."""

    def __init__(self, *args, reason: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.reason}")


def add_train_flags(p: argparse.ArgumentParser, config_class: type = TrainConfig) -> None:
    """One flag per field of `config_class` (TrainConfig, or PreferenceConfig less its NOT_APPLICABLE fields), from
    its declaration: --max-length for max_length, typed by its annotation, with its choices and help, under its
    heading; --packing / --no-packing for a bool. Every default is None: a flag that is not given leaves the YAML's
    value (or the config's default) alone."""
    groups, group = {}, p
    skipped = getattr(config_class, "NOT_APPLICABLE", {})
    for f in dataclasses.fields(config_class):
        if f.name in skipped:  # not in the help; given anyway, it is refused with the reason
            flag = "--" + f.name.replace("_", "-")
            flags = [flag, "--no-" + f.name.replace("_", "-")] if "bool" in value_kinds(f) else [flag]
            p.add_argument(*flags, nargs="?", action=_NotApplicable, help=argparse.SUPPRESS,
                           reason=f"does not apply to {config_class.KIND}: {skipped[f.name]}; leave it out")
            continue
        if f.metadata["heading"]:
            heading = f.metadata["heading"]
            if heading not in groups:  # (a subclass's field that redeclares a default keeps its heading)
                groups[heading] = p.add_argument_group(heading)
            group = groups[heading]
        flag = "--" + f.name.replace("_", "-")
        text = (f.metadata["help"] + _default_text(f)).replace("%", "%%")  # argparse formats help with %
        kinds = value_kinds(f)
        if "bool" in kinds:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif f.metadata["repeatable"]:
            group.add_argument(flag, action="append", metavar=f.name.upper(), help=text)
        else:
            kind = int if "int" in kinds else float if "float" in kinds else str
            group.add_argument(flag, type=kind, choices=f.metadata["choices"], help=text)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter directory (a qlorakit run's --output, or any PEFT LoRA adapter)")
    p.add_argument("--model", help="base model: a directory, .gguf file or Hub id org/name[@revision] (default: "
                   "the one the adapter was trained on, at the commit it recorded)")
    p.add_argument("--quant", choices=QUANT_KINDS, help="base quantization (default: as trained)")
    p.add_argument("--dtype", choices=COMPUTE_CHOICES, help="compute dtype (default auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default 128)")


def _add_run_command(sub, config_class: type, help: str, description: str) -> None:
    """A training command (train, dpo, grpo): a YAML config, a flag per field of `config_class`, and the flags of
    every run."""
    # (no abbreviated flags: --nproc-per-node hands the arguments on to each rank as written)
    p = sub.add_parser(config_class.COMMAND, allow_abbrev=False, help=help, description=description)
    p.add_argument("config", nargs="?", help="YAML config file")
    add_train_flags(p, config_class)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier qlorakit run in --output (never files qlorakit did not write)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train on N processes of this machine (one per GPU; on a CPU, gloo): starts torchrun. "
                   "For several nodes run torchrun yourself (README: Several GPUs or nodes)")
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlorakit", description="QLoRA fine-tuning of causal language models, correct in every precision.")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_command(
        sub, TrainConfig, help="fine-tune with QLoRA (no data: the default model on the built-in demo task)",
        description="Fine-tune a model with LoRA adapters over frozen quantized weights. Settings come from "
        "TrainConfig's defaults, then CONFIG.yaml (keys as the flags, with underscores), then the flags. Writes "
        "the adapter in PEFT format, config.json, metrics.jsonl and loss.png to --output. Without --data (and no "
        "data: in CONFIG) it runs the built-in demo: the default model learns a synthetic extraction task and "
        "held-out exact match is printed before and after.")
    _add_run_command(
        sub, PreferenceConfig, help="tune on preference pairs: DPO, IPO, hinge, ORPO, SimPO (no data: the "
        "built-in preference demo)",
        description="Tune a model on preference pairs (prompt, chosen, rejected) with LoRA adapters over frozen "
        "quantized weights: DPO's sigmoid loss, IPO, hinge, ORPO or SimPO (--loss). The reference is the model as "
        "the run starts (fresh adapters: the base; --adapter DIR: that adapter, e.g. an SFT run), computed once per "
        "pair. Settings and outputs as for `qlorakit train` (its flags, less --train-on and --streaming), plus the "
        "loss's. Without --data it runs the built-in preference demo on the default model.")
    _add_run_command(
        sub, GRPOConfig, help="reinforcement learning with verifiable rewards on prompts (no data: the "
        "built-in GRPO demo)",
        description="Tune a model with GRPO: for each prompt, --group-size completions are sampled from the model "
        "itself (quantized base + adapters, qlorakit's decoder), scored by the rewards (--reward: exact:FIELD, "
        "regex:PATTERN, numeric:FIELD, overlong:N, truncated, or your MODULE:FUNCTION), and the adapters are trained "
        "to make the better-than-the-group's-average completions likelier. Data: prompts, {\"prompt\": text or "
        "messages, plus the fields the rewards read}. Settings and outputs as for `qlorakit train` (its flags, less "
        "--train-on, --streaming and --fsdp), plus the rewards, sampling and loss. Without --data it runs the "
        "built-in GRPO demo on the default model.")

    chat = sub.add_parser("chat", help="chat with a base model and adapter (interactive, or one --prompt)",
                          description="Chat with a base model plus adapter, in the base's chat template: greedy, "
                          "or sampled with --temperature above 0 (the knobs are transformers' generate's); the "
                          "answer is printed as it is generated.")
    _add_model_flags(chat)
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.add_argument("--parse-special-tokens", action="store_true", help=PARSE_SPECIAL_HELP)
    sampling = chat.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float,
                          help="sample at this temperature (e.g. 0.7); 0, the default, answers greedily")
    sampling.add_argument("--top-k", type=int, help="sample from the k likeliest tokens only (default: all)")
    sampling.add_argument("--top-p", type=float, help="sample from the likeliest tokens whose probabilities sum to p "
                                                       "(nucleus sampling; default 1: all)")
    sampling.add_argument("--min-p", type=float, help="drop tokens less likely than min-p times the likeliest one "
                                                       "(default 0: none)")
    sampling.add_argument("--repetition-penalty", type=float,
                          help="divide the logits of tokens already in the conversation by this (default 1: off; "
                               "typical 1.1); greedy answers take it too")
    sampling.add_argument("--stop", action="append", metavar="TEXT",
                          help="end the answer where TEXT appears, leaving TEXT out (repeatable)")
    sampling.add_argument("--seed", type=int, help="seed of the sampling (default: a different draw each run)")
    chat.add_argument("--no-stream", action="store_true", help="print each answer when it is complete")
    chat.set_defaults(func=_chat)

    ev = sub.add_parser("eval", help="loss, perplexity and exact-match accuracy of base model + adapter on data "
                        "(on prompts: the mean --reward)",
                        description="Loss and perplexity over the trained tokens of DATA (answers only), and "
                        "exact-match accuracy of greedy answers against the reference answers (the last assistant "
                        "turn, output or completion), with the first wrong answers (--show) and, with --output, "
                        "every answer in a JSON lines file. On preference pairs (prompt, chosen, rejected): the chosen "
                        "answers' loss and perplexity, and how often the model gives the chosen answer the higher "
                        "log-probability (--limit: the first N pairs). On prompts (GRPO's data: a prompt and the "
                        "fields the rewards read): the mean reward of the greedy answers, overall and per --reward, "
                        "with the lowest-reward answers (--show) and, with --output, every answer and its rewards.")
    _add_model_flags(ev)
    ev.add_argument("--data", required=True, help="evaluation data: a file, dataset directory or Hub dataset id "
                    "(org/name[@revision]), in the formats train reads")
    ev.add_argument("--data-config", help="the dataset's configuration (subset) name")
    ev.add_argument("--split", default="train", help="the dataset split evaluated (default train)")
    ev.add_argument("--field", action="append", metavar="TARGET=COLUMN",
                    help="read the format's field TARGET from the data's column COLUMN; repeat for several")
    ev.add_argument("--format", default="auto", choices=choices_of("format"),
                    help="data format (default auto: detected from the fields)")
    ev.add_argument("--max-length", type=int, default=1024, help="tokens per example (default 1024)")
    ev.add_argument("--batch-size", type=int, default=8, help="examples per forward pass for the loss (default 8)")
    ev.add_argument("--limit", type=int, help="exact match on the first N examples only (pairs: score the first N; "
                    "prompts: answer the first N)")
    ev.add_argument("--no-exact-match", action="store_true", help="loss and perplexity only")
    ev.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    ev.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ev.add_argument("--parse-special-tokens", action="store_true", help=PARSE_SPECIAL_HELP)
    ev.add_argument("--show", type=int, default=5, metavar="N",
                    help="print up to N wrong answers after the exact-match score: where, the prompt's last user "
                    "message, expected and got, shortened to the terminal's width (prompts: the N answers of lowest "
                    "reward; default 5; 0: none)")
    ev.add_argument("--output", metavar="FILE.jsonl",
                    help="write every exact-matched example as one JSON line: where (file and line), prompt, "
                    "expected, got, correct (prompts: where, prompt, row, answer, reward, rewards)")
    rewarded = ev.add_argument_group("prompt data (format prompt)")
    rewarded.add_argument("--reward", action="append", metavar="SPEC",
                          help="score each greedy answer with this reward, as `qlorakit grpo` does: exact:FIELD, "
                          "regex:PATTERN, numeric:FIELD, overlong:N, truncated, or MODULE:FUNCTION / FILE.py:FUNCTION "
                          "(called with prompts, completions, rows; returns a number per completion); repeat for "
                          "several")
    rewarded.add_argument("--reward-weights", metavar="W1,W2",
                          help="the rewards' weights in the total, comma-separated in --reward order (default 1 each)")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace an earlier --output of qlorakit eval (never a file qlorakit did not write)")
    ev.set_defaults(func=_eval)

    merge = sub.add_parser(
        "merge", help="merge an adapter into its base: a standard transformers model directory",
        description="Add the adapter's LoRA delta (in fp32) to the base model's weights — by default the quantized "
        "base it was trained against, dequantized (--base) — layer by layer, and save safetensors shards, "
        "config.json and the tokenizer with its chat template. AutoModelForCausalLM loads the result without "
        "qlorakit.")
    merge.add_argument("--adapter", required=True, help="adapter directory (a qlorakit run's --output or any PEFT "
                                                        "LoRA adapter)")
    merge.add_argument("--output", required=True, help="directory to write the merged model to")
    merge.add_argument("--dtype", default=DEFAULT_SAVED_DTYPE, choices=DTYPE_NAMES,
                       help=f"saved dtype (default {DEFAULT_SAVED_DTYPE})")
    merge.add_argument("--model", help="base model: a directory, .gguf file or Hub id org/name[@revision] "
                       "(default: the one the adapter was trained on, at the commit it recorded)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    merge.add_argument("--base", default="quantized", choices=BASES, help=BASE_HELP)
    merge.add_argument("--overwrite", action="store_true",
                       help="replace an earlier qlorakit output at --output (never a file qlorakit did not write)")
    merge.set_defaults(func=_merge)

    export = sub.add_parser("export", help="write a model in another format (gguf)",
                            description="Write a trained model in another format: `qlorakit export gguf --help`.")
    formats = export.add_subparsers(dest="format", required=True)
    gguf = formats.add_parser(
        "gguf", help="a GGUF file for llama.cpp and Ollama (Llama, Mistral, Qwen2/3, SmolLM)",
        description="Write a GGUF file with the gguf Python package (no llama.cpp build): the adapter merged into "
        "its base (--adapter) or a model directory such as the output of `qlorakit merge` (--model), with the "
        "tokenizer and chat template.")
    gguf.add_argument("--adapter", help="adapter directory, merged into its base on the way")
    gguf.add_argument("--model", help="a model directory or Hub id (org/name[@revision]) to convert; with "
                      "--adapter, the base to merge into")
    gguf.add_argument("--output", required=True, help="the .gguf file to write")
    gguf.add_argument("--type", default="f16", choices=GGUF_TYPES, help="tensor type (default f16)")
    gguf.add_argument("--base", default="quantized", choices=BASES,
                      help="with --adapter: " + BASE_HELP)
    gguf.add_argument("--overwrite", action="store_true",
                      help="replace an earlier qlorakit output at --output (never a file qlorakit did not write)")
    gguf.set_defaults(func=_export_gguf)

    quantize = sub.add_parser(
        "quantize", help="save the quantized base model (bitsandbytes), reloadable without re-quantizing",
        description="Quantize a model the way training does and save it in bitsandbytes' format with its "
        "tokenizer; `--model DIR` in train, chat, eval and merge then loads it in any compute dtype.")
    quantize.add_argument("--model", default=DEFAULT_MODEL, help="source model: directory, .gguf file or Hub id "
                          f"org/name[@revision] (default {DEFAULT_MODEL})")
    quantize.add_argument("--output", required=True, help="directory to write the quantized model to")
    quantize.add_argument("--quant", default="nf4", choices=[q for q in QUANT_KINDS if q != "none"],
                          help="nf4 (default), fp4 or int8")
    quantize.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                          help="4-bit double quantization (default on)")
    quantize.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    quantize.add_argument("--overwrite", action="store_true",
                          help="replace an earlier qlorakit output at --output (never a file qlorakit did not write)")
    quantize.set_defaults(func=_quantize)

    precision = sub.add_parser(
        "precision", help="show the precision policy --dtype resolves to on this machine",
        description="Print what the precision policy gives for --dtype on --device: the compute dtype, the dtype "
        "4-bit layers dequantize to, the LoRA adapters' dtype, whether a GradScaler and autocast are used, and on "
        "a CPU whether it has native bf16 units (what `auto` measures).")
    precision.add_argument("--dtype", default="auto", choices=COMPUTE_CHOICES,
                           help="compute dtype to resolve (default auto: bf16 or fp32 on a CPU, bf16 or fp16 on CUDA)")
    precision.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    precision.set_defaults(func=_precision)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .launcher import die_with_launcher

    try:
        die_with_launcher()  # first: a rank whose launcher is killed from now on dies with it
    except QLoraKitError as e:
        print(f"qlorakit: error: {e}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except QLoraKitError as e:
        if not getattr(e, "from_main", False):  # an error rank 0 raised and said is not repeated by every rank
            print(f"qlorakit: error{_rank_label()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlorakit: interrupted", file=sys.stderr)
        return 130


def _rank_label() -> str:
    """' (rank N of M)' in a process of a run on several, where every rank may say the same."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world.strip() not in ("", "0", "1") else ""


if __name__ == "__main__":
    sys.exit(main())
