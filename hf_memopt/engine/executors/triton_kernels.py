"""The Triton kernels of the "triton" executor (SPEC section 2): norms, decisions, aggregate and admission.

Imported only when the executor runs (importing Triton takes a second). Every kernel reads its tensors
through *pointer tables*: int64 tensors of addresses, one row per unit, so one launch serves every
tensor of a step, whatever their number (like torch's ``MultiTensorApply``). Work is cut into
*chunks* of :data:`CHUNK` elements of one unit (the CPU kernel's chunking); a chunk map lists
``(unit, start, end)`` per chunk.

1. :func:`norm_partials` (one program per chunk): the chunk's sum of squares of g in fp64, written to
   the chunk's own slot (no atomics: deterministic), and the largest ``|x|`` of the value x that would
   be stored (g, or the momentum under Critical Momenta), a NaN counting as infinite;
2. :func:`unit_sums` (one program per unit): the unit's chunk partials summed in fixed blocks of
   chunks, in chunk order;
3. :func:`decide` (one program per param group): SPEC 1 steps 1, 3 and 5 for every unit of the group
   that has a gradient, the transcription of :func:`hf_memopt.engine.rule.decide` and
   :func:`~hf_memopt.engine.rule.commit` (the coefficients of step 2 come from a table the host
   builds once with :func:`~hf_memopt.engine.rule.coefficients`); it updates the ledger on the device
   and counts admissions;
4. :func:`apply` (one program per chunk): step 2's aggregate ``a = coef_g x + coef_s S`` (written to
   the aggregate buffer, or for Adam/AdamW fed to their update in the same pass), and the admission:
   ``S -= evicted``, slot <- x (cast to the buffer dtype), ``S += slot``, or on a refresh step S
   rebuilt from the slots in slot order.

Exactness notes: fp32->bf16 casts round by hand (:func:`_bf16_rn`: Triton's interpreter truncates);
the aggregate uses an explicit FMA, as torch's ``add_(S, alpha=cs)`` does on CPU; within a chunk the
fp64 sum is a fixed tree (the C kernel uses 16 sequential lanes), so fp64 norms may differ from the
"torch"/"cpu" executors' in their last bits, which the rounding of priorities to fp32 hides except
when an fp64 value lies within about 1e-16 (relative) of an fp32 rounding boundary.

Compiled for a GPU, the kernels round differently from the interpreter in one way: Triton contracts a
multiply followed by an add into one FMA (the executor passes ``enable_fp_fusion=True``, Triton's
default up to 3.9, explicitly: 3.10 turns it off by default). Adam's ``v beta2 + (1 - beta2) a a`` and
its step ``p + neg_step_size * m / denom``, and the fp64 ``acc += g g`` of the norms, round once there and
twice under the interpreter (and in torch's CPU code). Decisions depend on fp32 priorities, which
absorb the fp64 difference; parameters differ in their last bits. So the interpreter tests compare
decisions, slots and S exactly and parameters to a tolerance (1e-6 relative), and the CUDA tests
(``tests/test_triton_cuda.py``) hold the compiled kernels to the "torch" executor the same way.
Triton 3.6's interpreter also rounds an explicit ``tl.fma`` twice (3.9's rounds it once, as the GPU).

Vector loads and stores: every per-element loop runs in one of two copies, chosen per chunk in the
kernel from the addresses it reads (so no table can go stale): where all are 16-byte aligned and the
chunk's end is a multiple of :data:`VEC` elements, with ``tl.multiple_of`` hints that let the compiler
emit 16-byte accesses (``ld.global.v4.b32``); otherwise the scalar copy (a view or segment at an odd
offset). ``tests/test_triton_compile.py`` checks the PTX and both copies' results.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import rule

#: elements per chunk (as the CPU kernel's ``CHUNK``)
CHUNK = rule.CHUNK
#: elements per inner iteration of a chunk
BLOCK = 1024
#: elements per inner iteration of ``apply`` with its Adam update: the update holds six values per
#: element (x, S, p, m, v, max v); at 1024 it took 195 registers on sm_90, at 512 (and 32-bit offsets
#: within a chunk) 70-90, with 16-byte accesses still (4 fp32 values per thread at 4 warps)
ADAM_BLOCK = 512
#: the register budget ``apply`` is compiled with (its ``maxnreg``). It needs 48-90; without a budget,
#: ptxas 13 under Triton 3.9's ``--regAllocOptLevel=2`` spilled 8-16 bytes at 48-72 registers in some
#: variants (sm_90), and with one it allocates without spilling (tests/test_triton_compile.py)
APPLY_MAXNREG = 128
#: chunk partials per iteration of :func:`unit_sums`
SUM_BLOCK = 256
#: bytes: the alignment of a 16-byte vector load or store
ALIGN = tl.constexpr(16)
#: elements: a chunk whose end is a multiple of this (8 two-byte or 4 four-byte values: 16 bytes) can be
#: read in vectors without a partial vector at its end
VEC = tl.constexpr(8)
#: elements of the [units, topc] ledger tile that ``decide`` holds at once (8 per thread at 4 warps): the
#: widest tile (128 units, topc 20 -> 32 columns) used 255 registers and spilled
DECIDE_TILE = tl.constexpr(1024)

# What ``decide`` tells ``apply`` to do with a unit's value. ``tl.constexpr``: a plain module-level int
# runs under the interpreter but does not compile for a GPU ("Cannot access global variable ... from
# within @jit'ed function").
MODE_NONE = tl.constexpr(rule.MODE_NONE)
MODE_FILL = tl.constexpr(rule.MODE_FILL)
MODE_EVICT = tl.constexpr(rule.MODE_EVICT)


@triton.jit
def _bf16_rn(x):
    """fp32 -> bf16, rounding to nearest even (the interpreter's own cast truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where(x != x, b | 0x400000, r)  # a NaN stays a (quiet) NaN
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cast(x, DT: tl.constexpr):
    """fp32 ``x`` as ``DT``, rounded to nearest even."""
    if DT == tl.bfloat16:
        return _bf16_rn(x)
    else:
        return x.to(DT)


@triton.jit
def _aligned(n, VEC: tl.constexpr):
    """``n`` (an int the caller tested to be a multiple of ``VEC``) as a value the compiler knows to be one.

    ``n & -VEC`` equals ``n`` there, and is a new value: a hint put on ``n`` itself would hold for every
    use of it, the unaligned path's included (``tl.multiple_of`` annotates the operation that defines
    its input)."""
    return tl.multiple_of(n & -VEC, VEC)


@triton.jit
def _aligned_ptr(addr, DT: tl.constexpr):
    """The address ``addr`` (tested to be 16-byte aligned) as a pointer to ``DT`` known to be aligned (a
    hint on the integer is lost in the cast to a pointer)."""
    return tl.multiple_of((addr & -ALIGN).to(tl.pointer_type(DT)), ALIGN)


@triton.jit
def _partials(g, x, lo, hi, SAME: tl.constexpr, BLOCK: tl.constexpr):
    """The fp64 sum of g*g over elements ``lo .. hi`` and the largest |x| (a NaN counting as inf)."""
    g = g + lo  # 64-bit arithmetic once; 32-bit offsets within the chunk (fewer registers per element)
    x = x + lo
    n = (hi - lo).to(tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    mx = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < n
        gv = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
        gd = gv.to(tl.float64)
        acc += gd * gd
        if SAME:
            a = tl.abs(gv)
        else:
            a = tl.abs(tl.load(x + offs, mask=m, other=0.0).to(tl.float32))
        a = tl.where(a == a, a, float("inf"))
        mx = tl.maximum(mx, a)
    return tl.sum(acc, 0), tl.max(mx, 0)


@triton.jit(do_not_specialize=["chunk0"])
def norm_partials(
    g_ptrs,
    x_ptrs,
    chunk_unit,
    chunk_lo,
    chunk_hi,
    part_sq,
    part_max,
    chunk0,
    G_DT: tl.constexpr,
    X_DT: tl.constexpr,
    SAME: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per chunk: fp64 sum of g*g, and the largest |x| (inf where x is not finite).

    Vector loads (16 bytes) where every address of the chunk is 16-byte aligned and its end a multiple of
    :data:`VEC` elements (tested here, per chunk: what is true of nearly every tensor of a model), scalar
    loads otherwise (a segment or view that starts at an odd offset)."""
    c = chunk0 + tl.program_id(0)
    u = tl.load(chunk_unit + c)
    lo = tl.load(chunk_lo + c)
    hi = tl.load(chunk_hi + c)
    ga = tl.load(g_ptrs + u)
    xa = tl.load(x_ptrs + u)
    if ((ga | xa) % ALIGN == 0) & (hi % VEC == 0):  # lo: a multiple of CHUNK
        g = _aligned_ptr(ga, G_DT)
        x = _aligned_ptr(xa, X_DT)
        sq, mx = _partials(g, x, _aligned(lo, VEC), _aligned(hi, VEC), SAME, BLOCK)
    else:
        sq, mx = _partials(ga.to(tl.pointer_type(G_DT)), xa.to(tl.pointer_type(X_DT)), lo, hi, SAME, BLOCK)
    tl.store(part_sq + c, sq)
    tl.store(part_max + c, mx)


@triton.jit
def unit_sums(part_sq, part_max, unit_chunk0, unit_chunks, unit_sq, unit_max, SUM_BLOCK: tl.constexpr):
    """Per unit: its chunks' partial sums of squares added in chunk order (blocks of SUM_BLOCK), and their max."""
    u = tl.program_id(0)
    c0 = tl.load(unit_chunk0 + u)
    n = tl.load(unit_chunks + u)
    acc = tl.zeros([SUM_BLOCK], dtype=tl.float64)
    mx = tl.zeros([SUM_BLOCK], dtype=tl.float32)
    for s in range(0, n, SUM_BLOCK):
        offs = s + tl.arange(0, SUM_BLOCK)
        m = offs < n
        acc += tl.load(part_sq + c0 + offs, mask=m, other=0.0)
        mx = tl.maximum(mx, tl.load(part_max + c0 + offs, mask=m, other=0.0))
    tl.store(unit_sq + u, tl.sum(acc, 0))
    tl.store(unit_max + u, tl.max(mx, 0))


@triton.jit(do_not_specialize=["u0", "n_units", "topc"])
def decide(
    unit_sq,
    unit_max,
    u0,
    n_units,
    rows,
    pri,
    at,
    count,
    clock,
    coef_g,
    coef_s,
    dec_cg,
    dec_cs,
    dec_mode,
    dec_slot,
    dec_refresh,
    dec_count,
    stats,
    topc,
    thr,
    decay,
    REFRESH: tl.constexpr,
    KEY_GROUP: tl.constexpr,
    CHECK_CAST: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """SPEC 1 for the units ``u0 .. u0 + n_units`` of one param group (see :func:`hf_memopt.engine.rule.decide`).

    ``unit_sq``: fp64 squared norms (full-tensor ones under sharding); ``rows``: each unit's row in the
    group's ledger tables ``pri``/``at`` [R, topc], ``count``/``clock`` [R]; ``coef_g``/``coef_s``:
    the aggregation coefficients by count of stored values; ``thr``: the smallest fp32 magnitude that
    is not finite in the buffer dtype (``CHECK_CAST``: applied here; under a reducer it was folded into
    ``unit_sq`` before the collective, so that every rank decides alike).
    """
    cols = tl.arange(0, BLOCK_C)
    in_c = cols < topc
    if KEY_GROUP:  # one priority per group: the sum of the units' norms
        tot = tl.zeros([BLOCK_U], dtype=tl.float64)
        for s in range(0, n_units, BLOCK_U):
            offs = s + tl.arange(0, BLOCK_U)
            m = offs < n_units
            tot += tl.where(m, tl.sqrt(tl.load(unit_sq + u0 + offs, mask=m, other=0.0)), 0.0)
        group_k = tl.sum(tot, 0)
    # the ledger tile of TILE_U units at a time: at most DECIDE_TILE elements (in registers, no spills)
    TILE_U: tl.constexpr = BLOCK_U // ((BLOCK_U * BLOCK_C + DECIDE_TILE - 1) // DECIDE_TILE)
    admitted = tl.zeros([TILE_U], dtype=tl.int64)
    for s in range(0, n_units, TILE_U):
        offs = s + tl.arange(0, TILE_U)
        m = offs < n_units
        u = u0 + offs
        if KEY_GROUP:
            k = tl.zeros([TILE_U], dtype=tl.float64) + group_k
        else:
            k = tl.sqrt(tl.load(unit_sq + u, mask=m, other=0.0))
        k32 = k.to(tl.float32)  # reduced in fp64, rounded to fp32 before the finiteness test (SPEC 1.3)
        storable = (k32 == k32) & (tl.abs(k32) < float("inf"))
        if CHECK_CAST:
            storable = storable & (tl.load(unit_max + u, mask=m, other=0.0) < thr)
        row = tl.load(rows + offs, mask=m, other=0)
        # clamped: a count edited in place outside [0, topc] would index slots and coefficients that do not
        # exist (the host executors raise on it; this one cannot read it without a synchronisation)
        n = tl.minimum(tl.maximum(tl.load(count + row, mask=m, other=0), 0), topc)
        clk = tl.load(clock + row, mask=m, other=0)
        grid2 = m[:, None] & in_c[None, :]
        p = tl.load(pri + row[:, None] * topc + cols[None, :], mask=grid2, other=float("inf"))
        low = tl.min(p, 1)
        j = tl.min(tl.where(p == low[:, None], cols[None, :], BLOCK_C), 1)  # the lowest slot on ties
        fill = storable & (n < topc)
        evict = storable & (n >= topc) & (k32 > low)  # strictly greater than the true minimum
        mode = tl.where(fill, MODE_FILL, tl.where(evict, MODE_EVICT, MODE_NONE))
        slot = tl.where(fill, n, tl.where(evict, j.to(tl.int64), -1))
        count_after = n + fill.to(tl.int64)
        clock_after = clk + 1
        refresh = (count_after > 0) & (clock_after % REFRESH == 0)
        cg = tl.load(coef_g + n, mask=m, other=1.0)
        cs = tl.load(coef_s + n, mask=m, other=0.0)
        # SPEC 1.5 (rule.commit): record the admission, then age every stored priority
        write = (mode != MODE_NONE)[:, None] & (cols[None, :] == slot[:, None])
        p = tl.where(write, k32[:, None], p)
        p = tl.where(cols[None, :] < count_after[:, None], p * decay, p)
        tl.store(pri + row[:, None] * topc + cols[None, :], p, mask=grid2)
        tl.store(at + row * topc + tl.maximum(slot, 0), clock_after, mask=m & (mode != MODE_NONE))  # the written slot
        tl.store(count + row, count_after, mask=m)
        tl.store(clock + row, clock_after, mask=m)
        tl.store(dec_cg + u, cg, mask=m)
        tl.store(dec_cs + u, cs, mask=m)
        tl.store(dec_mode + u, mode.to(tl.int32), mask=m)
        tl.store(dec_slot + u, slot, mask=m)
        tl.store(dec_refresh + u, refresh.to(tl.int32), mask=m)
        tl.store(dec_count + u, count_after, mask=m)
        admitted += tl.where(m & (mode != MODE_NONE), 1, 0)
    took = tl.sum(admitted, 0)
    tl.store(stats + 0, tl.load(stats + 0) + took)
    tl.store(stats + 1, tl.load(stats + 1) + n_units - took)


@triton.jit(do_not_specialize=["chunk0", "slot_stride"])
def apply(
    x_ptrs,
    unit_s,
    unit_slots,
    unit_a,
    a_base,
    chunk_unit,
    chunk_lo,
    chunk_hi,
    chunk0,
    dec_cg,
    dec_cs,
    dec_mode,
    dec_slot,
    dec_refresh,
    dec_count,
    slot_stride,
    unit_adam,
    p_scale,
    wd,
    lerp_w,
    beta2,
    one_minus_beta2,
    bc2_sqrt,
    eps,
    neg_step_size,
    X_DT: tl.constexpr,
    SLOT_DT: tl.constexpr,
    ADAM: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per chunk: the aggregate, then admission or refresh (SPEC 1 steps 2-3), and with ``ADAM`` the
    Adam/AdamW update on the aggregate in the same pass (SPEC 1 step 4; fp32 tensors).

    ``x_ptrs``: the values aggregated and stored (g, or m under Critical Momenta); ``unit_s``: the
    running sums S (fp32); ``unit_slots`` [U, slot_stride]: the slots. Without ``ADAM`` the aggregate
    is written at ``a_base + unit_a[u]`` for the base optimizer's own update. With it, ``unit_adam``
    [U, 4] holds each unit's p, exp_avg, exp_avg_sq and max_exp_avg_sq addresses and the update is
    torch's single-tensor Adam(W) step, op for op: ``p *= p_scale`` (decoupled decay) or ``a += wd p``,
    ``m = lerp(m, a, lerp_w)``, ``v = v beta2 + (1 - beta2) a a``, ``denom = sqrt(v) / bc2_sqrt + eps``,
    ``p += neg_step_size * m / denom`` (the bias corrections come from the host's step count). Compiled
    for a GPU, Triton contracts a multiply followed by an add into one FMA (``v beta2 + ...`` and the
    step's ``p + neg_step_size * ...``; ``enable_fp_fusion``, on by default up to Triton 3.9 and passed
    explicitly by the executor), so there the update rounds once where torch's CPU code rounds twice: the
    interpreter tests hold decisions, slots and S exact and parameters to a tolerance of an ulp or so.

    Vector loads and stores where every address of the chunk is 16-byte aligned (as in
    :func:`norm_partials`); scalar ones otherwise.
    """
    c = chunk0 + tl.program_id(0)
    u = tl.load(chunk_unit + c)
    lo = tl.load(chunk_lo + c)
    hi = tl.load(chunk_hi + c)
    xa = tl.load(x_ptrs + u)
    sa = tl.load(unit_s + u)
    ao = tl.load(unit_a + u)  # elements into the aggregate buffer
    cg = tl.load(dec_cg + u)
    cs = tl.load(dec_cs + u)
    mode = tl.load(dec_mode + u)
    slot = tl.load(dec_slot + u)
    refresh = tl.load(dec_refresh + u)
    filled = tl.load(dec_count + u)
    da = tl.load(unit_slots + u * slot_stride + tl.maximum(slot, 0))
    ors = xa | sa | da
    pa = xa  # Adam's p, m, v and max v: read only with ADAM
    ma = xa
    va = xa
    wa = xa
    if ADAM:
        pa = tl.load(unit_adam + u * 4)
        ma = tl.load(unit_adam + u * 4 + 1)
        va = tl.load(unit_adam + u * 4 + 2)
        wa = tl.load(unit_adam + u * 4 + 3)
        ors = ors | pa | ma | va | wa
    # the aggregate buffer itself is aligned (a fresh allocation; Triton specialises on it): its offset tells
    if (ors % ALIGN == 0) & (ao % VEC == 0) & (hi % VEC == 0):
        _apply_range(
            _aligned_ptr(xa, X_DT),
            _aligned_ptr(sa, tl.float32),
            a_base + _aligned(ao, VEC),
            _aligned_ptr(da, SLOT_DT),
            _aligned_ptr(pa, tl.float32),
            _aligned_ptr(ma, tl.float32),
            _aligned_ptr(va, tl.float32),
            _aligned_ptr(wa, tl.float32),
            _aligned(lo, VEC),
            _aligned(hi, VEC),
            unit_slots + u * slot_stride,
            cg,
            cs,
            mode,
            refresh,
            filled,
            p_scale,
            wd,
            lerp_w,
            beta2,
            one_minus_beta2,
            bc2_sqrt,
            eps,
            neg_step_size,
            X_DT,
            SLOT_DT,
            ADAM,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
            BLOCK,
        )
    else:
        _apply_range(
            xa.to(tl.pointer_type(X_DT)),
            sa.to(tl.pointer_type(tl.float32)),
            a_base + ao,
            da.to(tl.pointer_type(SLOT_DT)),
            pa.to(tl.pointer_type(tl.float32)),
            ma.to(tl.pointer_type(tl.float32)),
            va.to(tl.pointer_type(tl.float32)),
            wa.to(tl.pointer_type(tl.float32)),
            lo,
            hi,
            unit_slots + u * slot_stride,
            cg,
            cs,
            mode,
            refresh,
            filled,
            p_scale,
            wd,
            lerp_w,
            beta2,
            one_minus_beta2,
            bc2_sqrt,
            eps,
            neg_step_size,
            X_DT,
            SLOT_DT,
            ADAM,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
            BLOCK,
        )


@triton.jit
def _apply_range(
    x,
    sp,
    a,
    dst,
    pp,
    mp,
    vp,
    wp,
    lo,
    hi,
    slots,
    cg,
    cs,
    mode,
    refresh,
    filled,
    p_scale,
    wd,
    lerp_w,
    beta2,
    one_minus_beta2,
    bc2_sqrt,
    eps,
    neg_step_size,
    X_DT: tl.constexpr,
    SLOT_DT: tl.constexpr,
    ADAM: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """:func:`apply` over the elements ``lo .. hi`` of one unit (``slots``: its row of slot addresses)."""
    # 64-bit arithmetic once per pointer; 32-bit offsets within the chunk (fewer registers per element)
    x = x + lo
    sp = sp + lo
    a = a + lo
    dst = dst + lo
    if ADAM:
        pp = pp + lo
        mp = mp + lo
        vp = vp + lo
        wp = wp + lo
    n = (hi - lo).to(tl.int32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < n
        xv = tl.load(x + offs, mask=m, other=0.0)
        x32 = xv.to(tl.float32)
        sv = tl.load(sp + offs, mask=m, other=0.0)
        scaled = x32 * cg
        agg = tl.where(cs != 0.0, tl.fma(sv, cs, scaled), scaled)  # torch's add_(S, alpha=cs) is an FMA
        if ADAM:
            if MAXIMIZE:
                grad = -agg
            else:
                grad = agg
            pv = tl.load(pp + offs, mask=m, other=0.0)
            if DECOUPLED:
                pv = pv * p_scale
            else:
                grad = tl.fma(pv, wd, grad)  # grad.add(param, alpha=wd)
            mv = tl.load(mp + offs, mask=m, other=0.0)
            mv = tl.fma(lerp_w, grad - mv, mv)  # lerp(m, grad, w) for w < 0.5
            vv = tl.load(vp + offs, mask=m, other=0.0)
            vv = vv * beta2 + one_minus_beta2 * grad * grad  # compiled: one FMA (see apply)
            tl.store(mp + offs, mv, mask=m)
            tl.store(vp + offs, vv, mask=m)
            if AMSGRAD:
                vv = tl.maximum(tl.load(wp + offs, mask=m, other=0.0), vv)
                tl.store(wp + offs, vv, mask=m)
            denom = tl.div_rn(tl.sqrt_rn(vv), bc2_sqrt) + eps
            pv = pv + neg_step_size * tl.div_rn(mv, denom)  # compiled: one FMA (see apply)
            tl.store(pp + offs, pv, mask=m)
        else:
            tl.store(a + offs, _cast(agg, X_DT), mask=m)
        if mode != MODE_NONE:
            if X_DT == SLOT_DT:
                kept = xv
            else:
                kept = _cast(x32, SLOT_DT)
            if refresh == 0:
                if mode == MODE_EVICT:
                    sv = sv - tl.load(dst + offs, mask=m, other=0.0).to(tl.float32)
                sv = sv + kept.to(tl.float32)
                tl.store(sp + offs, sv, mask=m)
            tl.store(dst + offs, kept, mask=m)
    if refresh != 0:  # S rebuilt exactly from the filled slots, in slot order (after this step's write)
        # a pass of its own (one step in REFRESH): inside the loop above it cost registers and spills
        tl.debug_barrier()
        first = tl.load(slots).to(tl.pointer_type(SLOT_DT)) + lo
        for s in range(0, n, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            m = offs < n
            total = tl.load(first + offs, mask=m, other=0.0).to(tl.float32)
            for i in range(1, filled):
                src = tl.load(slots + i).to(tl.pointer_type(SLOT_DT)) + lo
                total = total + tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(sp + offs, total, mask=m)
