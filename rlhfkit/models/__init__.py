"""Models layer: Hugging Face models in every role and what is done with a model (not with its outputs).

    runtime.py    device, precision (autocast), CPU threads
    load.py       tiny models from a config; loading policy, scalar (reward, value) models and tokenizers from
                  directories, with errors a user can act on; LoRA adapters merged on load, `rlhfkit merge`
    lora.py       LoRA adapters (peft) and the adapter-disabled reference
    forward.py    forward passes: logits, per-token and sequence log-probs of responses, values, reward scores;
                  dropout off, frozen models
    reference.py  the one policy/reference factory and the one reference interface (frozen copy, adapter-disabled
                  LoRA, cached table)
    sampling.py   the batched KV-cache sampler, with the [sampling] filters (SamplingParams) and stop strings
    scoring.py    reward functions over text: reward models and classifiers read with their own tokenizers
    optim.py      optimiser + schedule, one step, RNG state, checkpoints of the online loops
    gguf.py       `rlhfkit model from-gguf`: a llama-family GGUF file (llama.cpp, Ollama) as a plain directory
    judge.py      the AI judge: templates (judge_templates/*.toml), a local causal LM's answer probabilities,
                  position swap, the cache of judgements

May import: data, ops, core (never spine, algorithms or anything above).
"""
