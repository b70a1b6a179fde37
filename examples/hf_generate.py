"""A transformers model on sparseforge attention: prefill and greedy generate() on a left-padded
batch, compared with the same weights on transformers' eager attention.

    python examples/hf_generate.py                       # tiny random Llama-like model, CPU
    python examples/hf_generate.py --sliding-window 4    # Mistral-style sliding window layers
    python examples/hf_generate.py --shards              # StridedShards on every other layer

One line switches a model: ``register()`` adds the "sparseforge" attention implementation to
transformers' AttentionInterface (and its mask interface), then
``from_config(cfg, attn_implementation="sparseforge")``. Prefill runs as self attention, each
decode step as a 1-D call whose query is the last of the cached keys; the left padding reaches
sparseforge as a key padding mask. No download: the weights are random.
"""
from __future__ import annotations

import argparse
import copy

import torch

import sparseforge as sf
from sparseforge.integrations import transformers as sf_hf


def build(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = MistralConfig(**common, sliding_window=args.sliding_window) if args.sliding_window else LlamaConfig(**common)
    torch.manual_seed(args.seed)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    patterns = None
    if args.shards:  # S2-Attention's strided shards (with causality) on every other layer
        shards = sf.StridedShards(block_size=2, local_blocks=1, vertical_stride=2) & sf.Causal()
        patterns = {i: shards for i in range(1, args.layers, 2)}
    name = sf_hf.register(patterns=patterns, name="sparseforge_shards" if args.shards else sf_hf.NAME)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def left_padded_batch(args):
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    for b in range(args.batch):
        pad = (b * args.prompt) // (2 * args.batch)  # sample b: that many pad tokens first
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=100)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--prompt", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--sliding-window", type=int, default=None)
    p.add_argument("--shards", action="store_true", help="StridedShards on every other layer (no eager twin)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    eager, ours = build(args)
    ids, mask = left_padded_batch(args)
    kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        real = mask.bool()
        logit_err = float((ours(ids, attention_mask=mask).logits - eager(ids, attention_mask=mask).logits)[real]
                          .abs().max())
        got = ours.generate(ids, **kw)
        cached_vs_uncached = bool(torch.equal(got, ours.generate(ids, use_cache=False, **kw)))
        want = eager.generate(ids, **kw)
    result = dict(prefill_max_abs_err=logit_err, tokens=got[:, ids.shape[1]:].tolist(),
                  eager_tokens=want[:, ids.shape[1]:].tolist(), same_as_eager=bool(torch.equal(got, want)),
                  cache_consistent=cached_vs_uncached, compiled=sf_hf.compiled_count())
    print(f"prefill logits (real positions) max |sparseforge - eager| = {logit_err:.2e}")
    for b, (a, e) in enumerate(zip(result["tokens"], result["eager_tokens"])):
        print(f"sample {b} ({int((~real[b]).sum())} pad tokens): sparseforge {a}  eager {e}")
    what = "differs from eager, as the shards pattern should" if args.shards else \
        ("same as eager" if result["same_as_eager"] else "DIFFERENT from eager")
    print(f"generate: {what}; with KV cache == without: {cached_vs_uncached}; "
          f"compiled attentions: {result['compiled']}")
    return result


if __name__ == "__main__":
    main()
