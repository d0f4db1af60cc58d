"""Names of the spec-decode counters spec_decode exports and `specdeploy monitor` reads.

Named after vLLM's spec-decode counters (vllm:spec_decode_num_drafts, ...num_draft_tokens,
...num_accepted_tokens, ...num_accepted_tokens_per_pos), without the `vllm:` prefix, plus
emitted tokens, fallbacks and decisions. Every counter has the label `task`; the
per-position one also `position` (0 = the first draft token); the decisions one `method`,
`k` ("off" for plain decoding) and `reason` (policy, default, adapted, off, probe: the
repository's policy; request: num_draft_tokens; repository: no policy).

    α (acceptance rate) = num_accepted_tokens / num_draft_tokens
    acceptance length    = num_emitted_tokens / num_target_forwards (the +1 token included)
"""
from __future__ import annotations

COUNTERS = {
    "spec_decode_num_requests": "Requests completed",
    "spec_decode_num_drafts": "Verification steps that checked at least one draft token",
    "spec_decode_num_draft_tokens": "Draft tokens proposed to the target",
    "spec_decode_num_accepted_tokens": "Draft tokens the target accepted",
    "spec_decode_num_accepted_tokens_per_pos": "Draft tokens accepted, by draft position (0 = first)",
    "spec_decode_num_emitted_tokens": "Tokens generated (accepted + recovered/bonus)",
    "spec_decode_num_target_forwards": "Target forward passes that verified drafts (prefill not counted)",
    "spec_decode_fallbacks": "Requests that fell back to plain decoding because the draft model failed",
    "spec_decode_decisions": "Requests by the method and k they ran with (policy decisions)",
}
PER_POSITION = "spec_decode_num_accepted_tokens_per_pos"
DECISIONS = "spec_decode_decisions"
