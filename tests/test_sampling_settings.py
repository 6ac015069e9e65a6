"""The [sampling] settings in the sampler and the config, and the defaults a model of your own brings.

- The filters change what is sampled, step by step through the KV cache: top_k = 1 is greedy decoding (equal to
  transformers' greedy generate, with and without its repetition penalty), every token of a top-k / top-p run
  is within the filter at its position, and a repetition penalty samples fewer repeats on a fixed seed.
- Stop strings cut replies where the text first holds one: the tokens up to the one that completed it stay (mask
  and `ended`), the decoded text stops before it, and the tokens before are the ones drawn without stop strings.
- The defaults change nothing: the same tensors as without settings, and stage inputs made before [sampling]
  existed stay up to date.
- With policy.path, learning rates for a pretrained model and the model's generation_config.json fill in the
  defaults (their origin said by `rlhfkit config` and at the start of a run); whatever you set wins; without
  policy.path nothing changes. Impossible values are refused with a message naming where they came from.
"""

import json

import pytest
import torch

from rlhfkit.core.errors import ConfigError
from rlhfkit.data.batching import pad_left
from rlhfkit.models.forward import response_logits
from rlhfkit.models.load import TinyModelSpec, build_tiny_policy
from rlhfkit.models.sampling import SamplingParams, cut_at_stop, decode_responses, next_token_logits, sample
from rlhfkit.pipeline.config import MODEL_LR_SOURCE, load_config, model_default_lines

QUERIES = [[1, 5, 6, 7, 8, 4], [1, 4], [1, 9, 9, 14, 5, 6, 7, 8, 4], [1, 13, 12, 4]]  # "<bos> digits =", ragged


def _batch(tokenizer, rows: int = 4):
    q, qm = pad_left([QUERIES[i % len(QUERIES)] for i in range(rows)], tokenizer.pad_token_id)
    return q, qm


def _sample(model, tokenizer, q, qm, sampling=None, seed=0, n=12, temperature=1.0, eos=None):
    return sample(model, q, qm, max_new_tokens=n, eos_token_id=tokenizer.eos_token_id if eos is None else eos,
                  pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                  generator=torch.Generator().manual_seed(seed), sampling=sampling, tokenizer=tokenizer)


# ---------------------------------------------------------------- the filters in the sampler


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_top_k_one_is_greedy_decoding_as_transformers_generate(arch, penalty, tokenizer, sharp_policy):
    """top_k = 1 leaves one token per step: the sampler becomes greedy decoding, token for token what
    transformers' generate(do_sample=False) decodes from each prompt alone (no padding), with its repetition
    penalty over the prompt and the reply so far."""
    model = sharp_policy(arch)
    q, qm = _batch(tokenizer)
    s = _sample(model, tokenizer, q, qm, SamplingParams(top_k=1, repetition_penalty=penalty), temperature=0.7)
    for b, query in enumerate(QUERIES):
        ids = torch.tensor([query])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             repetition_penalty=penalty, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, len(query):].tolist()
        n = int(s.response_mask[b].sum())
        assert s.responses[b, :n].tolist() == out[:n], f"row {b}"
        assert len(out) == n or out[n] == tokenizer.pad_token_id  # generate stopped where we stopped
    plain = _sample(model, tokenizer, q, qm, SamplingParams(top_k=1), temperature=0.7)
    if penalty != 1.0:  # power: the penalty changed some greedy reply
        assert not torch.equal(plain.responses, s.responses)


def test_every_sampled_token_is_within_the_filter_at_its_position(tokenizer, sharp_policy):
    """top-k = 3 and top-p = 0.5 act at every step of the KV-cache loop: recomputing each position's tempered
    distribution from scratch, each sampled token is among its 3 most probable / inside its nucleus; without
    the filter some token is not (power)."""
    model = sharp_policy("gpt2")
    q, qm = _batch(tokenizer, rows=64)
    T = 1.3

    def ranks(s):  # (B, Tr) rank of each sampled token in its position's distribution, -1 outside the mask
        logits = response_logits(model, q, qm, s.responses, s.response_mask, T)  # (B, Tr, V)
        chosen = logits.gather(-1, s.responses.unsqueeze(-1))  # (B, Tr, 1)
        return torch.where(s.response_mask.bool(), (logits > chosen).sum(-1), -1), logits

    r, _ = ranks(_sample(model, tokenizer, q, qm, SamplingParams(top_k=3), temperature=T))
    assert r.max() <= 2 and (r == 2).any()
    r, _ = ranks(_sample(model, tokenizer, q, qm, temperature=T))
    assert r.max() > 2
    s = _sample(model, tokenizer, q, qm, SamplingParams(top_p=0.5), temperature=T)
    r, logits = ranks(s)
    probs = logits.softmax(-1)
    above = (probs * (probs > probs.gather(-1, s.responses.unsqueeze(-1)))).sum(-1)  # mass strictly more probable
    assert (above[s.response_mask.bool()] < 0.5 + 1e-5).all()  # what precedes a kept token is still short of p


def test_repetition_penalty_samples_fewer_repeats(tokenizer, sharp_policy):
    """A tiny model over 15 tokens, where half the tokens of an 8-token reply repeat one of the prompt or the reply,
    repeats less with a penalty, and less still with a larger one, on the same seed."""
    model = sharp_policy("llama")
    q, qm = _batch(tokenizer, rows=128)

    def repeats(s) -> float:  # share of response tokens already in the prompt or earlier in the response
        hits = total = 0
        for query, mask, row, m in zip(q, qm, s.responses, s.response_mask):
            seen = set(query[mask.bool()].tolist())
            for token in row[m.bool()].tolist():
                hits, total, _ = hits + (token in seen), total + 1, seen.add(token)
        return hits / total

    base, mild, strong = (repeats(_sample(model, tokenizer, q, qm, SamplingParams(repetition_penalty=p), n=8, eos=[]))
                          for p in (1.0, 1.3, 2.0))
    assert base > mild > strong and strong < base - 0.1, (base, mild, strong)  # 0.54, 0.47, 0.38


# ---------------------------------------------------------------- stop strings


@pytest.mark.parametrize("stop", [("7",), ("2 3", "9"), ("5 3",), ("<unk>",)])
def test_stop_strings_cut_replies_and_their_masks(stop, tokenizer, sharp_policy):
    """The same seed with and without stop strings draws the same tokens up to the cut (checking costs no
    random draw): a cut response is the free one up to and including the token that completed the first stop
    string, marked ended, and its text is the free text before the stop string."""
    model = sharp_policy("llama")
    q, qm = _batch(tokenizer, rows=48)
    free = _sample(model, tokenizer, q, qm, n=16)
    cut = _sample(model, tokenizer, q, qm, SamplingParams(stop=stop), n=16)
    free_texts, cut_texts = decode_responses(tokenizer, free), decode_responses(tokenizer, cut)
    n_cut = 0
    for b in range(len(q)):
        ids = free.responses[b, : int(free.response_mask[b].sum())].tolist()
        # where the free response's text first holds a stop string: the shortest prefix whose decoding does
        ends = [n for n in range(1, len(ids) + 1)
                if any(s in tokenizer.decode(ids[:n], skip_special_tokens=False) for s in stop)]
        n = int(cut.response_mask[b].sum())
        assert cut.responses[b, :n].tolist() == ids[:n]
        assert (cut.responses[b, n:] == tokenizer.pad_token_id).all()
        assert not any(s in cut_texts[b] for s in stop)
        if ends and not (free.ended[b] and ends[0] == len(ids)):  # a stop string before EOS
            n_cut += 1
            assert n == ends[0] and cut.ended[b] and cut.by_stop_string[b], f"row {b}"
            assert cut_texts[b] == cut_at_stop(tokenizer.decode(ids, skip_special_tokens=False), stop)
        else:
            assert n == len(ids) and cut_texts[b] == free_texts[b] and not cut.by_stop_string[b]
            assert bool(cut.ended[b]) == bool(free.ended[b])
    assert 0 < n_cut < len(q)  # power: some replies were cut, some not


def test_stop_string_inside_a_token_with_a_byte_level_tokenizer(chat_tokenizer):
    """Byte-level BPE: a stop string may end inside a token (or span several). The response keeps the token that
    completes it; the decoded text stops before it."""
    model = build_tiny_policy(TinyModelSpec("llama", 2, 32, 4, 64), chat_tokenizer, seed=0).eval()
    prompts = [chat_tokenizer("the quick brown fox")["input_ids"], chat_tokenizer("hello world")["input_ids"]] * 8
    q, qm = pad_left(prompts, chat_tokenizer.eos_token_id)
    kwargs = dict(max_new_tokens=20, eos_token_id=chat_tokenizer.eos_token_id, pad_token_id=chat_tokenizer.eos_token_id,
                  tokenizer=chat_tokenizer)
    free = sample(model, q, qm, generator=torch.Generator().manual_seed(1), **kwargs)
    texts = decode_responses(chat_tokenizer, free)
    stop = ("o",)  # a letter: inside words, so inside multi-letter tokens too
    cut = sample(model, q, qm, generator=torch.Generator().manual_seed(1), sampling=SamplingParams(stop=stop), **kwargs)
    cut_texts = decode_responses(chat_tokenizer, cut)
    assert sum("o" in t for t in texts) > 0
    for b, text in enumerate(texts):
        assert cut_texts[b] == cut_at_stop(text, stop)
        n = int(cut.response_mask[b].sum())
        if "o" in text:
            ids = cut.responses[b, :n].tolist()
            assert "o" in chat_tokenizer.decode(ids) and "o" not in chat_tokenizer.decode(ids[:-1])


def test_stop_strings_need_the_tokenizer(tokenizer, sharp_policy):
    q, qm = _batch(tokenizer)
    with pytest.raises(Exception, match="tokenizer"):
        sample(sharp_policy("gpt2"), q, qm, max_new_tokens=4, eos_token_id=2, pad_token_id=0,
               sampling=SamplingParams(stop=("7",)))


# ---------------------------------------------------------------- the defaults change nothing


def test_default_settings_sample_exactly_as_without_them(tokenizer, sharp_policy):
    model = sharp_policy("gpt2")
    q, qm = _batch(tokenizer, rows=32)
    a = sample(model, q, qm, max_new_tokens=12, eos_token_id=2, pad_token_id=0, temperature=0.8,
               generator=torch.Generator().manual_seed(3))
    for settings in (SamplingParams(), SamplingParams(top_k=len(tokenizer)), SamplingParams.of(load_config().sampling)):
        b = _sample(model, tokenizer, q, qm, settings, seed=3, temperature=0.8)
        assert torch.equal(a.responses, b.responses) and torch.equal(a.response_mask, b.response_mask)
        assert torch.equal(a.ended, b.ended)
    logits = torch.randn(4, 15)
    assert torch.equal(next_token_logits(logits, 0.7, SamplingParams()), logits.float() / 0.7)


def test_sampling_is_an_input_of_the_stages_that_sample_and_old_stages_stay_up_to_date(tmp_path):
    from rlhfkit.core.runio import mark_complete, write_json
    from rlhfkit.pipeline.stages import stage_changes, stage_inputs

    cfg, cut = load_config(), load_config(overrides=["sampling.top_p=0.9"])
    for stage in ("feedback", "reward", "ppo", "eval"):  # the reward model learns from sampled comparisons
        assert stage_inputs(stage, cfg) != stage_inputs(stage, cut), stage
    assert stage_inputs("sft", cfg) == stage_inputs("sft", cut)
    # a feedback stage recorded before [sampling] existed was sampled with what are now its defaults
    (tmp_path / "feedback").mkdir()
    write_json(tmp_path / "feedback" / "INPUTS.json", {k: v for k, v in stage_inputs("feedback", cfg).items()
                                                       if k != "sampling"})
    mark_complete(tmp_path / "feedback", {})
    assert stage_changes(tmp_path, "feedback", cfg) == []
    assert stage_changes(tmp_path, "feedback", cut) == ["sampling.top_p: 1.0 -> 0.9"]
    # the draw is an input too (other samples); recorded before it was a setting, it reads as multinomial, the draw
    # of that time and the default
    assert stage_changes(tmp_path, "feedback", load_config(overrides=["sampling.draw='inverse_cdf'"])) \
        == ["sampling.draw: 'multinomial' -> 'inverse_cdf'"]


# ---------------------------------------------------------------- the config: validation


@pytest.mark.parametrize("override, message", [
    ("sampling.top_p=0", r"sampling.top_p = 0.0 \(--set\)|--set sampling.top_p = 0.0: must be in \(0, 1\]"),
    ("sampling.top_p=1.5", "must be in \\(0, 1\\]"),
    ("sampling.top_k=-1", "must be >= 0"),
    ("sampling.min_p=1.5", "must be in \\[0, 1\\]"),
    ("sampling.repetition_penalty=0", "must be a finite number > 0"),
    ("sampling.repetition_penalty=-1.2", "must be a finite number > 0"),
    ("sampling.stop=['ok', '']", "empty string"),
    ("sampling.draw='gumbel'", "must be one of 'inverse_cdf', 'multinomial'"),
])
def test_impossible_sampling_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(f"--set {override.split('=')[0]} = ")


def test_sampling_section_reads_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[sampling]\ntop_k = 40\ntop_p = 0.95\nstop = ["\\nUser:"]\n')
    s = load_config(path).sampling
    assert (s.top_k, s.top_p, s.stop) == (40, 0.95, ["\nUser:"])
    assert SamplingParams.of(s) == SamplingParams(top_k=40, top_p=0.95, stop=("\nUser:",))


# ---------------------------------------------------------------- the defaults a model of your own brings

LRS = {"sft": 2e-5, "reward": 1e-5, "ppo": 3e-6, "dpo": 1e-6, "rloo": 1e-6, "grpo": 1e-6,
       "rejection_sampling": 2e-5, "rest": 2e-5}
LORA_LRS = {"sft": 2e-5, "reward": 1e-5, "ppo": 3e-5, "dpo": 1e-5, "rloo": 1e-5, "grpo": 1e-5,
            "rejection_sampling": 2e-4, "rest": 2e-4}


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny model directory with a generation_config.json written by transformers, as a Hub model ships one."""
    from transformers import GenerationConfig

    path = tmp_path / "my-model"
    build_tiny_policy(TinyModelSpec("gpt2", 2, 32, 4, 32), tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(do_sample=True, temperature=0.6, top_k=20, top_p=0.9, repetition_penalty=1.1,
                     bos_token_id=1, eos_token_id=2).save_pretrained(path)
    return path


def _lrs(cfg) -> dict:
    return {name: getattr(cfg, name).lr for name in LRS}


def test_without_policy_path_nothing_changes():
    origins: dict = {}
    cfg = load_config(origins=origins)
    assert _lrs(cfg) == {"sft": 3e-3, "reward": 3e-3, "ppo": 5e-4, "dpo": 5e-4, "rloo": 5e-4, "grpo": 2.5e-4,
                         "rejection_sampling": 1e-3, "rest": 1e-3}
    assert cfg.sampling == load_config(overrides=["policy.path=''"]).sampling
    assert model_default_lines(origins, cfg) == []


def test_pretrained_learning_rates_and_generation_config(model_dir):
    origins: dict = {}
    cfg = load_config(overrides=[f"policy.path='{model_dir}'"], origins=origins)
    assert _lrs(cfg) == LRS
    s = cfg.sampling
    assert (s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.stop) == (20, 0.9, 0.0, 1.1, [])
    assert cfg.ppo.temperature == cfg.feedback.temperature == 1.0  # the file's 0.6 is not taken (README says why)
    assert model_default_lines(origins, cfg) == [
        f"sft.lr = 2e-05, reward.lr = 1e-05, ppo.lr = 3e-06, dpo.lr = 1e-06, kto.lr = 1e-06, rloo.lr = 1e-06, grpo.lr = 1e-06, simpo.lr = 1e-06, orpo.lr = 1e-06, "
        f"rejection_sampling.lr = 2e-05, rest.lr = 2e-05, online_dpo.lr = 5e-07, sl_cai.lr = 2e-05 ({MODEL_LR_SOURCE})",
        f"sampling.top_k = 20, sampling.top_p = 0.9, sampling.repetition_penalty = 1.1 "
        f"({model_dir / 'generation_config.json'})"]
    assert model_default_lines(origins, cfg, {"dpo"}) == [f"dpo.lr = 1e-06 ({MODEL_LR_SOURCE})"]


def test_lora_learning_rates(model_dir):
    cfg = load_config(overrides=[f"policy.path='{model_dir}'", "lora.r=8"])
    assert _lrs(cfg) == LORA_LRS  # SFT trains in full without lora.sft, the reward model always
    cfg = load_config(overrides=[f"policy.path='{model_dir}'", "lora.r=8", "lora.sft=true"])
    assert cfg.sft.lr == 2e-4
    # a reward model from another directory is not the pretrained policy: its lr is yours to choose
    assert load_config(overrides=[f"policy.path='{model_dir}'", f"reward.init='{model_dir}'"]).reward.lr == 3e-3


def test_what_you_set_wins_over_the_models_defaults(model_dir, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[policy]\npath = "{model_dir}"\n\n[sft]\nlr = 1e-4\n\n[sampling]\ntop_p = 0.8\n')
    origins: dict = {}
    cfg = load_config(path, ["ppo.lr=7e-6", "sampling.top_k=0"], origins=origins, dpo={"lr": 3e-7})
    assert (cfg.sft.lr, cfg.ppo.lr, cfg.dpo.lr, cfg.reward.lr) == (1e-4, 7e-6, 3e-7, 1e-5)
    assert (cfg.sampling.top_p, cfg.sampling.top_k, cfg.sampling.repetition_penalty) == (0.8, 0, 1.1)
    text = " ".join(model_default_lines(origins, cfg))
    assert "reward.lr = 1e-05" in text and "sampling.repetition_penalty = 1.1" in text
    assert "sft.lr" not in text and "ppo.lr" not in text and "top_p" not in text and "top_k" not in text


def test_rlhfkit_config_and_run_show_the_models_defaults(model_dir, tmp_path, capsys, monkeypatch):
    from rlhfkit.cli import main
    from rlhfkit.pipeline import stages

    assert main(["config", "--set", f"policy.path='{model_dir}'", "--set", "ppo.lr=1e-5"]) == 0
    out = capsys.readouterr().out
    head = out.split("\n\n")[0]
    assert head.startswith("# Defaults for the model in policy.path (anything you set wins):")
    assert "sft.lr = 2e-05, reward.lr = 1e-05, dpo.lr = 1e-06" in head and "ppo.lr" not in head
    assert f"sampling.top_k = 20, sampling.top_p = 0.9, sampling.repetition_penalty = 1.1 ({model_dir}" in head
    assert "\nlr = 1e-05  #" in out  # ppo.lr as set, in the TOML below

    seen = []
    monkeypatch.setattr(stages, "run_pipeline", lambda cfg, out, update=False: seen.append(cfg) or {})
    assert main(["run", "--out", str(tmp_path / "out"), "--set", f"policy.path='{model_dir}'"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("[rlhfkit] defaults for the model in policy.path (set any to change it): sft.lr = 2e-05, "
                            "reward.lr = 1e-05, ppo.lr = 3e-06 (default for a pretrained policy.path); sampling.top_k")
    assert "dpo.lr" not in first and seen[0].ppo.lr == 3e-6  # only the stages this run has


def test_generation_config_missing_or_malformed(model_dir, tmp_path):
    (model_dir / "generation_config.json").unlink()
    cfg = load_config(overrides=[f"policy.path='{model_dir}'"])
    assert cfg.sampling == load_config().sampling and cfg.sft.lr == 2e-5  # no sampling defaults; the rates stay
    assert load_config(overrides=[f"policy.path='{tmp_path / 'nowhere'}'"]).sampling == load_config().sampling
    gen = model_dir / "generation_config.json"
    gen.write_text('{"top_p": 0.9,\n "top_k": }')
    with pytest.raises(ConfigError, match=rf"^{gen}:2: not valid JSON"):
        load_config(overrides=[f"policy.path='{model_dir}'"])
    gen.write_text("[0.9]")
    with pytest.raises(ConfigError, match=rf"^{gen}: expected a JSON object"):
        load_config(overrides=[f"policy.path='{model_dir}'"])
    gen.write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(ConfigError, match=rf"^{gen}: sampling.top_k = 'many': expected int"):
        load_config(overrides=[f"policy.path='{model_dir}'"])
    gen.write_text(json.dumps({"top_p": 1.5, "stop_strings": "\nUser:", "top_k": None}))
    with pytest.raises(ConfigError, match=rf"^sampling.top_p = 1.5 \({gen}\): must be in \(0, 1\]"):
        load_config(overrides=[f"policy.path='{model_dir}'"])
    cfg = load_config(overrides=[f"policy.path='{model_dir}'", "sampling.top_p=1.0"])  # set it, and it runs
    assert cfg.sampling.stop == ["\nUser:"] and cfg.sampling.top_k == 0
