"""GSA attention core as Pallas (Triton) kernels that gather the selected keys in-kernel.

Contract (the same as reference.attend and api.flash_attention):
  q, k, v [B, T, H, D], selection int32 [B, T, K] (row t: the key positions query t attends,
  -1 = empty slot; one selection shared by all heads) -> o [B, T, H, D] in q's dtype,
  o[b, t, h] = softmax_j(q . k_j / sqrt(D)) v_j over the keys j of row t only.
Differentiable in q, k, v (jax.custom_vjp); the selection gets no gradient. A key listed twice
in one row counts once (the "flash" / "dense_masked" semantics; the indexer's top-k never
repeats a key).

Layout of the work: the selection is turned (plain JAX, one sort) into compressed lists.
  * forward / dQ: queries are grouped in blocks of BQ consecutive queries; each block gets the
    UNION of its queries' selected keys (distinct key positions, ascending) and, per union key,
    a BQ-bit mask (bit i: query i of the block selected it). A kernel program (query block, b,
    head) loops over its union list in chunks of BK keys: it gathers the BK rows of K and V by
    index (`k_ref[cols, :]`, one 2*D-byte row per key), computes the dense [BQ, BK] logits
    Q_blk K_c^T on the tensor cores, masks them with the bits and runs an online softmax in
    float32 (forward: o and the log-sum-exp per (query, head); dQ: recomputes p from the LSE,
    ds = p (dO V^T - delta), dq += ds K_c).
  * dK / dV: the TRANSPOSED selection in the same form: keys in blocks of BKB keys (consecutive
    in key_order(): keys grouped by how many queries select them, then by position), each block
    with the union of the queries that selected any of its keys and a BKB-bit mask per query.
    A program (key block, b, head) holds K_blk, V_blk and dK, dV [BKB, D] in registers and
    loops over its query list in chunks of BQC, gathering q, dO rows and the LSE / delta
    entries. Deterministic: no atomics, every dK / dV row is written once.
  The lists are CSR arrays (offsets per block into flat [B, T*K] positions and
  [B, words * T*K] int32 mask words, words = block / 32 rounded up) built by one sort of the
  (block, position) pairs: O(T K log) integer work, shared by all heads.
Grid order: Pallas' first grid axis is CUDA's x (fastest-varying in launch order), so the grid
is (blocks, B, H): programs running at the same time share one (b, head), whose K and V
(2 x T x D x 2 B = 8 MiB at T = 8192, D = 256) stay in the 50 MB L2.

Why dense [BQ, BK] tiles over a union instead of a per-query gather: the tensor cores need a
tile of queries that all see the same keys. A union tile computes BQ logits per gathered key
of which (without overlap between neighbouring queries' selections) one is used: FLOPs grow
BQ-fold, bytes do not. Where neighbouring queries share keys (sinks, local context: the usual
indexer behaviour), each shared key is gathered once per block instead of once per query, so
bytes shrink by the overlap factor. Broadcast-multiply-reduce on the CUDA cores would avoid the
FLOP waste but not the bytes, and is slower than the tensor cores at these sizes.

Cost model. Every list entry costs, per head, one gathered pair of 512-byte rows (K and V for
the forward and dQ, q and dO for dK/dV) read from L2 (a head's K and V, 8 MiB at T = 8192,
D = 256, stay in the 50 MB L2 while its programs run: HBM sees them ~once), and 4 x block x D
FLOPs per dot pair of the dense masked tile (forward 2 dots, dQ 3, dK/dV 4). Entries = distinct
(query block, key) pairs for the forward / dQ, distinct (key block, query) pairs for dK/dV.
Counted at T = 8192, k_max = 256, k_t uniform in [32, 224] (mean 126), with
benchmarks/gsa_kernel_bench.make_selection (thousands of entries; "random": distinct uniform
keys, "clustered": shared salience + recency, neighbours share keys):
      block:             16    32    64          16    32    64           32    64
  random     q-blocks   728   579   408  k-blocks  704   552   385  ordered  552   385
  clustered  q-blocks   178   107    64  k-blocks  613   479   352  ordered  139   102
(the useful pairs are 8192 x 126 = 1032 thousand; "ordered": key blocks in key_order(), the
default, which groups the keys many queries select).
Measured on an H100 (docs/PERFORMANCE.md, "GSA sparse attention"): faster than dense causal
cuDNN where neighbouring queries' selections overlap (clustered), slower where they do not
(random; the L2 gather bandwidth was about half the one the cost model assumed). Whether the
kernel wins therefore depends on the indexer; the benchmark prints the list lengths it times.
Atomics (dK/dV scattered from the query-major pass) were not used: Pallas' Triton atomics are
acq_rel per element, about one atomic per (entry, head, feature), far more than the rows read.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lightning_jax.ops.pallas import compiler_params, interpret_default

F32 = jnp.float32
_NEG = -1e30
_SENTINEL = jnp.iinfo(jnp.int32).max
_COMPOSITE_LIMIT = int(_SENTINEL)   # lists: one-key sort below this many (group, col, bit) codes
_DN_T = (((1,), (1,)), ((), ()))     # a @ b.T
_DN_TA = (((0,), (0,)), ((), ()))    # a.T @ b
_DN = (((1,), (0,)), ((), ()))       # a @ b

# Tile sets (timed by benchmarks/gsa_kernel_bench.py --tiles a,b,c,d); DEFAULTS is what the layer
# (model.gsa.attention="kernel") uses: "b" (c and d measured slower, docs/PERFORMANCE.md).
TILE_SETS = {
    "a": dict(block_q=16, block_k=64, block_kb=16, block_qc=64, num_warps=4, num_warps_bwd=4,
              num_stages=2),
    "b": dict(block_q=32, block_k=64, block_kb=32, block_qc=64, num_warps=4, num_warps_bwd=8,
              num_stages=2),
    "c": dict(block_q=64, block_k=64, block_kb=32, block_qc=64, num_warps=8, num_warps_bwd=8,
              num_stages=2),
    "d": dict(block_q=64, block_k=32, block_kb=64, block_qc=32, num_warps=8, num_warps_bwd=8,
              num_stages=1),
}
DEFAULTS = TILE_SETS["b"]


@dataclasses.dataclass(frozen=True)
class GSAKernelOptions:
  """Tiles and launch parameters of the GSA attention kernels (defaults: tile set "b").

  block_q queries per forward / dQ program, block_k union keys per loop step; block_kb keys per
  dK/dV program, block_qc listed queries per loop step. block_q and block_kb are at most 128
  (bit masks in at most 4 int32 words); every tile and D must be a power of two, the dot tiles
  >= 16. key_order: "count" (the dK/dV key blocks follow key_order(): heavily selected keys
  share blocks) or "position" (consecutive keys). interpret=None: native on GPU, the Pallas
  interpreter elsewhere. gpu_lowering=True builds the Triton version on any host (for
  ops.pallas.lower_for_gpu)."""
  block_q: int = DEFAULTS["block_q"]
  block_k: int = DEFAULTS["block_k"]
  block_kb: int = DEFAULTS["block_kb"]
  block_qc: int = DEFAULTS["block_qc"]
  num_warps: int = DEFAULTS["num_warps"]
  num_warps_bwd: int = DEFAULTS["num_warps_bwd"]
  num_stages: int = DEFAULTS["num_stages"]
  key_order: str = "count"
  interpret: bool | None = None
  gpu_lowering: bool = False

  @classmethod
  def tile_set(cls, name: str, **rest) -> "GSAKernelOptions":
    return cls(**TILE_SETS[name], **rest)


def _dot(a, b, dn, dt):
  prec = jax.lax.Precision.HIGHEST if jnp.dtype(dt) == jnp.dtype(F32) else None
  return jax.lax.dot_general(a.astype(dt), b.astype(dt), dn, precision=prec,
                             preferred_element_type=F32)


# ----------------------------------------------------------------------------- CSR lists
def _words(block: int) -> int:
  return -(-int(block) // 32)


def _csr_one(group, col, bit, valid, n_groups: int, n_cols: int, block: int):
  """One batch row: pairs (group, col, bit) -> distinct cols per group (ascending) + bitmasks.

  bit in [0, block). Returns (offsets int32 [n_groups + 1], cols int32 [N], bits int32
  [n_words * N], n_words = ceil(block / 32)); group g's list is cols[offsets[g]:offsets[g + 1]];
  bit b of entry i is bit b % 32 of bits[(b // 32) * N + i], set when the pair (g, cols[i], b)
  occurs. Repeated pairs count once. One single-key int32 sort (radix sort on GPUs) when
  n_groups * n_cols * block fits an int32, else a two-key sort."""
  n = group.shape[0]
  n_words = _words(block)
  if n_groups * n_cols * block < _COMPOSITE_LIMIT:
    comp = jnp.where(valid, (group * n_cols + col) * block + bit, _SENTINEL).astype(jnp.int32)
    comp_s = jax.lax.sort(comp)
    live = comp_s != _SENTINEL
    key_s = jnp.where(live, comp_s // block, _SENTINEL)
    bit_s = jnp.where(live, comp_s % block, 0)
  else:
    key = jnp.where(valid, group * n_cols + col, _SENTINEL).astype(jnp.int32)
    key_s, bit_s = jax.lax.sort((key, bit.astype(jnp.int32)), num_keys=2)
  live = key_s != _SENTINEL
  # a repeated (group, col, bit) pair (a key listed twice in one row) counts once, as in a mask
  fresh = live & ~((key_s == jnp.roll(key_s, 1)) & (bit_s == jnp.roll(bit_s, 1))
                   & (jnp.arange(n) > 0))
  first = jnp.concatenate([jnp.ones((1,), bool), key_s[1:] != key_s[:-1]]) & live
  seg = jnp.where(live, jnp.cumsum(first.astype(jnp.int32)) - 1, n)
  one = jnp.left_shift(jnp.ones_like(bit_s), bit_s % 32)
  # distinct bits inside a segment: their sum is their OR (int32 wrap-around included)
  bits = jnp.concatenate([
      jnp.zeros((n,), jnp.int32).at[seg].add(
          jnp.where(fresh & (bit_s // 32 == w), one, 0), mode="drop")
      for w in range(n_words)])
  cols = jnp.zeros((n,), jnp.int32).at[jnp.where(first, seg, n)].set(key_s % n_cols,
                                                                    mode="drop")
  counts = jnp.zeros((n_groups,), jnp.int32).at[jnp.where(first, key_s // n_cols, n_groups)].add(
      1, mode="drop")
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
  return offsets, cols, bits


def query_lists(selection, block_q: int):
  """Per block of block_q queries: the union of their selected keys with block_q-bit masks."""
  B, T, K = selection.shape
  t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, K)).reshape(-1)
  f = lambda s: _csr_one(t // block_q, jnp.maximum(s, 0), t % block_q, s >= 0,
                         T // block_q, T, block_q)
  return jax.vmap(f)(selection.reshape(B, T * K).astype(jnp.int32))


def key_order(selection):
  """Order of the keys for the dK/dV blocks, int32 [B, T] (a permutation per batch row): keys
  grouped by floor(log2(1 + number of queries selecting them)), most selected first, by position
  inside a group. Keys that many queries select (beyond the sinks: the indexer's heavy hitters)
  then share blocks, so a block's query list is shared by most of its keys instead of holding
  a long list for one heavy key among 31 local ones (at T = 8192 on the "clustered" benchmark
  selection: 3.4x fewer (key block, query) entries; none fewer, none more, on random ones)."""
  B, T, K = selection.shape
  flat = selection.reshape(B, T * K)
  counts = jax.vmap(lambda s: jnp.zeros((T + 1,), jnp.int32).at[jnp.where(s >= 0, s, T)].add(
      1, mode="drop")[:T])(flat)
  bucket = jnp.floor(jnp.log2(counts.astype(F32) + 1.0)).astype(jnp.int32)   # 0 .. log2(T)+1
  top = int(math.log2(max(T, 1))) + 2
  return jnp.argsort((top - bucket) * T + jnp.arange(T, dtype=jnp.int32)[None], axis=1).astype(
      jnp.int32)


def key_lists(selection, block_k: int, order=None):
  """Per block of block_k keys: the queries that selected any of them, with block_k-bit masks.

  order (int32 [B, T], optional): the key permutation (key_order); block g then holds the keys
  order[g * block_k: (g + 1) * block_k] and bit i means key order[g * block_k + i]."""
  B, T, K = selection.shape
  t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, K)).reshape(-1)
  if order is None:
    rank = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  else:
    rank = jax.vmap(lambda o: jnp.zeros((T,), jnp.int32).at[o].set(
        jnp.arange(T, dtype=jnp.int32)))(order)

  def f(s, rk):
    r = rk[jnp.maximum(s, 0)]
    return _csr_one(r // block_k, t, r % block_k, s >= 0, T // block_k, T, block_k)
  return jax.vmap(f)(selection.reshape(B, T * K).astype(jnp.int32), rank)


def unpack_bits(bits, n_words: int, length: int, block: int):
  """Test helper: [n_words * N] words -> bool [N, block] (entry i, bit b)."""
  w = jnp.asarray(bits).reshape(n_words, length)
  b = jnp.arange(block)
  return ((jnp.right_shift(w[b // 32].T, (b % 32)[None, :]) & 1) != 0)


# ----------------------------------------------------------------------------- kernels
def _chunk(col_ref, bit_ref, start, end, c, n: int, length: int, n_words: int):
  """Entries start + c*n ... of a CSR list: (cols, [mask words]); cols 0 and words 0 past end."""
  pos = start + c * n + jnp.arange(n, dtype=jnp.int32)
  ok = pos < end
  pos_c = jnp.minimum(pos, length - 1)
  cols = jnp.where(ok, col_ref[pos_c], 0)
  words = [jnp.where(ok, bit_ref[pos_c + w * length], 0) for w in range(n_words)]
  return cols, words


def _mask(words, bit_idx, entry_axis: int):
  """bool mask [.., ..]: bit bit_idx (a [m, 1] or [1, m] array) of each entry's mask words, the
  entries along entry_axis (0: words[w] is [n] -> [n, 1]; 1: -> [1, n])."""
  expand = (lambda a: a[:, None]) if entry_axis == 0 else (lambda a: a[None, :])
  if len(words) == 1:
    return (jnp.right_shift(expand(words[0]), bit_idx) & 1) != 0
  word = expand(words[0])
  for w in range(1, len(words)):
    word = jnp.where(bit_idx // 32 == w, expand(words[w]), word)
  return (jnp.right_shift(word, bit_idx % 32) & 1) != 0


def _fwd_kernel(off_ref, col_ref, bit_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bq, bk,
                scale, dot_dtype, length):
  g, b = pl.program_id(0), pl.program_id(1)
  start = off_ref[b, g]
  end = off_ref[b, g + 1]
  q = q_ref[...]
  rows = jnp.arange(bq, dtype=jnp.int32)[:, None]

  def body(c, carry):
    m, l, acc = carry
    cols, words = _chunk(col_ref, bit_ref, start, end, c, bk, length, _words(bq))
    kc = k_ref[cols, :]
    vc = v_ref[cols, :]
    s = _dot(q, kc, _DN_T, dot_dtype) * scale                                 # [BQ, BK]
    mask = _mask(words, rows, 1)
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p, vc, _DN, dot_dtype)
    return m_new, l, acc

  n_chunks = (end - start + bk - 1) // bk
  init = (jnp.full((bq,), _NEG, F32), jnp.zeros((bq,), F32),
          jnp.zeros((bq, q.shape[-1]), F32))
  m, l, acc = jax.lax.fori_loop(0, n_chunks, body, init)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), 0.0)


def _dq_kernel(off_ref, col_ref, bit_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref,
               *, bq, bk, scale, dot_dtype, length):
  g, b = pl.program_id(0), pl.program_id(1)
  start = off_ref[b, g]
  end = off_ref[b, g + 1]
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  dl = dl_ref[...]
  rows = jnp.arange(bq, dtype=jnp.int32)[:, None]

  def body(c, dq):
    cols, words = _chunk(col_ref, bit_ref, start, end, c, bk, length, _words(bq))
    kc = k_ref[cols, :]
    vc = v_ref[cols, :]
    s = _dot(q, kc, _DN_T, dot_dtype) * scale
    mask = _mask(words, rows, 1)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, vc, _DN_T, dot_dtype)
    ds = p * (dp - dl[:, None])
    return dq + _dot(ds, kc, _DN, dot_dtype)

  n_chunks = (end - start + bk - 1) // bk
  dq = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, col_ref, bit_ref, ord_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                dl_ref, dk_ref, dv_ref, *, bkb, bqc, scale, dot_dtype, length, permuted):
  g, b = pl.program_id(0), pl.program_id(1)
  start = off_ref[b, g]
  end = off_ref[b, g + 1]
  if permuted:                    # this block's keys, gathered; k_ref / v_ref hold all T rows
    keys_idx = ord_ref[...]
    kb = k_ref[keys_idx, :]
    vb = v_ref[keys_idx, :]
  else:
    kb = k_ref[...]
    vb = v_ref[...]
  keys = jnp.arange(bkb, dtype=jnp.int32)[None, :]

  def body(c, carry):
    dk, dv = carry
    qrows, words = _chunk(col_ref, bit_ref, start, end, c, bqc, length, _words(bkb))
    qc = q_ref[qrows, :]
    doc = do_ref[qrows, :]
    lse = lse_ref[qrows]
    dl = dl_ref[qrows]
    s = _dot(qc, kb, _DN_T, dot_dtype) * scale                                # [BQC, BKB]
    mask = _mask(words, keys, 0)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + _dot(p, doc, _DN_TA, dot_dtype)                                 # [BKB, D]
    dp = _dot(doc, vb, _DN_T, dot_dtype)
    ds = p * (dp - dl[:, None])
    dk = dk + _dot(ds, qc, _DN_TA, dot_dtype)
    return dk, dv

  n_chunks = (end - start + bqc - 1) // bqc
  z = jnp.zeros(kb.shape, F32)
  dk, dv = jax.lax.fori_loop(0, n_chunks, body, (z, z))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- calls
def _sq():
  return pl.squeezed if hasattr(pl, "squeezed") else None


def _full(shape):
  return pl.BlockSpec(shape, lambda g, b, h: (0,) * len(shape))


def _rows_spec(T, D):           # all rows of one (b, head) of a [B, T, H, D] array
  sq = _sq()
  return pl.BlockSpec((sq, T, sq, D), lambda g, b, h: (b, 0, h, 0))


def _blk_spec(n, D):            # rows g*n ... of one (b, head)
  sq = _sq()
  return pl.BlockSpec((sq, n, sq, D), lambda g, b, h: (b, g, h, 0))


def _vec_rows_spec(T):          # [B, H, T] float32, all of one (b, head)
  sq = _sq()
  return pl.BlockSpec((sq, sq, T), lambda g, b, h: (b, h, 0))


def _vec_blk_spec(n):
  sq = _sq()
  return pl.BlockSpec((sq, sq, n), lambda g, b, h: (b, h, g))


def _list_spec(length):
  sq = _sq()
  return pl.BlockSpec((sq, length), lambda g, b, h: (b, 0))


def _params(opts, warps_key):
  return compiler_params(opts[warps_key], opts["num_stages"], force=opts["force_params"])


def _fwd_call(q, k, v, lists, opts):
  B, T, H, D = q.shape
  off, cols, bits = lists
  L = cols.shape[1]
  LW = bits.shape[1]
  bq, bk = opts["block_q"], opts["block_k"]
  kern = functools.partial(_fwd_kernel, bq=bq, bk=bk, scale=1.0 / math.sqrt(D),
                           dot_dtype=opts["dot_dtype"], length=L)
  return pl.pallas_call(
      kern, grid=(T // bq, B, H),
      in_specs=[_full(off.shape), _list_spec(L), _list_spec(LW), _blk_spec(bq, D),
                _rows_spec(T, D), _rows_spec(T, D)],
      out_specs=[_blk_spec(bq, D), _vec_blk_spec(bq)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), F32)],
      interpret=opts["interpret"], name="gsa_fwd",
      compiler_params=_params(opts, "num_warps"),
  )(off, cols, bits, q, k, v)


def _dq_call(q, k, v, do, lse, dl, lists, opts):
  B, T, H, D = q.shape
  off, cols, bits = lists
  L = cols.shape[1]
  LW = bits.shape[1]
  bq, bk = opts["block_q"], opts["block_k"]
  kern = functools.partial(_dq_kernel, bq=bq, bk=bk, scale=1.0 / math.sqrt(D),
                           dot_dtype=opts["dot_dtype"], length=L)
  return pl.pallas_call(
      kern, grid=(T // bq, B, H),
      in_specs=[_full(off.shape), _list_spec(L), _list_spec(LW), _blk_spec(bq, D),
                _rows_spec(T, D), _rows_spec(T, D), _blk_spec(bq, D), _vec_blk_spec(bq),
                _vec_blk_spec(bq)],
      out_specs=_blk_spec(bq, D),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=opts["interpret"], name="gsa_dq",
      compiler_params=_params(opts, "num_warps_bwd"),
  )(off, cols, bits, q, k, v, do, lse, dl)


def _dkv_call(q, k, v, do, lse, dl, lists, order, opts):
  """dK, dV [B, T, H, D] in k's and v's dtypes (float32 accumulation); with `order`
  (key_order) the kernel's key blocks follow it and its outputs, in that order, are put back in
  key order here (one gather)."""
  B, T, H, D = q.shape
  off, cols, bits = lists
  L = cols.shape[1]
  LW = bits.shape[1]
  bkb, bqc = opts["block_kb"], opts["block_qc"]
  permuted = order is not None
  if not permuted:
    order = jnp.zeros((B, T), jnp.int32)          # unused by the kernel
  kv_spec = _rows_spec(T, D) if permuted else _blk_spec(bkb, D)
  sq = _sq()
  kern = functools.partial(_dkv_kernel, bkb=bkb, bqc=bqc, scale=1.0 / math.sqrt(D),
                           dot_dtype=opts["dot_dtype"], length=L, permuted=permuted)
  dk, dv = pl.pallas_call(
      kern, grid=(T // bkb, B, H),
      in_specs=[_full(off.shape), _list_spec(L), _list_spec(LW),
                pl.BlockSpec((sq, bkb), lambda g, b, h: (b, g)), _rows_spec(T, D),
                kv_spec, kv_spec, _rows_spec(T, D), _vec_rows_spec(T), _vec_rows_spec(T)],
      out_specs=[_blk_spec(bkb, D), _blk_spec(bkb, D)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=opts["interpret"], name="gsa_dkv",
      compiler_params=_params(opts, "num_warps_bwd"),
  )(off, cols, bits, order, q, k, v, do, lse, dl)
  if permuted:                    # row i of the outputs belongs to key order[i]
    rank = jax.vmap(lambda o: jnp.zeros((T,), jnp.int32).at[o].set(
        jnp.arange(T, dtype=jnp.int32)))(order)
    back = lambda a: jnp.take_along_axis(a, rank[:, :, None, None], axis=1)
    dk, dv = back(dk), back(dv)
  return dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(q, k, v, selection, opts_key):
  opts = dict(opts_key)
  o, _ = _fwd_call(q, k, v, query_lists(selection, opts["block_q"]), opts)
  return o


def _core_fwd(q, k, v, selection, opts_key):
  opts = dict(opts_key)
  lists = query_lists(selection, opts["block_q"])
  o, lse = _fwd_call(q, k, v, lists, opts)
  return o, (q, k, v, selection, o, lse, lists)


def _core_bwd(opts_key, res, do):
  opts = dict(opts_key)
  q, k, v, selection, o, lse, lists = res
  do = do.astype(q.dtype)
  dl = jnp.einsum("bthd,bthd->bht", do.astype(F32), o.astype(F32))            # delta [B, H, T]
  dq = _dq_call(q, k, v, do, lse, dl, lists, opts)
  order = key_order(selection) if opts["key_order"] == "count" else None
  dk, dv = _dkv_call(q, k, v, do, lse, dl, key_lists(selection, opts["block_kb"], order), order,
                     opts)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


def _pow2(name, val):
  if val < 1 or val & (val - 1):
    raise ValueError(f"GSA kernel: {name}={val} must be a power of two.")


def gsa_attention(q, k, v, selection, options: GSAKernelOptions = GSAKernelOptions()):
  """Attention of q [B, T, H, D] over the selected keys (selection int32 [B, T, K], -1 empty).

  Tiles and launch parameters: `options` (GSAKernelOptions). Larger block_q / block_kb: fewer
  bytes gathered where neighbours share keys, more (masked) FLOPs; see the module docstring.
  """
  o_ = options
  block_q, block_k, block_kb, block_qc = o_.block_q, o_.block_k, o_.block_kb, o_.block_qc
  num_warps, num_warps_bwd, num_stages = o_.num_warps, o_.num_warps_bwd, o_.num_stages
  key_order, interpret, gpu_lowering = o_.key_order, o_.interpret, o_.gpu_lowering
  B, T, H, D = q.shape
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"GSA kernel: q, k, v must share one shape [B, T, H, D]; got {q.shape}, "
                     f"{k.shape}, {v.shape}.")
  if selection.ndim != 3 or selection.shape[:2] != (B, T):
    raise ValueError(f"GSA kernel: selection must be int32 [B={B}, T={T}, k_max]; got "
                     f"{selection.shape}.")
  for name, val in (("block_q", block_q), ("block_k", block_k), ("block_kb", block_kb),
                    ("block_qc", block_qc), ("head_dim", D)):
    _pow2(name, int(val))
  if key_order not in ("count", "position"):
    raise ValueError(f"GSA kernel: key_order={key_order!r} must be 'count' or 'position'.")
  for name, val in (("block_q", block_q), ("block_kb", block_kb)):
    if not 16 <= val <= 128:
      raise ValueError(f"GSA kernel: {name}={val} must be 16, 32, 64 or 128 (dot tiles >= 16, "
                       f"at most 4 int32 mask words).")
  for name, val in (("block_k", block_k), ("block_qc", block_qc), ("head_dim", D)):
    if val < 16:
      raise ValueError(f"GSA kernel: {name}={val} must be at least 16 (Triton dot tiles).")
  tile = max(int(block_q), int(block_kb))
  Tp = -(-T // tile) * tile
  if (Tp // min(block_q, block_kb) + 1) * (Tp + 1) >= 2 ** 31:
    raise ValueError(f"GSA kernel: T={T} is too long for the int32 sort keys of the lists.")
  sel = selection.astype(jnp.int32)
  if Tp > T:
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    sel = jnp.pad(sel, ((0, 0), (0, Tp - T), (0, 0)), constant_values=-1)
  sel = jax.lax.stop_gradient(sel)
  interp = False if gpu_lowering else interpret_default(interpret)
  dot_dtype = F32 if jnp.dtype(q.dtype) == jnp.dtype(F32) else jnp.bfloat16
  opts = (("block_q", int(block_q)), ("block_k", int(block_k)), ("block_kb", int(block_kb)),
          ("block_qc", int(block_qc)), ("num_warps", int(num_warps)),
          ("num_warps_bwd", int(num_warps_bwd)), ("num_stages", int(num_stages)),
          ("dot_dtype", jnp.dtype(dot_dtype)), ("interpret", bool(interp)),
          ("force_params", bool(gpu_lowering)), ("key_order", key_order))
  o = _core(q, k, v, sel, opts)
  return o[:, :T]


# ----------------------------------------------------------------------------- indexer scores
def _indexer_kernel(q_ref, k_ref, w_ref, b_ref, pos_ref, s_ref, *, n_heads, bk, scale,
                    dot_dtype):
  j = pl.program_id(0)
  k = k_ref[...]                                                               # [BK, Di]
  acc = jnp.zeros(s_ref.shape, F32)
  for h in range(n_heads):
    raw = _dot(q_ref[:, h, :], k, _DN_T, dot_dtype) * scale + b_ref[h].astype(F32)
    acc = acc + jax.nn.sigmoid(w_ref[:, h].astype(F32))[:, None] * jax.nn.sigmoid(raw)
  kpos = j * bk + jnp.arange(bk, dtype=jnp.int32)
  s_ref[...] = jnp.where(kpos[None, :] <= pos_ref[...][:, None], acc, -jnp.inf)


def indexer_scores(qi, ki, wi, bias, q_pos, *, block_q: int = 64, block_k: int = 64,
                   num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None,
                   gpu_lowering: bool = False):
  """Lightning-indexer scores as one Pallas kernel; the contract of
  reference.indexer_scores: qi [B, Q, Hi, Di], ki [B, T, Di], wi [B, Q, Hi] (raw
  head-weight logits), bias [Hi], q_pos int [Q] -> float32 [B, Q, T],
  s = sum_h sigmoid(wi_h) sigmoid(qi_h . ki / sqrt(Di) + bias_h), -inf for keys after q_pos.

  Each program scores a [block_q, block_k] tile for all indexer heads in registers, so the
  [B, Q, Hi, T] float32 logits of the XLA version never reach memory. Hi, Di and the tiles must
  be powers of two (Triton tensor sizes), the tiles and Di at least 16."""
  B, Q, Hi, Di = qi.shape
  T = ki.shape[1]
  if ki.shape != (B, T, Di) or wi.shape != (B, Q, Hi) or bias.shape != (Hi,) or \
      q_pos.shape != (Q,):
    raise ValueError(f"indexer kernel: expected qi [B, Q, Hi, Di], ki [B, T, Di], wi [B, Q, Hi], "
                     f"bias [Hi], q_pos [Q]; got {qi.shape}, {ki.shape}, {wi.shape}, "
                     f"{bias.shape}, {q_pos.shape}.")
  for name, val in (("block_q", block_q), ("block_k", block_k), ("idx_heads", Hi),
                    ("idx_dim", Di)):
    _pow2(name, int(val))
  for name, val in (("block_q", block_q), ("block_k", block_k), ("idx_dim", Di)):
    if val < 16:
      raise ValueError(f"indexer kernel: {name}={val} must be at least 16 (Triton dot tiles).")
  bq, bk = int(block_q), int(block_k)
  Qp, Tp = -(-Q // bq) * bq, -(-T // bk) * bk
  pos = q_pos.astype(jnp.int32)
  if Qp > Q:
    qi = jnp.pad(qi, ((0, 0), (0, Qp - Q), (0, 0), (0, 0)))
    wi = jnp.pad(wi, ((0, 0), (0, Qp - Q), (0, 0)))
    pos = jnp.pad(pos, (0, Qp - Q), constant_values=-1)
  if Tp > T:
    ki = jnp.pad(ki, ((0, 0), (0, Tp - T), (0, 0)))
  interp = False if gpu_lowering else interpret_default(interpret)
  dot_dtype = F32 if jnp.dtype(qi.dtype) == jnp.dtype(F32) else jnp.bfloat16
  sq = _sq()
  kern = functools.partial(_indexer_kernel, n_heads=Hi, bk=bk, scale=1.0 / math.sqrt(Di),
                           dot_dtype=dot_dtype)
  s = pl.pallas_call(
      kern, grid=(Tp // bk, Qp // bq, B),
      in_specs=[pl.BlockSpec((sq, bq, Hi, Di), lambda j, i, b: (b, i, 0, 0)),
                pl.BlockSpec((sq, bk, Di), lambda j, i, b: (b, j, 0)),
                pl.BlockSpec((sq, bq, Hi), lambda j, i, b: (b, i, 0)),
                pl.BlockSpec((Hi,), lambda j, i, b: (0,)),
                pl.BlockSpec((bq,), lambda j, i, b: (i,))],
      out_specs=pl.BlockSpec((sq, bq, bk), lambda j, i, b: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((B, Qp, Tp), F32),
      interpret=interp, name="gsa_indexer_scores",
      compiler_params=compiler_params(num_warps, num_stages, force=gpu_lowering),
  )(qi, ki, wi, bias.astype(F32), pos)
  return s[:, :Q, :T]
