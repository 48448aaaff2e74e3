"""Generation (qlorakit/generation/): qlorakit's decoder gives transformers' greedy tokens on NF4 + LoRA models, in
any batching; it leaves the adapter as it was (a training step after generation is the step without); a kept
decoder follows the adapter through training; a model it does not compute goes to transformers' generate, with a
warning; the sampling knobs are transformers' (same scores), seeded per prompt; stop strings and streaming."""

from __future__ import annotations

import logging
import re

import pytest
import torch

import qlorakit
from conftest import randomize_lora_b, save_tiny_bpe_model, tiny_tokenizer
from qlorakit.errors import ConfigError
from qlorakit.generation import Generator, Sampling, encode_prompts, generate, stop_ids
from qlorakit.generation.reference import generate_with_transformers
from qlorakit.generation.sampling import AnswerText, TokenChooser

WORDS = [f"w{i}" for i in range(4, 256)]


def _prompts(n: int, seed: int = 0) -> list[str]:
    """Plain-text prompts of 1 to 12 words (different lengths: right padding in the decoder's prefill)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (n,), generator=g).tolist()
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)) for k in lengths]


def _adapted(model_dir, dtype="fp32", quant="nf4", seed=1):
    torch.manual_seed(0)  # LoRA A's initialisation: two calls give the same model
    model, tokenizer = qlorakit.load(str(model_dir), quant=quant, dtype=dtype, device="cpu")
    model = randomize_lora_b(qlorakit.add_lora(model, rank=4, alpha=8), std=0.3, seed=seed)
    return model, tokenizer


@pytest.fixture(scope="module")
def nf4_fp32(tiny_model_dir):
    return _adapted(tiny_model_dir)


def _reference(model, tokenizer, prompts, sampling, batch_size=1):
    ids = encode_prompts(tokenizer, prompts)
    return generate_with_transformers(model, tokenizer, ids, sampling, stop_ids(tokenizer), batch_size)


# -- greedy parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_greedy_tokens_equal_transformers_generate_in_any_batching(nf4_fp32, slots, caplog):
    """fp32, NF4 + LoRA: every answer's tokens are transformers' greedy tokens, whether the decoder runs the
    prompts one at a time, 3 slots for 10 prompts (continuous batching: slots refilled as answers end, then
    compacted), or all at once."""
    model, tokenizer = nf4_fp32
    prompts = _prompts(10)
    sampling = Sampling(max_new_tokens=12)
    reference = _reference(model, tokenizer, prompts, sampling)
    generator = Generator(model, tokenizer, batch_size=slots)
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        ours = generator.run(encode_prompts(tokenizer, prompts), sampling)
    assert generator.decoder is not None, generator.describe()
    assert [a.tokens for a in ours] == [r.tokens for r in reference]
    assert [a.text for a in ours] == [r.text for r in reference]
    assert any("qlorakit's decoder" in r.message for r in caplog.records)


def test_min_new_tokens_and_end_tokens_as_transformers(nf4_fp32):
    """An answer ends at an end-of-turn token (kept in its tokens, finish 'end') unless min_new_tokens bans it:
    the same tokens as transformers' generate with the same settings."""
    model, tokenizer = nf4_fp32
    prompts = _prompts(6, seed=3)
    first = Generator(model, tokenizer).run(encode_prompts(tokenizer, prompts), Sampling(max_new_tokens=3))
    eos = tokenizer.eos_token_id
    ours = Generator(model, tokenizer).run(encode_prompts(tokenizer, prompts),
                                           Sampling(max_new_tokens=6, min_new_tokens=4))
    reference = _reference(model, tokenizer, prompts, Sampling(max_new_tokens=6, min_new_tokens=4))
    assert [a.tokens for a in ours] == [r.tokens for r in reference]
    assert all(eos not in a.tokens[:4] for a in ours)
    ended = [a for a in first if a.finish == "end"]
    assert ended and all(a.tokens[-1] == eos and len(a.tokens) < 3 for a in ended)  # the ban mattered
    assert [a.tokens for a in first] == [r.tokens for r in _reference(model, tokenizer, prompts,
                                                                      Sampling(max_new_tokens=3))]


def test_bf16_greedy_agrees_with_transformers(tiny_model_dir):
    """bf16: the decoder computes the fused layer's formulas with other matrix shapes, so a near-tie can round the
    other way, and a random model's flat logits have many near-ties: measured 8/10 answers identical, the other two
    from their fifth and second token on (the default model's agreement: test_integration_generation.py)."""
    model, tokenizer = _adapted(tiny_model_dir, dtype="bf16")
    prompts = _prompts(10, seed=5)
    sampling = Sampling(max_new_tokens=8)
    reference = _reference(model, tokenizer, prompts, sampling)
    ours = Generator(model, tokenizer, batch_size=4).run(encode_prompts(tokenizer, prompts), sampling)
    same = sum(a.tokens == r.tokens for a, r in zip(ours, reference))
    assert same >= 7, f"{same}/10 identical"


def test_qwen2_biases_and_int8_base(tmp_path):
    """q/k/v biases (Qwen2) go in as the product's bias column; an LLM.int8 base dequantizes like a 4-bit one."""
    model_dir = save_tiny_bpe_model(tmp_path / "qwen2", arch="qwen2")
    for quant in ("nf4", "int8"):
        model, tokenizer = _adapted(model_dir, quant=quant)
        prompts = ["the quick brown fox", "merge the low rank", "hello world"]
        sampling = Sampling(max_new_tokens=8)
        ours = Generator(model, tokenizer).run(encode_prompts(tokenizer, prompts), sampling)
        assert [a.tokens for a in ours] == [r.tokens for r in _reference(model, tokenizer, prompts, sampling)]


# -- the adapter is untouched ----------------------------------------------------------------------------------


def _step(model, batch):
    step = qlorakit.TrainStep(model, lr=1e-2)
    result = step(batch, attention_mask=torch.ones_like(batch))
    return result.loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_step_after_generation_equals_one_without(tiny_model_dir, tiny_batch):
    """Generation dequantizes into its own tensors and never writes the model: the next training step has the
    same loss and leaves the same adapter weights, bit for bit, as on a model that never generated."""
    plain, _ = _adapted(tiny_model_dir)
    used, tokenizer = _adapted(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in used.named_parameters()}
    generate(used, tokenizer, _prompts(4), max_new_tokens=6)
    assert used.training  # its mode is restored
    assert all(torch.equal(before[n], p) for n, p in used.named_parameters())
    loss_plain, after_plain = _step(plain, tiny_batch)
    loss_used, after_used = _step(used, tiny_batch)
    assert float(loss_used) == float(loss_plain)
    assert after_used.keys() == after_plain.keys()
    assert all(torch.equal(after_used[n], after_plain[n]) for n in after_plain)


def test_a_kept_decoder_follows_the_adapter_through_training(tiny_model_dir, tiny_batch):
    """A Generator kept across a training step (chat, rollouts) answers as a fresh one would: the adapter's
    in-place update is seen, and only the changed products are rebuilt."""
    model, tokenizer = _adapted(tiny_model_dir)
    ids = encode_prompts(tokenizer, _prompts(5, seed=7))
    sampling = Sampling(max_new_tokens=10)
    kept = Generator(model, tokenizer)
    before = kept.run(ids, sampling)
    _step(model, tiny_batch)
    after = kept.run(ids, sampling)
    fresh = Generator(model, tokenizer).run(ids, sampling)
    assert [a.tokens for a in after] == [a.tokens for a in fresh]
    assert [a.tokens for a in after] != [a.tokens for a in before]  # the step changed the answers


# -- what the decoder declines ---------------------------------------------------------------------------------


def test_a_model_the_decoder_misreads_goes_to_transformers_with_a_warning(nf4_fp32, monkeypatch, caplog):
    """The decoder is checked against the model's own forward when built: wrong rotary tables (a stand-in for an
    architecture that looks Llama-shaped and is not) make it decline, with the measured difference, and the
    answers are transformers' own."""
    from qlorakit.upstream import transformers as upstream_transformers

    model, tokenizer = nf4_fp32
    real = upstream_transformers.rotary_tables
    monkeypatch.setattr(upstream_transformers, "rotary_tables",
                        lambda *a: tuple(t.flip(0) for t in real(*a)))
    prompts = _prompts(4, seed=9)
    sampling = Sampling(max_new_tokens=6)
    generator = Generator(model, tokenizer)
    with caplog.at_level(logging.WARNING, logger="qlorakit"):
        ours = generator.run(encode_prompts(tokenizer, prompts), sampling)
    assert generator.decoder is None
    assert "differ from the model's own forward" in generator.describe()
    assert any("transformers' generate" in r.message and "differ" in r.message for r in caplog.records)
    assert [a.tokens for a in ours] == [r.tokens for r in _reference(model, tokenizer, prompts, sampling, 4)]


def test_unsupported_layers_and_memory_are_named(tiny_model_dir, monkeypatch):
    """A PEFT feature the decoder does not compute (DoRA here) or dense weights that would not fit in free memory:
    transformers' generate, and describe() says which."""
    from peft import LoraConfig, get_peft_model

    import qlorakit.generation as generation

    model, tokenizer = qlorakit.load(str(tiny_model_dir), quant="none", dtype="fp32", device="cpu")
    dora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    generator = Generator(dora, tokenizer)
    generator.run(encode_prompts(tokenizer, ["w5 w6"]), Sampling(max_new_tokens=2))
    assert "DoRA" in generator.describe()

    model, tokenizer = _adapted(tiny_model_dir)
    monkeypatch.setattr(generation, "available_memory", lambda device: 1000)
    generator = Generator(model, tokenizer)
    generator.run(encode_prompts(tokenizer, ["w5 w6"]), Sampling(max_new_tokens=2))
    assert "would not fit" in generator.describe()


# -- sampling --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,message", [
    (dict(temperature=0.7), "temperature set without do_sample=True"),
    (dict(do_sample=True, temperature=0.0), "temperature=0"),
    (dict(do_sample=True, top_p=1.5), "top_p=1.5"),
    (dict(do_sample=True, top_k=-1), "top_k=-1"),
    (dict(do_sample=True, min_p=1.0), "min_p=1"),
    (dict(repetition_penalty=0), "repetition_penalty=0"),
    (dict(max_new_tokens=0), "max_new_tokens=0: generate at least 1 token"),
    (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens=5 is more than max_new_tokens=4"),
    (dict(stop="###"), "stop="),
    (dict(stop=("",)), "non-empty strings"),
    (dict(seed=-1), "seed=-1"),
    (dict(do_sample=True, temperature=float("nan")), "temperature=nan"),
])
def test_bad_sampling_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Sampling(**settings)


def test_scores_are_transformers_logits_processors():
    """Repetition penalty, the end-token ban before min_new_tokens, temperature, top-k, top-p, min-p: the scores
    the chooser samples from are transformers' LogitsProcessorList's in generate's order, to the bit."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    vocab, prompt_len, produced = 50, 5, [1, 3, 0]
    logits = torch.randn(3, vocab, generator=g) * 3
    history = torch.randint(0, vocab, (3, prompt_len + 3), generator=g)
    sampling = Sampling(max_new_tokens=8, min_new_tokens=2, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                        min_p=0.02, repetition_penalty=1.3)
    chooser = TokenChooser(sampling, vocab, [2, 7], "cpu")
    seen = torch.stack([chooser.seen(row[:prompt_len + n].tolist()) for row, n in zip(history, produced)])
    ours = chooser.scores(logits.clone(), seen, produced)
    expected = []
    for row, n, x in zip(history, produced, logits):
        processors = LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(1.3), MinNewTokensLengthLogitsProcessor(prompt_len, 2, [2, 7]),
            TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02)])
        expected.append(processors(row[None, :prompt_len + n], x[None].clone())[0])
    assert torch.equal(ours, torch.stack(expected))


def test_sampling_is_seeded_per_prompt(nf4_fp32):
    """The same seed gives the same answers, whatever the batch size (each prompt draws from its own generator);
    another seed gives other answers; top_k=1 is greedy."""
    model, tokenizer = nf4_fp32
    prompts = _prompts(6, seed=11)
    knobs = dict(max_new_tokens=10, do_sample=True, temperature=1.5)
    one = generate(model, tokenizer, prompts, batch_size=1, seed=3, **knobs)
    many = generate(model, tokenizer, prompts, batch_size=4, seed=3, **knobs)
    assert one == many
    assert generate(model, tokenizer, prompts, batch_size=4, seed=4, **knobs) != one
    greedy = generate(model, tokenizer, prompts, max_new_tokens=10)
    assert generate(model, tokenizer, prompts, seed=5, max_new_tokens=10, do_sample=True, top_k=1) == greedy
    torch.manual_seed(0)
    unseeded = generate(model, tokenizer, prompts, **knobs)
    torch.manual_seed(0)
    assert generate(model, tokenizer, prompts, **knobs) == unseeded  # no seed: torch's global RNG decides


def test_sampled_tokens_follow_the_distribution():
    """With temperature 1 and no other knob, the token frequencies over many draws match softmax(logits)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    chooser = TokenChooser(Sampling(do_sample=True, seed=0), 5, [], "cpu")
    draws = torch.cat([chooser.choose(logits, None, [0], [chooser.generator(i)]) for i in range(4000)])
    frequencies = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(frequencies, torch.softmax(logits[0], -1), atol=0.025)


# -- stop strings and streaming -------------------------------------------------------------------------------


def test_stop_strings_end_the_answer_before_them_and_streaming_gives_the_same_text(nf4_fp32):
    """A stop string ends the answer, which stops before it (finish 'stop'); the streamed pieces of every answer
    join into its text, also with text held back while it might begin a stop string."""
    model, tokenizer = nf4_fp32
    prompts = _prompts(6, seed=13)
    full = Generator(model, tokenizer).run(encode_prompts(tokenizer, prompts), Sampling(max_new_tokens=12))
    # A stop string that occurs inside the third answer: its fourth word.
    word = full[2].text.split()[3]
    streamed: dict[int, str] = {}
    answers = Generator(model, tokenizer, batch_size=2).run(
        encode_prompts(tokenizer, prompts), Sampling(max_new_tokens=12, stop=(" " + word,)),
        on_text=lambda i, piece: streamed.__setitem__(i, streamed.get(i, "") + piece))
    assert answers[2].finish == "stop"
    assert answers[2].text == full[2].text[:full[2].text.index(" " + word)]
    for answer, original in zip(answers, full):
        assert (" " + word) not in answer.text
        assert original.text.startswith(answer.text)
    assert [streamed.get(i, "") for i in range(len(prompts))] == [a.text for a in answers]


def test_answer_text_holds_back_a_possible_stop_string():
    tokenizer = tiny_tokenizer()
    text = AnswerText(tokenizer, ("w7 w8",))
    ids = tokenizer.convert_tokens_to_ids
    assert text.add(ids("w5")) == "w5"
    assert text.add(ids("w7")) == " "  # "w7" may begin "w7 w8"
    assert text.add(ids("w9")) == "w7 w9"  # it did not
    assert text.add(ids("w7")) == " "
    assert text.add(ids("w8")) == "" and text.stopped
    assert text.final() == "w5 w7 w9 " and text.flush() == ""


def test_streamed_chat_prompt_and_transformers_path_agree(nf4_fp32, monkeypatch):
    """transformers' path (a declined model) takes the same settings: greedy answers with a stop string and
    min_new_tokens equal the decoder's, and it streams them too."""
    import qlorakit.upstream.transformers as upstream_transformers

    model, tokenizer = nf4_fp32
    prompts = _prompts(4, seed=17)
    settings = dict(max_new_tokens=10, min_new_tokens=3)
    ours = generate(model, tokenizer, prompts, **settings)
    word = ours[0].split()[2]
    ours = generate(model, tokenizer, prompts, stop=[word], **settings)
    monkeypatch.setattr(upstream_transformers, "decoder_layout", lambda model: "declined for the test")
    pieces: dict[int, str] = {}
    theirs = generate(model, tokenizer, prompts, stop=[word], on_text=lambda i, p: pieces.__setitem__(
        i, pieces.get(i, "") + p), **settings)
    assert theirs == ours
    assert [pieces.get(i, "") for i in range(4)] == theirs


# -- qlorakit chat -------------------------------------------------------------------------------------------------


def _chat(model_dir, *flags):
    from qlorakit.cli import main

    return main(["chat", "--model", str(model_dir), "--quant", "nf4", "--dtype", "fp32", "--device", "cpu",
                 "--prompt", "w10 w11 w12", "--max-new-tokens", "8", *flags])


def test_chat_streams_the_answer_and_samples_with_a_seed(tiny_model_dir, capsys):
    """`qlorakit chat --prompt` prints what generate() answers (streamed: the same text); --temperature with
    --seed gives the same answer twice and another one with another seed."""
    assert _chat(tiny_model_dir) == 0
    streamed = capsys.readouterr().out
    assert _chat(tiny_model_dir, "--no-stream") == 0
    assert capsys.readouterr().out == streamed and len(streamed.split()) == 8
    sampled = []
    for seed in ("1", "1", "2"):
        assert _chat(tiny_model_dir, "--temperature", "2.0", "--top-p", "0.95", "--seed", seed) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]
    word = streamed.split()[3]
    assert _chat(tiny_model_dir, "--stop", word) == 0
    assert capsys.readouterr().out == streamed[:streamed.index(word)] + "\n"


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "0.9"], "--top-p shape(s) sampling, and answers are greedy without --temperature above 0"),
    (["--temperature", "0.7", "--top-p", "1.5"], "top_p=1.5 must be a finite number in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0: use 0 (greedy) or a positive temperature"),
    (["--temperature", "nan"], "--temperature nan: use 0 (greedy)"),
    (["--repetition-penalty", "0"], "repetition_penalty=0"),
])
def test_chat_sampling_flags_are_checked_before_the_model_loads(flags, message, capsys, monkeypatch):
    """A bad knob is an error naming it, before the model loads (the model source does not even exist here)."""
    from qlorakit.cli import main

    code = main(["chat", "--model", "/nonexistent/model", "--prompt", "hi", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "does not exist" not in err


def test_sliding_window_models_within_and_past_their_window(tmp_path, caplog):
    """A Mistral-style model with a 12-token sliding window: prompts that stay within it are the decoder's (full
    attention is the same attention there); a call that would pass it is transformers' generate, with a warning."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, sliding_window=12,
                           initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    tiny_tokenizer().save_pretrained(tmp_path / "mistral")
    model, tokenizer = _adapted(tmp_path / "mistral")
    generator = Generator(model, tokenizer)
    short = encode_prompts(tokenizer, ["w5 w6 w7", "w9"])
    answers = generator.run(short, Sampling(max_new_tokens=6))
    assert generator.decoder is not None and generator.decoder.window == 12
    assert [a.tokens for a in answers] == [r.tokens for r in _reference(model, tokenizer, ["w5 w6 w7", "w9"],
                                                                        Sampling(max_new_tokens=6))]
    long = ["w5 w6 w7 w8 w9 w10 w11 w12"]
    with caplog.at_level(logging.WARNING, logger="qlorakit"):
        answers = generator.run(encode_prompts(tokenizer, long), Sampling(max_new_tokens=8))
    assert any("12-token sliding attention window" in r.message for r in caplog.records)
    assert [a.tokens for a in answers] == [r.tokens for r in _reference(model, tokenizer, long,
                                                                        Sampling(max_new_tokens=8))]


@pytest.mark.parametrize("prompts,message", [
    ("w5 w6", "prompts: a str, not a list of prompts; pass a list (one prompt: [prompt])"),
    ([5], "prompt 1: a prompt is a string or a non-empty list of messages"),
    (["w5", []], "prompt 2: a prompt is a string or a non-empty list of messages ({'role': ..., 'content': ...}), "
                 "not []"),
    ([[{"role": "user"}]], "prompt 1: messages[0]: missing field 'content'"),
    ([[{"role": "robot", "content": "w5"}]], "prompt 1: messages[0]: unknown role 'robot'"),
])
def test_prompts_that_are_not_prompts_are_named(nf4_fp32, prompts, message):
    """A string is not read as one prompt per character, and a malformed conversation is named the way a data
    file's is — not a tokenizer's or a chat template's traceback."""
    from qlorakit.errors import QLoraKitError

    model, tokenizer = nf4_fp32
    with pytest.raises(QLoraKitError, match="^" + re.escape(message)):
        generate(model, tokenizer, prompts, max_new_tokens=2)


def test_token_ids_outside_the_vocabulary_are_named(nf4_fp32):
    model, tokenizer = nf4_fp32
    for ids, shown in (([5, 256], "256"), ([5, -1], "-1"), ([5, 2.0], "2.0")):
        with pytest.raises(ConfigError, match=rf"^prompt 1: token id {re.escape(shown)} is not one of the model's 256"):
            Generator(model, tokenizer).run([ids], Sampling(max_new_tokens=2))
