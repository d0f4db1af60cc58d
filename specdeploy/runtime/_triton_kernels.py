"""The jitted Triton kernels behind kernels.py (imported only where Triton is installed).

Shapes and the meaning of each kernel are in kernels.py's wrappers; every kernel takes its
token rows in tiles of BLOCK_M = 16 and reduces in float32 in a fixed order (see kernels.py).
Sizes that vary per call (token count, KV length) are not specialised: one binary serves every
size, so a token's arithmetic (down to the compiler's choice of fused multiply-adds) is the same
whatever else shares the launch; Triton would otherwise compile a variant for a count of 1.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 models: exact float32 products, not TF32
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _x_block(x_ptr, nw_ptr, rows, row_ok, ks, K, ssq, HAS_NORM: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] block of x and the rows' running sum of squares. With HAS_NORM the block
    comes back times the RMSNorm weight (cast to the model dtype) and the caller scales the product
    by `_rstd(ssq)` afterwards: norm(x) @ W = rstd * ((x * w_norm) @ W), one pass over x."""
    k_ok = ks < K
    x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if HAS_NORM:
        xf = x.to(tl.float32)
        ssq += tl.sum(xf * xf, axis=1)
        nw = tl.load(nw_ptr + ks, mask=k_ok, other=0.0)
        x = (xf * nw.to(tl.float32)[None, :]).to(nw.dtype)
    return x, ssq


@triton.jit
def _rstd(ssq, K, eps):
    """1 / sqrt(mean(x²) + eps) from a row's sum of squares, float32."""
    return 1.0 / tl.sqrt_rn(ssq / K + eps)


@triton.jit
def _normed_pair(x_ptr, nw_ptr, w_ptr, rows, row_ok, rows_a, rows_b, w_ok, K, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """rmsnorm(x) @ W[rows_a]ᵀ and rmsnorm(x) @ W[rows_b]ᵀ for W [*, K]: two [BLOCK_M, BLOCK_N] float32
    blocks (gate and up, or the two halves of a rotary head); w_ok [BLOCK_N] masks weight rows."""
    ssq = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x, ssq = _x_block(x_ptr, nw_ptr, rows, row_ok, ks, K, ssq, True)
        ok = w_ok[:, None] & (ks[None, :] < K)
        wa = tl.load(w_ptr + rows_a[:, None] * K + ks[None, :], mask=ok, other=0.0)
        wb = tl.load(w_ptr + rows_b[:, None] * K + ks[None, :], mask=ok, other=0.0)
        acc_a = _dot(x, tl.trans(wa), acc_a, IEEE)
        acc_b = _dot(x, tl.trans(wb), acc_b, IEEE)
    rstd = _rstd(ssq, K, eps)[:, None]
    return acc_a * rstd, acc_b * rstd


@triton.jit(do_not_specialize=["M"])
def linear_kernel(x_ptr, w_ptr, res_ptr, nw_ptr, out_ptr, M, N, K, eps,
                  HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ssq = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x, ssq = _x_block(x_ptr, nw_ptr, rows, row_ok, ks, K, ssq, HAS_NORM)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < K), other=0.0)
        acc = _dot(x, tl.trans(w), acc, IEEE)
    if HAS_NORM:
        acc = acc * _rstd(ssq, K, eps)[:, None]
    offs = rows[:, None] * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])
def gate_up_kernel(x_ptr, nw_ptr, w_ptr, out_ptr, M, I, K, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < I
    gate, up = _normed_pair(x_ptr, nw_ptr, w_ptr, rows, row_ok, cols, I + cols, col_ok, K, eps,
                            BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + rows[:, None] * I + cols[None, :], act.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M", "m"])
def qkv_rope_kernel(x_ptr, nw_ptr, w_ptr, cos_ptr, sin_ptr, rope_pos_ptr, q_ptr, kv_ptr, rows_ptr, pos_ptr,
                    M, K, eps, q_scale, m, HQ, HKV, rope_stride, s_b, s_h, s_kv, s_p,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    IEEE: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1) // (HALF // BLOCK_H)  # q heads, then k heads, then v heads
    ok = toks < M
    # BLOCK_H of the head's first-half dims and their rotate_half partners HALF further on
    d = (tl.program_id(1) % (HALF // BLOCK_H)) * BLOCK_H + tl.arange(0, BLOCK_H)
    lo_rows = head * 2 * HALF + d
    acc_lo, acc_hi = _normed_pair(x_ptr, nw_ptr, w_ptr, toks, ok, lo_rows, lo_rows + HALF, d >= 0, K, eps,
                                  BLOCK_M, BLOCK_H, BLOCK_K, IEEE)
    lo, hi = acc_lo, acc_hi
    if head < HQ + HKV:  # rotary embedding on q and k: rotate_half pairs element i with i + HALF
        rp = tl.load(rope_pos_ptr + toks, mask=ok, other=0)
        tab = rp[:, None] * rope_stride + d[None, :]
        c_lo = tl.load(cos_ptr + tab).to(tl.float32)
        c_hi = tl.load(cos_ptr + tab + HALF).to(tl.float32)
        s_lo = tl.load(sin_ptr + tab).to(tl.float32)  # sign-folded: -sin
        s_hi = tl.load(sin_ptr + tab + HALF).to(tl.float32)
        lo = acc_lo * c_lo + acc_hi * s_lo
        hi = acc_hi * c_hi + acc_lo * s_hi
    if head < HQ:
        dst = q_ptr + toks[:, None] * (HQ * 2 * HALF) + head * 2 * HALF + d[None, :]
        tl.store(dst, (lo * q_scale).to(q_ptr.dtype.element_ty), mask=ok[:, None])
        tl.store(dst + HALF, (hi * q_scale).to(q_ptr.dtype.element_ty), mask=ok[:, None])
    else:
        is_v = (head >= HQ + HKV).to(tl.int32)
        kvh = head - HQ - is_v * HKV
        crow = tl.load(rows_ptr + toks // m, mask=ok, other=0)
        p = tl.load(pos_ptr + toks, mask=ok, other=0)
        dst = kv_ptr + crow[:, None] * s_b + kvh * s_h + is_v * s_kv + p[:, None] * s_p + d[None, :]
        tl.store(dst, lo.to(kv_ptr.dtype.element_ty), mask=ok[:, None])
        tl.store(dst + HALF, hi.to(kv_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=["m", "kv_len", "splits"])
def attn_partial_kernel(q_ptr, kv_ptr, rows_ptr, allowed_ptr, part_o_ptr, part_ml_ptr,
                        m, kv_len, HKV, G, splits, s_b, s_h, s_kv, s_p,
                        HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    rh = tl.program_id(0)  # fed row r, KV head h: rh = r * HKV + h
    split = tl.program_id(1)  # keys [split * BLOCK_N, (split + 1) * BLOCK_N)
    r, kvh = rh // HKV, rh % HKV
    j = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # stacked query: head kvh * G + j // m, token j % m
    j_ok = j < G * m
    tok = r * m + j % m
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + tok[:, None] * (HKV * G * HD) + (kvh * G + j // m)[:, None] * HD + d[None, :],
                mask=j_ok[:, None], other=0.0)
    keys = split * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < kv_len
    src = kv_ptr + tl.load(rows_ptr + r) * s_b + kvh * s_h + keys[:, None] * s_p + d[None, :]
    k = tl.load(src, mask=key_ok[:, None], other=0.0)
    v = tl.load(src + s_kv, mask=key_ok[:, None], other=0.0)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32), IEEE)
    allow = tl.load(allowed_ptr + tok[:, None] * kv_len + keys[None, :], mask=j_ok[:, None] & key_ok[None, :], other=0)
    s = tl.where(allow != 0, s, float("-inf"))
    mx = tl.max(s, axis=1)
    p = tl.exp(s - tl.where(mx == float("-inf"), 0.0, mx)[:, None])  # a fully masked block: all zeros
    o = _dot(p.to(v.dtype), v, tl.zeros([BLOCK_Q, HD], dtype=tl.float32), IEEE)
    qp = tl.num_programs(2) * BLOCK_Q
    part = rh * splits + split
    tl.store(part_o_ptr + (part * qp + j)[:, None] * HD + d[None, :], o)
    tl.store(part_ml_ptr + (part * 2) * qp + j, mx)
    tl.store(part_ml_ptr + (part * 2 + 1) * qp + j, tl.sum(p, axis=1))


@triton.jit(do_not_specialize=["m", "splits"])
def attn_combine_kernel(part_o_ptr, part_ml_ptr, out_ptr, m, HKV, G, splits,
                        HD: tl.constexpr, BLOCK_Q: tl.constexpr, UNROLL: tl.constexpr):
    rh = tl.program_id(0)
    r, kvh = rh // HKV, rh % HKV
    j = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    j_ok = j < G * m
    qp = tl.num_programs(1) * BLOCK_Q
    d = tl.arange(0, HD)
    top = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max, sum and weighted output
    total = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, HD], dtype=tl.float32)
    # key blocks in order, UNROLL at a time so that their loads are in flight together; a block
    # past the last (or past a query's keys) changes nothing: scale 1, weight 0
    for s0 in range(0, splits, UNROLL):
        for t in tl.static_range(UNROLL):
            part = rh * splits + s0 + t
            ok = (j * 0 + s0 + t) < splits  # [BLOCK_Q]: masks must be tensors
            mx = tl.load(part_ml_ptr + (part * 2) * qp + j, mask=ok, other=float("-inf"))
            lsum = tl.load(part_ml_ptr + (part * 2 + 1) * qp + j, mask=ok, other=0.0)
            o = tl.load(part_o_ptr + (part * qp + j)[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)
            new_top = tl.maximum(top, mx)
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            old_w, w = tl.exp(top - safe), tl.exp(mx - safe)
            acc = acc * old_w[:, None] + w[:, None] * o
            total = total * old_w + w * lsum
            top = new_top
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # only padded query rows see no key
    tok = r * m + j % m
    tl.store(out_ptr + tok[:, None] * (HKV * G * HD) + (kvh * G + j // m)[:, None] * HD + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=j_ok[:, None])


@triton.jit(do_not_specialize=["M"])
def logits_topk_partial_kernel(x_ptr, w_ptr, part_val_ptr, part_idx_ptr, part_ml_ptr, M, V, K,
                               TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                               BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK_V slice of the vocabulary: logits x @ w[slice]ᵀ (rounded to the model dtype, as a
    linear layer's output), their max and sum of exp (for the log-softmax), and their TOPK best."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    blk = tl.program_id(1)
    nb = tl.num_programs(1)
    offs = tl.arange(0, BLOCK_V)
    cols = blk * BLOCK_V + offs
    row_ok, col_ok = rows < M, cols < V
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < K), other=0.0)
        acc = _dot(x, tl.trans(w), acc, IEEE)
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    part = rows * nb + blk  # [BLOCK_M] this slice's entry of each row
    tl.store(part_ml_ptr + part * 2, mx, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, tl.sum(tl.exp(logits - mx[:, None]), axis=1), mask=row_ok)
    for t in tl.static_range(TOPK):  # the best, then the best of the rest: ties go to the lowest index
        best = tl.argmax(logits, axis=1, tie_break_left=True)
        tl.store(part_val_ptr + part * TOPK + t, tl.max(logits, axis=1), mask=row_ok)
        tl.store(part_idx_ptr + part * TOPK + t, blk * BLOCK_V + best, mask=row_ok)
        logits = tl.where(offs[None, :] == best[:, None], float("-inf"), logits)


@triton.jit
def logits_topk_combine_kernel(part_val_ptr, part_idx_ptr, part_ml_ptr, bias_ptr, ids_ptr, val_ptr, idx_ptr, NB,
                               TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDS: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_NB: tl.constexpr):
    """One row: log-softmax normaliser over the slices, and the TOPK best of the slices' candidates
    (stored slice by slice in vocabulary order, so ties still go to the lowest index), plus the
    row's bias; with HAS_IDS, each index i stored as ids[i] (the token id of weight row i)."""
    row = tl.program_id(0)
    b = tl.arange(0, BLOCK_NB)
    b_ok = b < NB
    mx = tl.load(part_ml_ptr + (row * NB + b) * 2, mask=b_ok, other=float("-inf"))
    se = tl.load(part_ml_ptr + (row * NB + b) * 2 + 1, mask=b_ok, other=0.0)
    top = tl.max(mx, axis=0)
    lse = top + tl.log(tl.sum(se * tl.exp(mx - top), axis=0))
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + row)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < NB * TOPK
    vals = tl.load(part_val_ptr + row * NB * TOPK + c, mask=c_ok, other=float("-inf"))
    for t in tl.static_range(TOPK):
        best = tl.argmax(vals, axis=0, tie_break_left=True)
        tl.store(val_ptr + row * TOPK + t, bias + (tl.max(vals, axis=0) - lse))
        idx = tl.load(part_idx_ptr + row * NB * TOPK + best).to(tl.int64)
        if HAS_IDS:
            idx = tl.load(ids_ptr + idx)
        tl.store(idx_ptr + row * TOPK + t, idx)
        vals = tl.where(c == best, float("-inf"), vals)


@triton.jit
def eagle_frontier_kernel(cand_score_ptr, cand_tok_ptr, ids_ptr, feat_ptr, anc_ptr,
                          parent_ptr, id_ptr, tok_ptr, score_ptr, feat_out_ptr, anc_out_ptr, start, H, S,
                          K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    """One EAGLE tree level's bookkeeping in one program: candidate c (K x K, row-major: parent row
    c // K) gets parent ids[c // K]; the K best candidates (best first, ties to the lowest index)
    become the next frontier: their node numbers (start + c), tokens, scores, and their parent
    rows' features [K, H] and ancestor flags [K, S]."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < K * K
    tl.store(parent_ptr + c, tl.load(ids_ptr + c // K, mask=c_ok), mask=c_ok)
    vals = tl.load(cand_score_ptr + c, mask=c_ok, other=float("-inf"))
    r = tl.arange(0, BLOCK_K)
    best = tl.zeros([BLOCK_K], dtype=tl.int32)
    for t in tl.static_range(K):
        b = tl.argmax(vals, axis=0, tie_break_left=True)
        best = tl.where(r == t, b, best)
        vals = tl.where(c == b, float("-inf"), vals)
    r_ok = r < K
    tl.store(id_ptr + r, (best + start).to(tl.int64), mask=r_ok)
    tl.store(tok_ptr + r, tl.load(cand_tok_ptr + best, mask=r_ok), mask=r_ok)
    tl.store(score_ptr + r, tl.load(cand_score_ptr + best, mask=r_ok), mask=r_ok)
    rows = best // K
    h = tl.arange(0, BLOCK_H)
    m = r_ok[:, None] & (h[None, :] < H)
    tl.store(feat_out_ptr + r[:, None] * H + h[None, :], tl.load(feat_ptr + rows[:, None] * H + h[None, :], mask=m), mask=m)
    s = tl.arange(0, BLOCK_S)
    m = r_ok[:, None] & (s[None, :] < S)
    tl.store(anc_out_ptr + r[:, None] * S + s[None, :], tl.load(anc_ptr + rows[:, None] * S + s[None, :], mask=m), mask=m)


@triton.jit(do_not_specialize=["n"])
def tree_accept_kernel(tok_ptr, par_ptr, target_ptr, pc_ptr, u_ptr, out_ptr, n, SAMPLED: tl.constexpr,
                       BLOCK: tl.constexpr):
    """A verdict over a token tree of n nodes (a chain: parents i - 1) in one program: from the pending
    token (node -1), step to the lowest-index child that is accepted while one is; then the token after.

    Greedy: child c is accepted iff its token is target[parents[c] + 1], the target's argmax after its
    parent; the token after node m (-1: the pending token) is target[m + 1]. Sampled, point-mass children
    (verify.py's `_verify_point_tree`): a child whose token an earlier sibling holds is skipped; child c
    is accepted iff pc[c] > 0 and u[c] * (1 - removed) < pc[c], removed = the pc of its earlier siblings
    not skipped (all rejected when c is tried), in float64; target[m + 1] is then the token recovered at m.

    Writes out (int64): [0] c = accepted nodes + 1 (committed positions), [1] c - 1, [2 + j] the target
    row of committed position j (0 = the pending token, 1 + node), [2 + BLOCK + j] the token after it,
    [2 + 2 BLOCK + i] parents[i]; rows and tokens past c are 0."""
    i = tl.arange(0, BLOCK)
    ok = i < n
    toks = tl.load(tok_ptr + i, mask=ok, other=-1)
    pars = tl.load(par_ptr + i, mask=ok, other=-2)
    after_node = tl.load(target_ptr + 1 + i, mask=ok, other=0)  # the token after node i, if it is reached
    if SAMPLED:
        pc = tl.load(pc_ptr + i, mask=ok, other=0.0).to(tl.float64)
        u = tl.load(u_ptr + i, mask=ok, other=1.0).to(tl.float64)
        sib = (pars[:, None] == pars[None, :]) & (i[:, None] < i[None, :]) & ok[:, None]  # [j, c]: j an earlier sibling of c
        dup = tl.max(tl.where(sib & (toks[:, None] == toks[None, :]), 1, 0), axis=0) > 0  # [c]
        removed = tl.sum(tl.where(sib & (dup[:, None] == 0), pc[:, None], 0.0), axis=0)  # [c]
        accepted = ok & (dup == 0) & (pc > 0.0) & (u * (1.0 - removed) < pc)
    else:
        want_at = tl.load(target_ptr + 1 + pars, mask=ok, other=-1)  # the target's choice after c's parent
        accepted = ok & (toks == want_at)
    want = tl.load(target_ptr)
    zero = want * 0
    node, count, done = zero - 1, zero, zero
    rows = tl.zeros([BLOCK], dtype=tl.int64)
    after = tl.zeros([BLOCK], dtype=tl.int64)
    for _ in range(0, n + 1):  # a path of at most n nodes, then the token after it
        first = tl.min(tl.where((pars == node) & accepted, i, BLOCK), axis=0).to(tl.int64)
        found = (first < BLOCK) & (done == 0)
        here = (i == count) & (done == 0)
        rows = tl.where(here, node + 1, rows)
        after = tl.where(here, tl.where(found, tl.sum(tl.where(i == first, toks, 0), axis=0), want), after)
        count = tl.where(done == 0, count + 1, count)
        want = tl.where(found, tl.sum(tl.where(i == first, after_node, 0), axis=0), want)
        node = tl.where(found, first, node)
        done = tl.where(found, done, 1)
    tl.store(out_ptr, count)
    tl.store(out_ptr + 1, count - 1)
    tl.store(out_ptr + 2 + i, rows)
    tl.store(out_ptr + 2 + BLOCK + i, after)
    tl.store(out_ptr + 2 + 2 * BLOCK + i, pars, mask=ok)


@triton.jit(do_not_specialize=["q"])
def tree_ancestry_kernel(par_ptr, anc_ptr, depth_ptr, q, anc_stride, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """tree.ancestor_matrix in one program: anc[i, j] = j is i or an ancestor of i (parents: [q], -1 outside
    the tree), by pointer jumping on [BLOCK, BLOCK] 0/1 matrices, each round's row gather a one-hot matrix
    product (exact: 0/1 half-precision inputs, sums of at most BLOCK); and depth[i] = ancestors below i."""
    r = tl.arange(0, BLOCK)
    ok = r < q
    par = tl.load(par_ptr + r, mask=ok, other=-1)
    jump = tl.where(par < 0, BLOCK, par)  # BLOCK: outside the tree, no row
    anc = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(tl.float16)
    for _ in tl.static_range(ROUNDS):
        hit = jump[:, None] == r[None, :]  # [i, k]: k is the node i points at
        anc = tl.minimum(anc.to(tl.float32) + tl.dot(tl.where(hit, 1.0, 0.0).to(tl.float16), anc), 1.0).to(tl.float16)
        jump = tl.sum(tl.where(hit, jump[None, :], 0), axis=1) + tl.where(jump >= BLOCK, BLOCK, 0)
    flags = anc.to(tl.float32)
    tl.store(anc_ptr + r[:, None] * anc_stride + r[None, :], (flags > 0.0).to(tl.uint8), mask=ok[:, None] & ok[None, :])
    tl.store(depth_ptr + r, (tl.sum(flags, axis=1) - 1.0).to(tl.int64), mask=ok)


@triton.jit(do_not_specialize=["n"])
def best_nodes_kernel(tok_ptr, score_ptr, parent_ptr, renumber_ptr, out_ptr, n, size, BLOCK: tl.constexpr,
                      CHUNK: tl.constexpr):
    """tree.best_nodes in one program: node i's key is score[i] - i * 1e-9 (float64); the `size` best keys
    (every other key's rank counted chunk by chunk) are kept in index order, each renumbered by the kept
    nodes before it. out: [2, size] int64 (tokens, renumbered parents; -1 stays -1); renumber: [BLOCK]
    int64 scratch, written then read back for the parents (after a barrier: one program)."""
    i = tl.arange(0, BLOCK)
    ok = i < n
    key = tl.load(score_ptr + i, mask=ok, other=0.0).to(tl.float64) - i.to(tl.float64) * 1e-9
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(0, n, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        kj = tl.load(score_ptr + j, mask=j < n, other=0.0).to(tl.float64) - j.to(tl.float64) * 1e-9
        rank += tl.sum(((kj[None, :] > key[:, None]) & (j[None, :] < n)).to(tl.int32), axis=1)
    kept = ok & (rank < size)
    new = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # [BLOCK] the position of each kept node
    tl.store(renumber_ptr + i, new.to(tl.int64), mask=ok)
    tl.debug_barrier()
    par = tl.load(parent_ptr + i, mask=kept, other=-1)
    new_par = tl.load(renumber_ptr + tl.maximum(par, 0), mask=kept & (par >= 0), other=-1)
    tl.store(out_ptr + new, tl.load(tok_ptr + i, mask=kept, other=0), mask=kept)
    tl.store(out_ptr + size + new, tl.where(par >= 0, new_par, -1), mask=kept)


@triton.jit(do_not_specialize=["M"])
def eagle_input_kernel(feat_ptr, tok_ptr, emb_ptr, w_ptr, b_ptr, out_ptr, M, N, H,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """[feat | emb[tok]] @ wᵀ + b for w [N, 2H]: the two halves of the input read in place, no concatenation."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, 2 * H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_feat, in_emb = ks < H, (ks >= H) & (ks < 2 * H)
        x = tl.load(feat_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & in_feat[None, :], other=0.0)
        x += tl.load(emb_ptr + tok[:, None] * H + (ks - H)[None, :], mask=row_ok[:, None] & in_emb[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * (2 * H) + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < 2 * H), other=0.0)
        acc = _dot(x, tl.trans(w), acc, IEEE)
    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def tree_level_mask_kernel(anc_ptr, own_ptr, fed_ptr, anc_out_ptr, allowed_ptr, S, kv_len,
                           BLOCK_S: tl.constexpr, BLOCK_KV: tl.constexpr):
    """Row i of an EAGLE tree level (one program): its ancestor-or-self flags over the scratch slots
    [S] (anc | own), and which of kv_len cache positions it attends to: every committed one (< fed),
    and scratch slot s (position fed + s) where it flags s."""
    i = tl.program_id(0)
    fed = tl.load(fed_ptr)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < S
    flags = tl.load(anc_ptr + i * S + s, mask=s_ok, other=0) | tl.load(own_ptr + i * S + s, mask=s_ok, other=0)
    tl.store(anc_out_ptr + i * S + s, flags, mask=s_ok)
    for j0 in range(0, kv_len, BLOCK_KV):
        j = j0 + tl.arange(0, BLOCK_KV)
        t = j - fed
        in_tree = (t >= 0) & (t < S)
        f = tl.load(anc_ptr + i * S + t, mask=in_tree, other=0) | tl.load(own_ptr + i * S + t, mask=in_tree, other=0)
        tl.store(allowed_ptr + i * kv_len + j, ((j < fed) | (in_tree & (f != 0))).to(tl.uint8), mask=j < kv_len)
