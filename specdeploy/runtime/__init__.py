"""The speculative decoding runtime: one loop, pluggable runners and proposers.

Vocabulary (used the same way in every module, metric and report):

- target: the model whose output we must reproduce exactly; draft: whatever proposes
  tokens for it (a small model, the target's first layers, Medusa/EAGLE heads, n-gram lookup).
- pending token: the last committed token, not yet fed to the target's KV cache. Each
  step feeds ``[pending, d_1 .. d_k]`` to the target, so one forward scores all k drafts.
- proposed: draft tokens offered to the target (k per step, fewer near max_new_tokens).
- accepted: draft tokens the verifier kept. recovered: the token sampled from the
  residual distribution norm(max(0, target_probs - draft_probs)) at the first rejection.
  bonus: the target's own token after a fully accepted draft. Each step emits
  accepted + 1 tokens (the recovered or bonus token).
- α (alpha) = accepted / proposed.
- acceptance length = tokens emitted per target forward (the +1 included).
"""
