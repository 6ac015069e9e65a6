"""The model behind `rlhfkit serve`: loaded once, called under one lock, sampled with rlhfkit's own sampler.

    engine = Engine.load("runs/x/ppo/model", device="cpu", precision="fp32", max_batch=64)
    choices = engine.generate([ids], n=2, max_tokens=16, temperature=0.7, sampling=engine.defaults, seed=0,
                              top_logprobs=5)  # [[Choice, Choice]]: n per prompt

What it reuses, so that a served policy behaves as it did in training:
- loading: rlhfkit.models.load (load_policy merges a LoRA adapter directory into its base; load_tokenizer);
- sampling: rlhfkit.models.sampling.sample, the KV-cache sampler of every stage, with its SamplingParams (top-k,
  top-p, min-p, repetition penalty, stop strings) and its stop tokens (EOS and the chat template's end of turn,
  rlhfkit.data.batching.stop_ids); the reply's text is decode_responses' (the final EOS dropped, cut at a stop
  string, special tokens sampled mid-reply kept);
- log-probs: rlhfkit.models.forward.response_logits, one forward over prompt + reply.

Deviations, each on purpose:
- Temperature 0 is greedy: the sampler at temperature 1 with top_k = 1 (the argmax is the only token left; the
  repetition penalty, when asked for, still applies first, as in Hugging Face's greedy search).
- Log-probs are the model's own: log-softmax of the raw logits (temperature 1, no filters), whatever the request's
  sampling settings (vLLM's default `raw_logprobs`; a judge reads the model's probabilities, not the sampler's).
  They come from a forward over prompt + reply after sampling, one row at a time (a (1, Tr, V) tensor, never
  (B, Tr, V)), so they agree with the sampled step's distribution up to float rounding, not bit for bit.
- A seed fixes the output of the same request; rows are sampled together, so one prompt's output with a seed
  may differ when it is sent alone or beside other prompts (as with vLLM).

Layer: serve (imports models, data, core).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.core.errors import ConfigError, RlhfkitError
from rlhfkit.core.generation import generation_defaults
from rlhfkit.data.batching import pad_id, pad_left, stop_ids
from rlhfkit.data.chat import encode_chat_prompt, has_chat_template
from rlhfkit.models.forward import freeze, response_logits
from rlhfkit.models.load import TOKENIZER_FILES, check_model_dir, load_policy, load_tokenizer
from rlhfkit.models.lora import adapter_base, is_adapter_dir
from rlhfkit.models.runtime import autocast, resolve_device, resolve_precision
from rlhfkit.models.sampling import SamplingParams, decode_responses, sample

ROLE = "serve"  # how load errors name the model ("serve: model directory X does not exist ...")
NO_CONTEXT_LIMIT = 2048  # a model whose config states no max_position_embeddings is served with this context


class Busy(RlhfkitError):
    """More requests wait for the model than the server's bound; the client should retry later (503)."""


@dataclass
class Choice:
    """One sampled reply. `token_ids` are every generated token that counts (the one that ended the reply, EOS or
    end of turn or the token completing a stop string, included: it was sampled), so len(token_ids) is the reply's
    completion tokens; `text` is decode_responses' text (without that ending)."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, end of turn or a stop string) or "length" (max_tokens reached)
    logprobs: list[float] | None = None  # (Tr,) log p(token_t | prompt, reply_<t), raw model
    top_logprobs: list[list[tuple[int, float]]] | None = None  # (Tr, k) the k most probable (id, log p), descending


class Engine:
    """One model and its tokenizer, and the lock every model call takes (requests run one at a time)."""

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype | None, max_batch: int,
                 defaults: SamplingParams, source: Path, max_waiting: int = 32):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.max_batch, self.defaults, self.source = max_batch, defaults, source
        self.stops = stop_ids(tokenizer)  # EOS and the chat template's end-of-turn token
        self.pad = pad_id(tokenizer)
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None) or NO_CONTEXT_LIMIT  # prompt + reply tokens
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)  # ids a prompt may hold
        self.created = int(time.time())
        self.lock = threading.Lock()  # one model call at a time: memory and compute stay those of one batch
        self.max_waiting = max_waiting  # requests that may wait for the lock beyond the one running
        self._count = threading.Lock()
        self.pending = 0  # requests running or waiting
        self._token_cache: dict[int, tuple[str, list[int]]] = {}

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", precision: str = "auto", max_batch: int = 64,
             max_waiting: int = 32) -> "Engine":
        """The policy in `model_dir` (a plain model directory, or a LoRA adapter directory merged into its base),
        frozen, with its tokenizer and its generation_config.json's sampling defaults."""
        model_dir = Path(model_dir)
        check_model_dir(model_dir, ROLE, causal=True)
        dev = resolve_device(device)
        # 'auto' on a CPU with bf16 instructions: bf16 for a wide model whose config this directory holds
        dtype = resolve_precision(precision, dev, model_dir if (model_dir / "config.json").is_file() else None)
        # an adapter directory rlhfkit writes holds the tokenizer too; one saved without it uses its base's
        adapter = is_adapter_dir(model_dir) and not (model_dir / "config.json").is_file()
        has_tokenizer = any((model_dir / name).is_file() for name in TOKENIZER_FILES)
        base = adapter_base(model_dir) if adapter else model_dir
        tokenizer = load_tokenizer(model_dir if has_tokenizer else base, ROLE)
        model = freeze(load_policy(model_dir, dev, ROLE))
        file = model_dir / "generation_config.json"
        file = file if file.is_file() else base / "generation_config.json"
        values = generation_defaults(file)
        try:
            defaults = SamplingParams(int(values.get("top_k", 0)), float(values.get("top_p", 1.0)),
                                      float(values.get("min_p", 0.0)), float(values.get("repetition_penalty", 1.0)),
                                      tuple(str(x) for x in values.get("stop", ())))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{file}: a sampling default of the wrong type ({e})") from None
        if not (defaults.top_k >= 0 and 0 < defaults.top_p <= 1 and 0 <= defaults.min_p < 1
                and defaults.repetition_penalty > 0 and all(defaults.stop)):
            raise ConfigError(f"{file}: sampling defaults out of range ({defaults}); fix the model's generation "
                              "config or remove it")
        return cls(model, tokenizer, dev, dtype, max_batch, defaults, model_dir, max_waiting)

    # ------------------------------------------------------------------------------------------------
    # Prompts

    @property
    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        """A raw-text prompt (/v1/completions): the tokenizer's ids with its own special tokens (e.g. BOS), no chat
        template, as OpenAI's and vLLM's completions endpoints read a prompt."""
        return self.tokenizer(text)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation (/v1/chat/completions) through the chat template, the assistant's turn opened: the ids the
        pipeline samples a chat prompt from (rlhfkit.data.chat.encode_chat_prompt)."""
        return encode_chat_prompt(self.tokenizer, messages)

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token, as OpenAI's logprobs give them. A byte-level BPE token (GPT-2, Llama 3,
        Qwen, SmolLM) may hold part of a character: its bytes are exact, and its text is OpenAI's "bytes:\\xe2\\x80"
        (so two such tokens never share a text, as the legacy {text: logprob} maps need)."""
        if token_id not in self._token_cache:
            raw = token_bytes(self.tokenizer, token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_cache[token_id] = (text, list(raw))
        return self._token_cache[token_id]

    # ------------------------------------------------------------------------------------------------
    # Generation

    def generate(self, prompts: list[list[int]], *, n: int, max_tokens: int, temperature: float,
                 sampling: SamplingParams, seed: int, top_logprobs: int | None = None) -> list[list[Choice]]:
        """n choices per prompt (lists of ids, each non-empty, len + max_tokens within the context: the caller
        checks). top_logprobs = None: no log-probs; k >= 0: each token's log-prob and the k most probable."""
        rows = [ids for ids in prompts for _ in range(n)]  # prompt i's choices are rows i*n .. i*n + n - 1
        if temperature == 0:  # greedy: only the argmax survives top_k = 1, and multinomial must take it
            temperature, sampling = 1.0, dataclasses.replace(sampling, top_k=1)
        with self.turn():
            generator = torch.Generator(device=self.device).manual_seed(seed % 2**64)
            choices: list[Choice] = []
            for start in range(0, len(rows), self.max_batch):
                choices += self._batch(rows[start:start + self.max_batch], max_tokens, temperature, sampling,
                                       generator, top_logprobs)
        return [choices[i * n:(i + 1) * n] for i in range(len(prompts))]

    @contextlib.contextmanager
    def turn(self):
        """The model's lock, refused (Busy) when max_waiting requests already wait behind the one running."""
        with self._count:
            if self.pending > self.max_waiting:
                raise Busy(f"the model is busy: {self.pending} requests are running or waiting; retry shortly")
            self.pending += 1
        try:
            with self.lock:
                yield
        finally:
            with self._count:
                self.pending -= 1

    @torch.no_grad()
    def _batch(self, rows, max_tokens, temperature, sampling, generator, top_logprobs) -> list[Choice]:
        queries, query_mask = pad_left(rows, self.pad)  # (B, Tq) left-padded, as the sampler wants
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        with autocast(self.device, self.dtype):
            s = sample(self.model, queries, query_mask, max_new_tokens=max_tokens, eos_token_id=self.stops,
                       pad_token_id=self.pad, temperature=temperature, generator=generator, sampling=sampling,
                       tokenizer=self.tokenizer)
        texts = decode_responses(self.tokenizer, s)
        choices = []
        for i, text in enumerate(texts):
            ids = s.responses[i, s.response_mask[i].bool()].tolist()  # (Tr_i,) up to and including the ending
            choice = Choice(ids, text, "stop" if bool(s.ended[i]) else "length")
            if top_logprobs is not None:
                choice.logprobs, choice.top_logprobs = self._logprobs(rows[i], ids, top_logprobs)
            choices.append(choice)
        return choices

    def _logprobs(self, prompt: list[int], reply: list[int], k: int):
        """log p of each reply token and the k most probable tokens at each step: one forward over the prompt and
        reply of one row (no padding), log-softmax of the raw logits (temperature 1)."""
        q = torch.tensor([prompt], device=self.device)  # (1, Tq)
        r = torch.tensor([reply], device=self.device)  # (1, Tr)
        with autocast(self.device, self.dtype):
            logits = response_logits(self.model, q, torch.ones_like(q), r, torch.ones_like(r))  # (1, Tr, V)
        logp = torch.log_softmax(logits[0].float(), dim=-1)  # (Tr, V)
        chosen = logp.gather(1, r[0].unsqueeze(1)).squeeze(1)  # (Tr,)
        top_v, top_i = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (Tr, k), sorted descending
        top = [list(zip(ids, values)) for ids, values in zip(top_i.tolist(), top_v.tolist())]
        return chosen.tolist(), top

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# ----------------------------------------------------------------------------------------------------
# A token's bytes


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character each byte is written as -> the byte (Radford
    et al. 2019, `bytes_to_unicode` in openai/gpt-2's encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = _byte_decoder()


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ + " " + repr(decoder) if decoder is not None else ""


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for: a byte-level BPE token's bytes through GPT-2's alphabet, a SentencePiece
    byte token `<0xAB>` as that byte and `▁` as a space; otherwise (and for special tokens) its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if token_id in set(tokenizer.all_special_ids) or piece in getattr(tokenizer, "added_tokens_encoder", {}):
        return piece.encode("utf-8")
    kind = _decoder_kind(tokenizer)
    if "ByteLevel" in kind and all(c in BYTE_DECODER for c in piece):
        return bytes(BYTE_DECODER[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    if "Metaspace" in kind or "▁" in piece:
        return piece.replace("▁", " ").encode("utf-8")
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
