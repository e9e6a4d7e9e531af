"""The few tensor helpers generated code calls (`from lora_lite import ops`)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import math
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# The target layer whose init runs now (its name in the model), set by the runtime around each `init` call:
# the seed of a frozen tensor's random fill is derived from it (layer_generator).
_INIT_LAYER: contextvars.ContextVar[str] = contextvars.ContextVar("lora_lite_init_layer", default="")


@contextlib.contextmanager
def init_layer(name: str) -> Iterator[None]:
    """Run a variant's `init` for the layer called `name` in the model (what layer_generator seeds from)."""
    token = _INIT_LAYER.set(name)
    try:
        yield
    finally:
        _INIT_LAYER.reset(token)


def layer_generator(seed: int, tensor: str) -> torch.Generator:
    """A CPU generator for one frozen tensor of one layer: seeded with the first 8 bytes of
    sha256("<seed>/<layer name>/<tensor name>"), so the values depend on the config's seed, the layer's name in
    the model (set by init_layer; "" outside an attach) and the tensor's name, and on nothing else (not the
    global RNG, not the order the layers are initialised in)."""
    digest = hashlib.sha256(f"{int(seed)}/{_INIT_LAYER.get()}/{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def shared_generator(seed: int, tensor: str) -> torch.Generator:
    """A CPU generator for one shared tensor (`shared frozen A[...]`): seeded with the first 8 bytes of
    sha256("<seed>/shared/<tensor name>"), so the values depend on the config's seed and the tensor's name only
    (not on the layers, their names or their order)."""
    digest = hashlib.sha256(f"{int(seed)}/shared/{tensor}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _drawn(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None, fill) -> Tensor:
    """A float32 tensor filled in place by `fill(out)`: on `device`, or on the generator's CPU then moved."""
    out = torch.empty(shape, device=device if generator is None else "cpu")
    with torch.no_grad():
        fill(out)
    return out.to(device)


def kaiming_uniform(
    shape: tuple[int, ...], a: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform on [-b, b], b = sqrt(6 / ((1 + a^2) fan_in)), fan_in = shape[-1]: torch's kaiming_uniform_(a=a)."""
    fan_in = shape[-1] if shape else 0
    bound = math.sqrt(6.0 / ((1.0 + a * a) * fan_in)) if fan_in > 0 else 0.0
    return _drawn(shape, device, generator, lambda out: out.uniform_(-bound, bound, generator=generator))


def kaiming(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Kaiming-uniform with a=sqrt(5), fan_in = shape[-1]: nn.Linear's and PEFT's lora_A init."""
    bound = 1.0 / math.sqrt(shape[-1]) if shape and shape[-1] > 0 else 0.0  # kaiming_uniform(a=sqrt(5))
    return _drawn(shape, device, generator, lambda out: out.uniform_(-bound, bound, generator=generator))


def kaiming_pairs(shape: tuple[int, int], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Kaiming-uniform on half the columns, each repeated twice: [u1, u1, u2, u2, ...] (PEFT's HRA init)."""
    rows, cols = shape
    half = kaiming((rows, cols // 2), device, generator)
    return torch.repeat_interleave(half, 2, dim=1)


def normal(
    shape: tuple[int, ...], std: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Normal with mean 0 and standard deviation std (float32)."""
    return _drawn(shape, device, generator, lambda out: out.normal_(0.0, std, generator=generator))


def uniform(
    shape: tuple[int, ...], lo: float, hi: float, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform on [lo, hi] (float32)."""
    return _drawn(shape, device, generator, lambda out: out.uniform_(lo, hi, generator=generator))


def randperm(shape: tuple[int], n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """The first k = shape[0] entries of a random permutation of 0, ..., n - 1 (torch.randperm): k distinct int64
    indices, drawn on the generator's CPU then moved (PEFT's FourierFT draws its spectral entries so). Raises a
    ValueError when k > n."""
    (k,) = shape
    if k > n:
        raise ValueError(f"randperm({n}) cannot give {k} distinct indices: ask for at most {n}")
    perm = torch.randperm(n, generator=generator, device="cpu" if generator is not None else device)
    return perm[:k].to(device)


def reparametrize(mu: Tensor, logvar: Tensor, training: bool) -> Tensor:
    """In training, a sample of N(mu, exp(logvar)) as mu + eps * exp(logvar / 2), eps ~ N(0, 1) of mu's shape and
    dtype drawn from torch's RNG (the reparameterization trick, Kingma and Welling 2014; PEFT's PVeRA draws the same
    eps when it has no generator_seed); in eval, mu. mu, logvar: [..., n] of one dtype -> [..., n]."""
    if not training:
        return mu
    std = torch.exp(0.5 * logvar)
    return mu + torch.randn_like(std) * std


def scatter(v: Tensor, index: Tensor, m: int, n: int) -> Tensor:
    """The [m, n] matrix of zeros with v[j] at row-major flat position index[j] (row index[j] // n, column
    index[j] % n), in v's dtype; gradients flow to v (v [k], index int64 [k], distinct entries below m * n).
    Source: FourierFT's dense spectrum (PEFT's `dense_spectrum[indices[0], indices[1]] = spectrum`)."""
    return v.new_zeros(m * n).index_put((index,), v).view(m, n)


def sparse(v: Tensor, index: Tensor, m: int, n: int, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply the [m, n] matrix S = scatter(v, index, m, n) (v[j] at row-major flat position index[j]: row
    index[j] // n, column index[j] % n) to each row of h [..., n], giving [..., m]: y[..., index[j] // n] +=
    v[j] h[..., index[j] % n], as a sparse-times-dense product (k = len(v) multiply-adds per row, S never built);
    with transpose=True apply S^T to rows h [..., m], giving [..., n]. v [k] float, index int64 [k] distinct
    entries below m * n, in any order. The result has promote_types(v.dtype, h.dtype); half precisions run in
    float32 (torch's CPU sparse kernels have none). Gradients: to h, S^T (or S) applied to the output gradient;
    to v, the sampled product sum over rows t of g[t, row j] h[t, column j]. Raises ValueError for an index out
    of range or repeated.

    Torch's CSR kernels (MKL on CPU): the CSR structure of S and of S^T (the sort of the index set) is built once
    per index tensor and kept while that tensor lives unchanged (its version counter; about three times the
    index set's memory, freed with it); the op is a torch.library custom op, opaque to torch.compile (fullgraph)
    and differentiable. Source: SHiRA (Bhardwaj et al. 2024, Sparse High Rank Adapters), whose PEFT 0.21 forward
    adds torch.sparse_coo_tensor(indices, values) to a copy of W and runs one dense F.linear, so its backward
    forms the dense [m, n] weight gradient."""
    return _sparse_matmul(v, index, m, n, h, transpose)


# (id(index), m, n, transpose) -> (weak reference to index, its version, CSR plan); an entry goes with its tensor.
_SPARSE_PLANS: dict[tuple[int, int, int, bool], tuple[weakref.ref, int, tuple[Tensor, Tensor, Tensor]]] = {}


def _sparse_plan(index: Tensor, m: int, n: int, transpose: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(order, crow, col): index[order] sorted row-major in S [m, n] (S^T [n, m] with transpose) and the CSR
    row pointers and columns of that order, cached per index tensor (rebuilt when it is written in place)."""
    key = (id(index), m, n, transpose)
    try:
        version = index._version
    except RuntimeError:  # an inference tensor has no version counter: no cache
        return _build_sparse_plan(index, m, n, transpose)
    entry = _SPARSE_PLANS.get(key)
    if entry is not None and entry[0]() is index and entry[1] == version:
        return entry[2]
    plan = _build_sparse_plan(index, m, n, transpose)
    _SPARSE_PLANS[key] = (weakref.ref(index, lambda _, key=key: _SPARSE_PLANS.pop(key, None)), version, plan)
    return plan


def _build_sparse_plan(index: Tensor, m: int, n: int, transpose: bool) -> tuple[Tensor, Tensor, Tensor]:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= m * n):
        raise ValueError(f"sparse(): an index is out of range for a [{m}, {n}] matrix (entries 0 <= i < {m * n})")
    rows, cols = (n, m) if transpose else (m, n)
    flat = (index % n) * m + index // n if transpose else index
    flat, order = torch.sort(flat)
    if bool((flat[1:] == flat[:-1]).any()):
        raise ValueError("sparse(): the index set repeats an entry: each position of the matrix is held once")
    small = rows * cols < 2**31
    crow = torch.searchsorted(flat, torch.arange(rows + 1, device=index.device) * cols, out_int32=small)
    col = (flat % cols).to(torch.int32 if small else torch.int64)
    return order, crow, col


def _sparse_csr(values: Tensor, plan: tuple[Tensor, Tensor, Tensor], size: tuple[int, int]) -> Tensor:
    order, crow, col = plan
    with warnings.catch_warnings():  # torch warns once that its sparse CSR support is beta
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values[order], size)


def _sparse_work_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@torch.library.custom_op("lora_lite::sparse_matmul", mutates_args=())
def _sparse_matmul(v: Tensor, index: Tensor, m: int, n: int, h: Tensor, transpose: bool) -> Tensor:
    rows, cols = (n, m) if transpose else (m, n)
    work = _sparse_work_dtype(v, h)
    with torch.autocast(h.device.type, enabled=False):
        S = _sparse_csr(v.to(work), _sparse_plan(index, m, n, transpose), (rows, cols))
        dense = h.reshape(-1, cols).to(work).T.contiguous()  # (cols, tokens): MKL's fastest layout
        out = torch.addmm(dense.new_empty(rows, dense.shape[1]), S, dense, beta=0.0)  # (rows, tokens), no fill
    return out.T.to(torch.promote_types(v.dtype, h.dtype)).reshape(*h.shape[:-1], rows)


@_sparse_matmul.register_fake
def _(v: Tensor, index: Tensor, m: int, n: int, h: Tensor, transpose: bool) -> Tensor:
    rows, tokens = (n if transpose else m), h.numel() // h.shape[-1] if h.shape[-1] else 0
    out = h.new_empty((rows, tokens), dtype=torch.promote_types(v.dtype, h.dtype))
    return out.T.reshape(*h.shape[:-1], rows)  # the strides of the real op's transposed product


@torch.library.custom_op("lora_lite::sparse_sampled", mutates_args=())
def _sparse_sampled(index: Tensor, m: int, n: int, a: Tensor, b: Tensor) -> Tensor:
    """out[j] = sum over rows t of a[t, index[j] // n] * b[t, index[j] % n] (a [..., m], b [..., n]): the
    gradient of sparse()'s values, in promote_types(a.dtype, b.dtype)."""
    work = _sparse_work_dtype(a, b)
    plan = _sparse_plan(index, m, n, False)
    with torch.autocast(a.device.type, enabled=False):
        pattern = _sparse_csr(a.new_zeros(index.shape, dtype=work), plan, (m, n))
        left, right = a.reshape(-1, m).to(work).T, b.reshape(-1, n).to(work)
        sampled = torch.sparse.sampled_addmm(pattern, left, right, beta=0.0).values()
    out = torch.empty_like(sampled).index_copy_(0, plan[0], sampled)
    return out.to(torch.promote_types(a.dtype, b.dtype))


@_sparse_sampled.register_fake
def _(index: Tensor, m: int, n: int, a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(index.shape, dtype=torch.promote_types(a.dtype, b.dtype))


def _sparse_setup(ctx, inputs: tuple, output: Tensor) -> None:
    v, index, m, n, h, transpose = inputs
    ctx.save_for_backward(v, index, h)
    ctx.sizes = (m, n, transpose)


def _sparse_backward(ctx, grad: Tensor) -> tuple:
    v, index, h = ctx.saved_tensors
    m, n, transpose = ctx.sizes
    grad_v = grad_h = None
    if ctx.needs_input_grad[4]:
        grad_h = _sparse_matmul(v, index, m, n, grad, not transpose).to(h.dtype)
    if ctx.needs_input_grad[0]:
        a, b = (h, grad) if transpose else (grad, h)
        grad_v = _sparse_sampled(index, m, n, a, b).to(v.dtype)
    return grad_v, None, None, None, grad_h, None


_sparse_matmul.register_autograd(_sparse_backward, setup_context=_sparse_setup)


def ifft2(M: Tensor) -> Tensor:
    """torch.fft.ifft2(M).real for a real matrix M [m, n]: the real part of its inverse 2-D DFT (with the 1 / (m n)
    factor), [m, n], contiguous. For a real M it equals Re(fft2(M)) / (m n), and Re(fft2(M))[k, l] =
    Re(fft2(M))[-k mod m, -l mod n], so it is computed from the half spectrum rfft2(M) (columns 0..n//2) and that
    half mirrored: about a quarter of the work of a complex ifft2. Half precision runs in float32 with autocast off
    (CPU FFTs have no half-precision kernel); the result in M's dtype. Source: FourierFT (Gao et al. 2024), PEFT's
    get_delta_weight."""
    m, n = M.shape
    work = torch.promote_types(M.dtype, torch.float32)
    with torch.autocast(M.device.type, enabled=False):
        half = torch.fft.rfft2(M.to(work)).real / (m * n)  # (m, n // 2 + 1)
        mirrored = torch.roll(half[:, 1 : n - n // 2].flip(0, 1), 1, 0)  # columns n // 2 + 1 .. n - 1
        return torch.cat([half, mirrored], dim=1).to(M.dtype)


def svd(matrix: Tensor, k: int, method: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets (U [m, k], S [k], Vt [k, n]) of a matrix, in float32.

    "exact" is torch.linalg.svd; "lowrank" is torch.svd_lowrank (randomized, 4 power
    iterations, oversampling 10): much faster for k << min(m, n), close but not exact.
    """
    matrix = matrix.float()
    if method == "lowrank":
        q = min(k + 10, *matrix.shape)
        U, S, V = torch.svd_lowrank(matrix, q=q, niter=4)
        return U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].T.contiguous()
    U, S, Vt = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :k].contiguous(), S[:k].contiguous(), Vt[:k].contiguous()


def inv(matrix: Tensor) -> Tensor:
    """The inverse of a square matrix, in float32; a singular one raises a ValueError that says what to do."""
    inverse, info = torch.linalg.inv_ex(matrix.float())
    if int(info.max()) != 0 or not torch.isfinite(inverse).all():
        raise ValueError("inv() of a singular matrix: add damping (for example + eps * trace(M) / n * eye(n))")
    return inverse


def dot(v: Tensor, h: Tensor) -> Tensor:
    """v . h for each per-token row of h, kept as a trailing dim of 1 so it broadcasts: [..., 1]."""
    return (h @ v).unsqueeze(-1)


def offdiag(v: Tensor, k: int) -> Tensor:
    """The [k, k] matrix with zero diagonal whose off-diagonal entries, row by row, are v."""
    mask = ~torch.eye(k, dtype=torch.bool, device=v.device)
    out = torch.zeros(k, k, dtype=v.dtype, device=v.device)
    return out.masked_scatter(mask, v)


def householder(U: Tensor, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply R = H_1 H_2 ... H_m (H_i = I - 2 u_i u_i^T / ||u_i||^2, u_i = U[:, i]) to each row of h
    (U [n, m], h [..., n]); with transpose=True apply R^T = H_m ... H_1 instead (a merge's W R: each row
    w of W becomes w R = (R^T w^T)^T).

    Compact WY form: H_1 ... H_m = I - U T U^T with T upper triangular and
    T^-1 = diag(||u_i||^2) / 2 + strictly-upper(U^T U). Cost: two [.., n] x [n, m]
    matmuls and an m x m triangular solve; the [n, n] matrix is never built.
    """
    # The m x m work runs in float32, autocast off (it would turn the Gram matmul back into bf16/fp16, and
    # solve_triangular has no half-precision kernel on CPU).
    with torch.autocast(U.device.type, enabled=False):
        Uf = U.float()
        gram = Uf.T @ Uf  # (m, m)
        t_inv = torch.triu(gram, diagonal=1) + torch.diag(torch.diagonal(gram) / 2)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        T = torch.linalg.solve_triangular(t_inv, eye, upper=True).to(h.dtype)  # (m, m)
    return h - ((h @ U) @ (T if transpose else T.T)) @ U.T


def blockdiag(R: Tensor, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply the block-diagonal matrix diag(R[0], ..., R[n-1]) (R [n, p, q]: [n*p, n*q]) to each row of h
    [..., n*q]: row block i becomes R[i] h_i, giving [..., n*p] (R[i]^T h_i with transpose=True, on rows
    [..., n*p]). One batched matmul on h reshaped to [..., n, q]; the block-diagonal matrix is never built.
    Source: OFT (Qiu et al. 2023), PEFT's OFT forward (square blocks); GraLoRA's blocks (rectangular)."""
    blocks = h.unflatten(-1, (R.shape[0], R.shape[1] if transpose else R.shape[2]))
    out = torch.einsum("...ik,ikj->...ij" if transpose else "...ik,ijk->...ij", blocks, R)
    return out.flatten(-2)


def butterfly(R: Tensor, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply BOFT's orthogonal butterfly product B_m ... B_2 B_1 (R [m, n, b, b]) to each row of h [..., n*b];
    with transpose=True apply its transpose B_1^T B_2^T ... B_m^T. Factor k is P_k blockdiag(R[k-1]) P_k^T:
    P_k^T gathers, within each group of b*2^(k-1) entries, the half-blocks (b/2 entries) i and i + 2^(k-1)
    into block i (P_1 = I), which is PEFT 0.21's `block_butterfly_perm`. Each factor is a reshape, a
    transpose and one batched matmul of the blocks; neither the [n*b, n*b] product nor a permutation matrix
    is built. Raises ValueError when m > 1 and b is odd or n is not a multiple of 2^(m-1).
    Source: Liu et al. 2024, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization (BOFT);
    PEFT's tuners/boft, whose forward builds the dense product every step."""
    m, n, b, _ = R.shape
    if m > 1 and (b % 2 or n % 2 ** (m - 1)):
        raise ValueError(
            f"butterfly() of {m} factors needs an even block size and a block count divisible by "
            f"{2 ** (m - 1)}, not b = {b}, n = {n}: change the block size or the number of factors"
        )
    lead = h.shape[:-1]
    for k in reversed(range(m)) if transpose else range(m):
        if k == 0:  # P_1 = I
            h = blockdiag(R[0], h, transpose)
            continue
        shape = (n >> k, 2, 1 << k, b // 2)  # groups, which half of a block, block in the group, entry
        blocks = h.unflatten(-1, shape).transpose(-3, -2).reshape(*lead, n, b)  # P_k^T h as n blocks
        out = torch.einsum("...ik,ikj->...ij" if transpose else "...ik,ijk->...ij", blocks, R[k])
        h = out.reshape(*lead, n >> k, 1 << k, 2, b // 2).transpose(-3, -2).reshape(*lead, n * b)  # P_k
    return h


def kron(A: Tensor, B: Tensor, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply A (x) B (A [a1, a2], B [b1, b2]) to each row of h [..., a2*b2]: (A (x) B) vec(H) = vec(A H B^T)
    with H [a2, b2] the row-major reshape of a row, giving rows [..., a1*b1]; with transpose=True apply
    A^T (x) B^T to rows [..., a1*b1]. Two thin matmuls, the cheaper order first (a1 a2 b2 + a1 b2 b1 against
    a2 b2 b1 + a1 a2 b1 multiplies per row), never the [a1*b1, a2*b2] matrix. Source: LoKr (Yeh et al. 2024,
    LyCORIS), whose PEFT forward builds the dense Kronecker product instead."""
    if transpose:
        A, B = A.T, B.T
    (a1, a2), (b1, b2) = A.shape, B.shape
    H = h.unflatten(-1, (a2, b2))
    if a1 * b2 * (a2 + b1) <= a2 * b1 * (b2 + a1):
        return ((A @ H) @ B.T).flatten(-2)
    return (A @ (H @ B.T)).flatten(-2)


def fold(r: int, n: int, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply F = [I_r I_r ... I_r] ([r, n]: n columns, the last identity cut short) to each row of h [..., n]:
    the sum of h's consecutive chunks of length r, the last zero-padded, giving [..., r]; with transpose=True
    apply F^T to rows h [..., r]: each repeated to length n (h, h, ..., cut at n), giving [..., n]. A reshape and
    a sum; F is never built. Source: MiSS (Kang et al. 2024), PEFT's MissLinear forward (its chunk sum of x;
    its `mini` variant repeats the block along d_out, F^T)."""
    chunks = -(-n // r)
    if transpose:
        return h.repeat(*(1,) * (h.dim() - 1), chunks)[..., :n]
    if chunks * r != n:
        h = torch.nn.functional.pad(h, (0, chunks * r - n))
    return h.unflatten(-1, (chunks, r)).sum(-2)


def shuffle(a: int, b: int, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply the stride permutation to each row of h [..., a*b]: the row read as an [a, b] matrix row by row,
    transposed, read out row by row (with transpose=True the inverse: read as [b, a]). A copy, no matmul.
    Source: the stride permutation L (Van Loan 1992, Computational Frameworks for the FFT); GraLoRA
    (Jung et al. 2025) exchanges its block LoRAs' sub-ranks by one, as PEFT's permute(0, 1, 3, 2, 4) does."""
    if transpose:
        a, b = b, a
    return h.unflatten(-1, (a, b)).transpose(-1, -2).flatten(-2)


def rotate_half(n: int, g: int, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply the [n, n] signed permutation P to each row of h [..., n]: h is cut into groups of g entries and
    each group [h1, h2] (halves of g // 2) becomes [-h2, h1]; with transpose=True P^T (= P^-1) gives [h2, -h1].
    A reshape and a concatenation, never a matrix. Pairs entry i of a group with entry i + g // 2, as rotary
    embeddings' rotate_half and PEFT's RoAd (`_apply_road`, Liao et al. 2024) do. Raises ValueError when g is
    odd or does not divide n (or h's last dim is not n)."""
    if g % 2 or n % g or h.shape[-1] != n:
        raise ValueError(f"rotate_half({n}, {g}) needs an even group size dividing {n}, and rows of {n}")
    groups = h.unflatten(-1, (n // g, 2, g // 2))
    first, second = groups.unbind(-2)
    pair = (second, -first) if transpose else (-second, first)
    return torch.stack(pair, dim=-2).flatten(-3)


def repeat_blocks(v: Tensor, b: int, k: int) -> Tensor:
    """v [n] cut into blocks of b consecutive entries, each block repeated k times in place: [n * k]
    (v.reshape(-1, b).repeat_interleave(k, dim=0).flatten(), how PEFT's RoAd road_1 shares one angle and one
    scale between the two halves of a group). Raises ValueError when b does not divide n."""
    if v.shape[-1] % b:
        raise ValueError(f"repeat_blocks(v, {b}, {k}) needs the block size {b} to divide v's length {v.shape[-1]}")
    return v.reshape(-1, b).repeat_interleave(k, dim=0).flatten()


def khatri_rao(A: Tensor, B: Tensor) -> Tensor:
    """The column-wise Khatri-Rao product of A [m, k] and B [n, k]: [m*n, k], row i*n + j is A[i] * B[j]
    (column c is kron(A[:, c], B[:, c]); scipy.linalg.khatri_rao). In A's and B's promoted dtype. RandLoRA's
    lambda * A * gamma of PEFT's UniqueBaseGrad, before lambda (Albert et al. 2025, https://arxiv.org/abs/2502.00987)."""
    return (A[:, None, :] * B[None, :, :]).reshape(-1, A.shape[-1])


def topk_mix(logits: Tensor, vectors: Tensor, k: int) -> Tensor:
    """For each row of logits [..., n], the softmax of its k largest entries weighting the matching rows of
    vectors [n, b]: [..., b], in the logits' dtype. VB-LoRA's mixture of vector-bank vectors, as PEFT 0.21's
    VBLoRALayer._get_low_rank_matrix computes it (Li et al. 2024, https://arxiv.org/abs/2405.15179)."""
    top, index = logits.topk(k, dim=-1)
    return (torch.softmax(top, dim=-1).unsqueeze(-1) * vectors[index]).sum(-2)


def blockcirculant(K: Tensor, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply the block-circulant matrix C (K [m, n, b]; block (i, j) the [b, b] circulant with first row K[i, j],
    C_ij[r, c] = K[i, j, (c - r) mod b]) to each row of h [..., n*b], giving [..., m*b]; with transpose=True apply
    C^T (block (j, i) the circulant with first column K[i, j]) to rows [..., m*b], giving [..., n*b].

    By the correlation theorem, block row i is irfft(sum_j rfft(h_j) * conj(rfft(K[i, j]))) (the transpose: no
    conj, summed over i): FFTs of length b and one contraction over blocks per frequency; the [m*b, n*b] matrix is
    never built. Half-precision h runs in float32 with autocast off (CPU FFTs have no half-precision kernel), the
    result in h's dtype. Source: C3A (Chen et al. 2025, Parameter-Efficient Fine-Tuning via Circular Convolution);
    the forward of PEFT 0.21's BlockCircularConvolution (full complex FFTs of x and K), whose own backward gives a
    wrong input gradient for b > 2 (tests/test_peft_spectral.py); here autograd differentiates the FFTs."""
    m, n, b = K.shape
    work = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        spectrum = torch.fft.rfft(K.to(work), dim=-1)  # (m, n, b // 2 + 1)
        blocks = torch.fft.rfft(h.to(work).unflatten(-1, (m if transpose else n, b)), dim=-1)
        if transpose:
            out = torch.einsum("...if,ijf->...jf", blocks, spectrum)
        else:
            out = torch.einsum("...jf,ijf->...if", blocks, spectrum.conj())
        return torch.fft.irfft(out, n=b, dim=-1).flatten(-2).to(h.dtype)


def haar(n: int, h: Tensor, transpose: bool = False) -> Tensor:
    """Apply the one-level orthonormal inverse Haar transform H [n, n] to each row of h [..., n] (n even): entries
    2k and 2k + 1 of the result are (h[k] + h[n/2 + k]) / sqrt(2) and (h[k] - h[n/2 + k]) / sqrt(2), the
    approximation coefficients in h's first half, the details in its second; with transpose=True apply H^T, the
    forward transform (pairs (h[2k], h[2k + 1]) to their scaled sum, first half, and difference, second half). The
    [n, n] matrix is never built. Raises a ValueError for an odd n. Source: WaveFT (Bilican et al. 2025), the "db1"
    wavelet of PEFT 0.21's waverec2d."""
    if n % 2:
        raise ValueError(f"haar({n}): the one-level Haar transform needs an even size")
    r = 1.0 / math.sqrt(2.0)
    if transpose:
        pairs = h.unflatten(-1, (n // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.cat([even + odd, even - odd], dim=-1) * r
    approx, detail = h[..., : n // 2], h[..., n // 2 :]
    return torch.stack([approx + detail, approx - detail], dim=-1).flatten(-2) * r


def skew(v: Tensor, b: int) -> Tensor:
    """The skew-symmetric [b, b] matrix U - U^T whose strict upper triangle U holds v [..., b*(b-1)//2] row by
    row (torch.triu_indices order, as PEFT's OFT packs it); [..., b, b]."""
    rows, cols = torch.triu_indices(b, b, 1, device=v.device)
    upper = v.new_zeros(*v.shape[:-1], b, b)
    upper[..., rows, cols] = v
    return upper - upper.transpose(-2, -1)


def cayley(Q: Tensor) -> Tensor:
    """(I + Q)(I - Q)^-1 for Q [..., b, b] (orthogonal when Q is skew-symmetric: then I - Q is invertible),
    solved with autocast off, half precisions in float32 (torch.linalg.solve has no half-precision CPU
    kernel); the result in Q's dtype. Source: Cayley transform, as OFT uses it (Qiu et al. 2023)."""
    with torch.autocast(Q.device.type, enabled=False):
        Qf = Q if Q.dtype in (torch.float32, torch.float64) else Q.float()
        eye = torch.eye(Q.shape[-1], dtype=Qf.dtype, device=Q.device)
        return torch.linalg.solve(eye - Qf, eye + Qf, left=False).to(Q.dtype)


def cayley_neumann(Q: Tensor, k: int) -> Tensor:
    """cayley(Q) ~ I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1) for Q [..., b, b], the Neumann series of (I - Q)^-1
    cut after k terms as PEFT 0.21's OFT cuts it (`use_cayley_neumann=True`, `num_cayley_neumann_terms=k`;
    k = 2 gives I + 2Q, k <= 1 gives I): no inverse, only matmuls."""
    R = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    if k <= 1:
        return R.expand_as(Q)
    R = torch.add(R, Q, alpha=2.0)  # one fused kernel per term: k small matmuls dominate, not the adds
    if k > 2:
        power = Q @ Q
        R = torch.add(R, power, alpha=2.0)
        for _ in range(3, k - 1):
            power = power @ Q
            R = torch.add(R, power, alpha=2.0)
        R = R + power @ Q
    return R


def weight(layer: nn.Module) -> Tensor:
    """The layer's weight as [d_out, d_in], whatever its storage.

    `nn.Linear` stores [d_out, d_in]; transformers' `Conv1D` (GPT-2 and its kin) stores [d_in, d_out]
    (PEFT's `fan_in_fan_out`), and is given back transposed, as a view.
    """
    w = layer.weight
    return w.T if is_conv1d(layer) else w


def d_in(layer: nn.Module) -> int:
    """Input features of a linear-like layer (`in_features`; `Conv1D`: its weight's first dim)."""
    return layer.weight.shape[0] if is_conv1d(layer) else layer.in_features


def d_out(layer: nn.Module) -> int:
    """Output features of a linear-like layer (`out_features`; `Conv1D`: `nf`)."""
    return layer.weight.shape[1] if is_conv1d(layer) else layer.out_features


def is_conv1d(layer: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2 and its kin): a linear layer whose weight is stored [d_in, d_out]."""
    return type(layer).__name__ == "Conv1D" and not hasattr(layer, "in_features")


def bias_vector(layer: nn.Module) -> Tensor:
    """The layer's bias [d_out] in float32, zeros when it has none (what `merged()` reads)."""
    b = getattr(layer, "bias", None)
    return torch.zeros(d_out(layer), device=layer.weight.device) if b is None else b.detach().float()


def bias(layer: nn.Module, dtype: torch.dtype) -> Tensor | float:
    """The layer's bias in `dtype`, or 0.0 when it has none."""
    b = getattr(layer, "bias", None)
    return 0.0 if b is None else b.to(dtype)
