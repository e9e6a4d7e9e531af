"""The builtin functions of the spec language: each one's type rule and doc, in one table.

docs/language.md lists DOCS verbatim (a test keeps them equal), so every builtin is documented once.
"""

from __future__ import annotations

from .dims import Dim
from .types import CONST, FLOAT, FORWARD, INIT, Type, tensor

# Fills: only valid as the whole init of a param or frozen tensor; its declared shape is the shape.
# A fill with arguments is written as a call (`normal(0.02)`); its arguments are constants.
FILLS = {
    "zeros": "all zeros",
    "ones": "all ones",
    "kaiming": "kaiming-uniform with a=sqrt(5), fan_in = last dim (as nn.Linear and PEFT's lora_A)",
    "kaiming_pairs": "kaiming-uniform on half the columns, each column repeated twice "
    "(HRA's symmetric init: paired reflections cancel, so the product is I)",
    "kaiming_uniform": "uniform on [-b, b], b = sqrt(6 / ((1 + a^2) fan_in)), fan_in = last dim "
    "(torch's kaiming_uniform_ with a given a; `kaiming` is a = sqrt(5))",
    "normal": "normal with mean 0 and standard deviation std",
    "uniform": "uniform on [lo, hi]",
    "randperm": "the first k entries (k the declared length) of a random permutation of 0, ..., n - 1: k distinct "
    "indices, stored as int64 (never cast to the adapter dtype); a fill of a `frozen` vector only, read by scatter "
    "and sparse",
}
# The constant arguments of the fills that take some, by name (the others are written bare: `zeros`).
FILL_ARGS = {"kaiming_uniform": ("a",), "normal": ("std",), "uniform": ("lo", "hi"), "randperm": ("n",)}
# Fills that draw random numbers: in a `frozen` tensor they are seeded (see docs/language.md).
RANDOM_FILLS = frozenset({"kaiming", "kaiming_pairs", "kaiming_uniform", "normal", "uniform", "randperm"})
# Fills that draw integer indices: the tensor is an index set (Type.integer), read only by INDEX_READERS.
INDEX_FILLS = frozenset({"randperm"})
# The builtins that read an index set (their second argument), and how diagnostics name them.
INDEX_READERS = ("scatter", "sparse")
INDEX_READERS_TEXT = " and ".join(f"{name}()" for name in INDEX_READERS)


def fill_form(name: str) -> str:
    """How a fill is written: `zeros`, `normal(std)`."""
    return f"{name}({', '.join(FILL_ARGS[name])})" if name in FILL_ARGS else name


# Streaming statistics of the layer input, only valid in `stat NAME = f(x)`.
STATISTICS = {
    "cov": "`stat C = cov(x)`: the uncentered second moment E[x x^T] of the layer input over the calibration "
    "tokens, [d_in, d_in], streamed in float64 (O(d_in^2) memory).",
    "mean": "`stat m = mean(x)`: the mean layer input over the calibration tokens, [d_in].",
}

ELEMENTWISE = {"sqrt", "exp", "elu", "abs", "sin", "cos"}

# Structured operators: a square or rectangular matrix that is only ever applied to per-token vectors
# (`op(...) @ h`, `op(...).T @ h`), by `ops.<name>(args..., h, transpose=...)`, never built densely.
OPERATORS = (
    "householder",
    "blockdiag",
    "kron",
    "rotate_half",
    "butterfly",
    "blockcirculant",
    "haar",
    "fold",
    "shuffle",
    "sparse",
)
# Operators that another builtin builds densely (merged() uses it rather than the operator applied to identity
# rows): operator -> that builtin, which takes the same arguments.
DENSE_FORM = {"sparse": "scatter"}

DOCS = {
    **{name: f"`param P[...] = {fill_form(name)}`: {text}." for name, text in FILLS.items() if name not in INDEX_FILLS},
    "randperm": f"`frozen idx[k] = randperm(n)`: {FILLS['randperm']}.",
    "svd": "`let U, S, Vt = svd(M, k)`: top-k singular triplets of a matrix, in float32 "
    "(U [m, k], S [k], Vt [k, n]); init-time only; needs k <= min(m, n).",
    "diag": "`diag(v)`: the diagonal matrix of v; inside `@` chains it becomes a broadcast multiply.",
    "rownorm": "`rownorm(M)`: the L2 norm of each row of M, a vector [m].",
    "colnorm": "`colnorm(M)`: the L2 norm of each column of M, a vector [n].",
    "sqrt": "`sqrt(e)`: elementwise square root.",
    "exp": "`exp(e)`: elementwise exponential.",
    "elu": "`elu(e)`: elementwise ELU (alpha 1): e if e > 0 else exp(e) - 1.",
    "abs": "`abs(e)`: elementwise absolute value.",
    "sin": "`sin(e)`: elementwise sine (radians).",
    "cos": "`cos(e)`: elementwise cosine (radians).",
    "detach": "`detach(e)`: the same value, with no gradient flowing through it.",
    "dropout": "`dropout(h, p)`: training-time behaviour: while the model is in train mode, each entry of the "
    "forward-time value h is zeroed with probability p (a constant) and the rest scaled by 1 / (1 - p) "
    "(torch's dropout, as PEFT's lora_dropout); in eval mode and in `merged()`, h itself.",
    "min": "`min(a, b)`: the smaller of two constants; `min(e, c)` clamps a tensor e from above at constant c.",
    "max": "`max(a, b)`: the larger of two constants; `max(e, c)` clamps a tensor e from below at constant c.",
    "ceil_div": "`ceil_div(a, b)`: a divided by b rounded up, for two int constants (Python's -(-a // b)); "
    "of dims, a dim (`ceil_div(min(d_in, d_out), r)`, RandLoRA's number of bases; min and max of dims are dims "
    "too), with the divisor one term as for `//`, and no divisibility check.",
    "clamp": "`clamp(e, lo, hi)`: e limited to [lo, hi] (constants); the gradient passes at the bounds.",
    "eye": "`eye(n)`: the identity matrix [n, n]; init-time.",
    "inv": "`inv(M)`: the inverse of a square matrix, in float32; init-time only; a singular M is an error "
    "naming the layer (add damping, for example M + eps * trace(M) / n * eye(n)).",
    "trace": "`trace(M)`: the sum of the diagonal of a square matrix, a scalar.",
    "column": "`column(M, i)`: column i (a constant) of a matrix, a vector [m].",
    "dot": "`dot(v, h)`: the dot product of a vector with each per-token vector: one scalar per token.",
    "offdiag": "`offdiag(v, k)`: the [k, k] matrix with zero diagonal whose off-diagonal entries, row by row, "
    "are the k*(k-1) entries of v.",
    "householder": "`householder(U) @ h`: the product H_1 H_2 ... H_m of the reflections H_i = I - 2 u_i u_i^T / "
    "||u_i||^2 (u_i the columns of U [n, m]) applied to per-token vectors, without building the [n, n] matrix "
    "(compact WY form: two thin matmuls and an m x m triangular solve).",
    "blockdiag": "`blockdiag(R) @ h`: the block-diagonal matrix with the n blocks R[i] ([b, b] each, R [n, b, b]) "
    "applied to per-token vectors of length n*b, by reshaping h to [n, b]: the [n*b, n*b] matrix is never built. "
    "Blocks may be rectangular: R [n, p, q] is [n*p, n*q] (GraLoRA's block LoRAs).",
    "kron": "`kron(A, B) @ h`: the Kronecker product A (x) B ([a1*b1, a2*b2] for A [a1, a2], B [b1, b2]) applied "
    "to per-token vectors of length a2*b2 as A H B^T on h reshaped to H [a2, b2]: never built densely.",
    "rotate_half": "`rotate_half(n, g) @ h`: the [n, n] signed permutation that cuts per-token vectors of length n "
    "into groups of g (even, dividing n) and maps each group [h1, h2] (halves of g/2) to [-h2, h1], as rotary "
    "embeddings and PEFT's RoAd pair entry i with entry i + g/2 of its group; a reshape, never a matrix; check() "
    "tests g per layer.",
    "repeat_blocks": "`repeat_blocks(v, b, k)`: the vector v [n] cut into blocks of b consecutive entries (b divides "
    "n), each block repeated k times in place: [n*k] (torch's v.reshape(-1, b).repeat_interleave(k, dim=0)).",
    "butterfly": "`butterfly(R) @ h`: the orthogonal butterfly product B_m ... B_2 B_1 of BOFT (R [m, n, b, b], "
    "b even when m > 1, n a multiple of 2^(m-1)) applied to per-token vectors of length n*b. Factor k is "
    "P_k blockdiag(R[k-1]) P_k^T, P_k the block butterfly permutation that puts side by side the halves (b/2 "
    "entries each) of the blocks 2^(k-1) apart (P_1 = I); the chain is one value, so the number of factors m "
    "can be a hyper (the size of R's first dim). Applied as m reshapes and batched matmuls: neither the "
    "[n*b, n*b] matrix nor a permutation matrix is built (PEFT's BOFT builds both every step).",
    "blockcirculant": "`blockcirculant(K) @ h`: the block-circulant matrix whose [b, b] block (i, j) is the circulant "
    "with first row K[i, j] (C[r, c] = K[i, j, (c - r) mod b]; K [m, n, b], the matrix [m*b, n*b]) applied to "
    "per-token vectors of length n*b by FFTs of length b on h reshaped to [n, b] (torch.fft.rfft/irfft, in float32): "
    "never built densely; its transpose is the circulant of each block's kernel read backwards.",
    "scatter": "`scatter(v, I, m, n)`: the [m, n] matrix of zeros with v[j] at the row-major flat position I[j] "
    "(row I[j] // n, column I[j] % n), for v [k] and an index set I [k] (`frozen idx[k] = randperm(m * n)`); "
    "gradients flow to v. Builds the dense [m, n] matrix.",
    "sparse": "`sparse(v, I, m, n) @ h`: the [m, n] matrix scatter(v, I, m, n) (v[j] at row-major flat position "
    "I[j], an index set I [k]) applied to per-token vectors of length n as a sparse-times-dense product: "
    "y[..., I[j] // n] += v[j] h[..., I[j] % n], k multiply-adds per token; `.T @ h` applies its transpose. Never "
    "built densely (merged() adds it to W as scatter); gradients flow to v and h (sampled dense-dense product). "
    "Torch's CSR kernels, float32 for half precisions; SHiRA's sparse update.",
    "ifft2": "`ifft2(M)`: the real part of the inverse 2-D discrete Fourier transform of a real matrix M [m, n] "
    "(torch.fft.ifft2(M).real: entry [r, c] is the sum over k, l of M[k, l] cos(2 pi (r k / m + c l / n)) / (m n)); "
    "[m, n], computed in float32 (the FFT has no half-precision CPU kernel). The language has no complex values.",
    "haar": "`haar(n) @ h`: the one-level inverse Haar wavelet transform (orthonormal, [n, n], n even) applied to "
    "per-token vectors of length n: entries 2k and 2k + 1 of the result are (h[k] + h[n/2 + k]) / sqrt(2) and "
    "(h[k] - h[n/2 + k]) / sqrt(2) (approximation coefficients first, then details); `haar(n).T @ h` is the forward "
    "transform. Pairwise sums and differences: the matrix is never built.",
    "fold": "`fold(r, n) @ h`: the [r, n] matrix [I_r I_r ... I_r] (n columns, the last block cut short) applied "
    "to per-token vectors of length n: the sum of h's consecutive chunks of length r, the last one zero-padded "
    "(MiSS); `fold(r, n).T @ v` repeats v [r] to length n (v, v, ..., cut at n). r and n are dims.",
    "shuffle": "`shuffle(a, b) @ h`: the stride permutation [a*b, a*b] (a perfect shuffle for a = 2): h of length "
    "a*b read as an [a, b] matrix row by row, transposed to [b, a] and read out row by row (GraLoRA's exchange "
    "between blocks); shuffle(a, b).T is shuffle(b, a). a and b are dims.",
    "skew": "`skew(v, b)`: the skew-symmetric [b, b] matrix Q = U - U^T whose strict upper triangle U holds v "
    "row by row (v [b*(b-1)//2]); for v [n, b*(b-1)//2], the n matrices [n, b, b].",
    "cayley": "`cayley(Q)`: the Cayley transform (I + Q)(I - Q)^-1 of a square matrix (orthogonal for a "
    "skew-symmetric Q), or of each [b, b] block of a stack Q [..., b, b]; solved in float32 in every forward "
    "(torch.linalg.solve).",
    "cayley_neumann": "`cayley_neumann(Q, k)`: cayley(Q) by its Neumann series cut as PEFT's OFT cuts it "
    "(k >= 2 terms): I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1), with I + 2Q for k = 2; no inverse.",
    "reparametrize": "`reparametrize(mu, logvar)`: training-time behaviour, as `dropout`: while the model is in "
    "train mode, a sample mu + eps * exp(logvar / 2) of N(mu, exp(logvar)), eps ~ N(0, 1) drawn fresh from torch's "
    "RNG in every forward (the reparameterization trick; PEFT's PVeRA); in eval mode and in `merged()`, mu. mu and "
    "logvar are forward-time values of one shape.",
    "rows": "`rows(M, n)`: the first n rows of M ([m, ...] -> [n, ...]); n <= m for every target, as a shared "
    "tensor sized max_d_out sliced to d_out (`rows(B, d_out)`); a view: the gradient reaches M.",
    "cols": "`cols(M, n)`: the first n entries of M's last axis ([..., m] -> [..., n]), as `rows` "
    "(`cols(A, d_in)` of a shared A [r, max_d_in]).",
    "khatri_rao": "`khatri_rao(A, B)`: the column-wise Khatri-Rao product of A [m, k] and B [n, k], the "
    "[m*n, k] matrix whose row i*n + j is A[i] * B[j] entrywise (column c is the Kronecker product of the columns c; "
    "scipy.linalg.khatri_rao); built as A[:, None, :] * B[None], m*n*k numbers. RandLoRA's bases scaled by gamma.",
    "topk_mix": "`topk_mix(L, V, k)`: for each row l of logits L [..., n], the softmax of its k largest entries "
    "weighting the matching rows of V [n, b] (the other weights 0): [..., b]. VB-LoRA's mixture of vector-bank "
    "vectors (PEFT's _get_low_rank_matrix); the gradient reaches the k chosen logits and V.",
    "flatten": "`flatten(T)`: T [..., a, b] with its last two axes merged, row-major: [..., a*b] "
    "(`flatten(T)` of T [r, d_in // b, b] is [r, d_in]).",
    **STATISTICS,
}

ARITY = {"svd": 2, "diag": 1, "rownorm": 1, "colnorm": 1, "detach": 1, "min": 2, "max": 2}
ARITY.update({"clamp": 3, "eye": 1, "inv": 1, "trace": 1, "column": 2, "dot": 2, "offdiag": 2, "householder": 1})
ARITY.update({"blockdiag": 1, "kron": 2, "skew": 2, "cayley": 1, "cayley_neumann": 2, "dropout": 2})
ARITY.update({"reparametrize": 2})
ARITY.update({"rotate_half": 2, "repeat_blocks": 3, "butterfly": 1})
ARITY.update({"rows": 2, "cols": 2, "topk_mix": 3, "flatten": 1})
ARITY.update({"scatter": 4, "ifft2": 1, "haar": 1, "blockcirculant": 1})
ARITY.update({"fold": 2, "shuffle": 2, "sparse": 4})
ARITY.update({"ceil_div": 2, "khatri_rao": 2})
ARITY.update({name: 1 for name in STATISTICS})
ARITY.update({name: 1 for name in ELEMENTWISE})
ARITY.update({name: len(FILL_ARGS.get(name, ())) for name in FILLS})

NAMES = frozenset(ARITY)


def result_type(fn: str, args: list[Type], stages: list[int]) -> Type | str:
    """The type of fn(args), or a message saying what is wrong with the arguments."""
    if fn in ("min", "max"):
        tensors = [a for a in args if a.kind == "tensor"]
        if len(tensors) == 1 and not tensors[0].diag and not tensors[0].operator:
            other = args[1] if args[0].kind == "tensor" else args[0]
            if other.is_python and other.kind != "bool" and stages[args.index(other)] == CONST:
                return Type("tensor", tensors[0].shape, token=tensors[0].token)
        if not all(a.is_python and a.kind != "bool" for a in args) or max(stages) > CONST:
            return f"{fn}() takes two constants, or a tensor and a constant"
        return FLOAT if "float" in (a.kind for a in args) else args[0]
    if fn == "ceil_div":
        if any(a.kind != "int" for a in args) or max(stages) > CONST:
            return "ceil_div() takes two int constants"
        return args[0]
    if fn == "khatri_rao":
        a, b = args
        if any(not m.is_matrix or m.token or m.diag or m.operator for m in args) or a.shape[1] != b.shape[1]:
            return f"khatri_rao() takes two matrices with the same number of columns, not {a} and {b}"
        return tensor(a.shape[0] * b.shape[0], a.shape[1])
    if fn in STATISTICS:
        return f"{fn}() is a statistic: write `stat NAME = {fn}(x)`"
    if fn == "clamp":
        value, lo, hi = args
        if value.kind != "tensor" or value.diag or value.operator:
            return f"clamp() takes a tensor first, not {value}"
        if not (lo.is_python and hi.is_python) or max(stages[1:]) > CONST:
            return "clamp() takes constant bounds"
        return value
    if fn == "eye":
        (n,) = args
        if n.kind != "int" or stages[0] > CONST:
            return "eye() takes a dimension"
        return Type("tensor", (_RANK, _RANK))
    if fn in ("inv", "trace"):
        (arg,) = args
        if not arg.is_matrix or arg.token or arg.diag or arg.operator or arg.shape[0] != arg.shape[1]:
            return f"{fn}() takes a square matrix, not {arg}"
        if fn == "inv" and stages[0] > INIT:
            return "inv() runs once at init: its matrix cannot depend on params, x or y"
        return arg if fn == "inv" else tensor()
    if fn == "column":
        matrix, i = args
        if not matrix.is_matrix or matrix.token or matrix.diag or matrix.operator:
            return f"column() takes a matrix first, not {matrix}"
        if i.kind != "int" or stages[1] > CONST:
            return "column() takes a constant column index second"
        return tensor(matrix.shape[0])
    if fn == "dot":
        v, h = args
        if v.kind != "tensor" or len(v.shape) != 1 or v.token:
            return f"dot() takes a vector first, not {v}"
        if h.kind != "tensor" or h.shape != v.shape:
            return f"dot() takes a second vector of the same length as the first ({v}), not {h}"
        return Type("tensor", (), token=h.token)
    if fn == "offdiag":
        v, k = args
        if v.kind != "tensor" or len(v.shape) != 1 or v.token:
            return f"offdiag() takes a vector first, not {v}"
        if k.kind != "int" or stages[1] > CONST:
            return "offdiag() takes a dimension k second"
        return Type("tensor", (_RANK, _RANK))
    if fn == "householder":
        (u,) = args
        if not u.is_matrix or u.token or u.diag or u.operator:
            return f"householder() takes a matrix of reflection vectors (columns), not {u}"
        return Type("tensor", (u.shape[0], u.shape[0]), operator="householder")
    if fn == "blockdiag":
        (blocks,) = args
        if blocks.kind != "tensor" or len(blocks.shape) != 3 or blocks.token:
            return f"blockdiag() takes blocks [n, p, q] (square: [n, b, b]), not {blocks}"
        n, p, q = blocks.shape
        return Type("tensor", (n * p, n * q), operator="blockdiag")
    if fn == "butterfly":
        (blocks,) = args
        if blocks.kind != "tensor" or len(blocks.shape) != 4 or blocks.token or blocks.shape[2] != blocks.shape[3]:
            return f"butterfly() takes the square blocks of each factor [m, n, b, b], not {blocks}"
        size = blocks.shape[1] * blocks.shape[2]
        return Type("tensor", (size, size), operator="butterfly")
    if fn in ("scatter", "sparse"):  # values at an index set's positions of an [m, n] matrix
        v, index, m, n = args
        if v.kind != "tensor" or len(v.shape) != 1 or v.token or v.integer:
            return f"{fn}() takes a vector of values first, not {v}"
        if not index.integer or index.shape != v.shape:
            return f"{fn}() takes an index set as long as the values second (frozen idx[k] = randperm(n)), not {index}"
        if m.kind != "int" or n.kind != "int" or max(stages[2:]) > CONST:
            return f"{fn}() takes the dimensions m and n of the matrix third and fourth"
        # the checker puts in m and n
        return Type("tensor", (_RANK, _RANK)) if fn == "scatter" else Type("tensor", (_RANK, _COLS), operator="sparse")
    if fn == "haar":
        (n,) = args
        if n.kind != "int" or stages[0] > CONST:
            return "haar() takes a dimension n (even)"
        return Type("tensor", (_RANK, _RANK), operator="haar")
    if fn == "ifft2":
        (matrix,) = args
        if not matrix.is_matrix or matrix.token or matrix.diag or matrix.operator or matrix.integer:
            return f"ifft2() takes a matrix, not {matrix}"
        return matrix
    if fn == "blockcirculant":
        (kernel,) = args
        if kernel.kind != "tensor" or len(kernel.shape) != 3 or kernel.token:
            return f"blockcirculant() takes kernels [m, n, b], not {kernel}"
        rows, cols, b = kernel.shape
        return Type("tensor", (rows * b, cols * b), operator="blockcirculant")
        if blocks.kind != "tensor" or len(blocks.shape) != 3 or blocks.token:
            return f"blockdiag() takes blocks [n, p, q] (square: [n, b, b]), not {blocks}"
        n, p, q = blocks.shape
        return Type("tensor", (n * p, n * q), operator="blockdiag")
    if fn == "kron":
        a, b = args
        if not (a.is_matrix and b.is_matrix) or a.token or b.token or a.diag or b.diag or a.operator or b.operator:
            return f"kron() takes two matrices, not {a} and {b}"
        return Type("tensor", (a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]), operator="kron")
    if fn == "rotate_half":
        n, g = args
        if n.kind != "int" or g.kind != "int" or max(stages) > CONST:
            return "rotate_half() takes two dimensions, the size n and the group size g"
        return Type("tensor", (_RANK, _RANK), operator="rotate_half")
    if fn == "repeat_blocks":
        v, b, k = args
        if v.kind != "tensor" or len(v.shape) != 1 or v.token or v.diag or v.operator:
            return f"repeat_blocks() takes a vector first, not {v}"
        if b.kind != "int" or k.kind != "int" or max(stages[1:]) > CONST:
            return "repeat_blocks() takes a constant block size and a constant count"
        return tensor(v.shape[0] * _RANK)
    if fn == "fold":
        if any(a.kind != "int" for a in args) or max(stages) > CONST:
            return "fold() takes two dims: the chunk length r and the vector length n"
        return Type("tensor", (_RANK, _COLS), operator="fold")
    if fn == "shuffle":
        if any(a.kind != "int" for a in args) or max(stages) > CONST:
            return "shuffle() takes two dims a and b (h of length a*b read as [a, b])"
        return Type("tensor", (_RANK * _COLS, _RANK * _COLS), operator="shuffle")
    if fn == "skew":
        v, b = args
        if v.kind != "tensor" or len(v.shape) not in (1, 2) or v.token or v.diag or v.operator:
            return f"skew() takes a vector or a matrix (one row per block) first, not {v}"
        if b.kind != "int" or stages[1] > CONST:
            return "skew() takes a block size b second"
        return Type("tensor", (*v.shape[:-1], _RANK, _RANK))
    if fn in ("cayley", "cayley_neumann"):
        q = args[0]
        square = q.kind == "tensor" and len(q.shape) >= 2 and q.shape[-1] == q.shape[-2]
        if not square or q.token or q.diag or q.operator:
            return f"{fn}() takes a square matrix or a stack of square blocks [..., b, b], not {q}"
        if fn == "cayley_neumann" and (args[1].kind != "int" or stages[1] > CONST):
            return "cayley_neumann() takes a constant number of terms second"
        return q
    if fn in ("rows", "cols"):
        m, n = args
        if m.kind != "tensor" or not m.shape or m.token or m.diag or m.operator:
            return f"{fn}() takes a tensor first, not {m}"
        if n.kind != "int" or stages[1] > CONST:
            return f"{fn}() takes a dimension second"
        return Type("tensor", (_RANK, *m.shape[1:]) if fn == "rows" else (*m.shape[:-1], _RANK))
    if fn == "topk_mix":
        logits, bank, k = args
        if logits.kind != "tensor" or not logits.shape or logits.token or logits.diag or logits.operator:
            return f"topk_mix() takes logits [..., n] first, not {logits}"
        if not bank.is_matrix or bank.token or bank.diag or bank.operator or bank.shape[0] != logits.shape[-1]:
            return f"topk_mix() takes vectors second, one row per logit: [{logits.shape[-1]}, b], not {bank}"
        if k.kind != "int" or stages[2] > CONST:
            return "topk_mix() takes a constant k third"
        return Type("tensor", (*logits.shape[:-1], bank.shape[1]))
    if fn == "flatten":
        (t,) = args
        if t.kind != "tensor" or len(t.shape) < 2 or t.token or t.diag or t.operator:
            return f"flatten() takes a tensor of 2 or more axes, not {t}"
        return Type("tensor", (*t.shape[:-2], t.shape[-2] * t.shape[-1]))
    if fn in ELEMENTWISE:
        (arg,) = args
        if arg.kind == "tuple" or arg.diag or arg.operator:
            return f"{fn}() takes a scalar or a tensor, not {arg}"
        if fn == "elu" and arg.is_python:
            return "elu() takes a tensor, not a constant"
        return FLOAT if arg.is_python else Type("tensor", arg.shape, token=arg.token)
    if fn == "dropout":
        value, p = args
        if value.kind != "tensor" or value.diag or value.operator:
            return f"dropout() takes a tensor first, not {value}"
        if not p.is_python or p.kind == "bool" or stages[1] > CONST:
            return "dropout() takes a constant probability second"
        if stages[0] < FORWARD:
            return "dropout() runs in every training forward: its value must be forward-time (read x, y or a param)"
        return value
    if fn == "reparametrize":
        mu, logvar = args
        if mu.kind != "tensor" or mu.diag or mu.operator or mu != logvar:
            return f"reparametrize() takes mu and logvar, two tensors of one shape, not {mu} and {logvar}"
        if max(stages) < FORWARD:
            return "reparametrize() samples in every training forward: mu and logvar must be forward-time"
        return mu
    if fn == "detach":
        (arg,) = args
        return (
            arg if arg.kind == "tensor" and not arg.diag and not arg.operator else f"detach() takes a tensor, not {arg}"
        )
    if fn in ("rownorm", "colnorm"):
        (arg,) = args
        if not arg.is_matrix or arg.token or arg.diag:
            return f"{fn}() takes a matrix, not {arg}"
        return tensor(arg.shape[0] if fn == "rownorm" else arg.shape[1])
    if fn == "diag":
        (arg,) = args
        if arg.kind != "tensor" or len(arg.shape) != 1 or arg.token:
            return f"diag() takes a vector, not {arg}"
        return Type("tensor", (arg.shape[0], arg.shape[0]), diag=True)
    if fn == "svd":
        matrix, k = args
        if not matrix.is_matrix or matrix.token or matrix.diag:
            return f"svd() takes a matrix first, not {matrix}"
        if k.kind != "int" or stages[1] > CONST:
            return f"svd() takes an int constant rank second, not {k}"
        if stages[0] > INIT:
            return "svd() runs once at init: its matrix cannot depend on params, x or y"
        return Type("tuple", items=(tensor(matrix.shape[0], _RANK), tensor(_RANK), tensor(_RANK, matrix.shape[1])))
    raise AssertionError(fn)


# Placeholder for the rank dim of svd; the checker substitutes the real k.
_RANK = Dim.of("__rank__")


def substitute_rank(t: Type, rank: Dim) -> Type:
    """Put the dim given as an argument (svd's k, eye's n, offdiag's k, skew's b) into a result type."""
    shape = tuple(_substitute(d, _RANK, rank) for d in t.shape)
    return Type(t.kind, shape, token=t.token, diag=t.diag, operator=t.operator)


# The second placeholder dim, for a call with two dim arguments (fold's n); the checker substitutes it.
_COLS = Dim.of("__cols__")


def substitute_cols(t: Type, cols: Dim) -> Type:
    """Put the second dim given as an argument (fold's n, shuffle's b) into a result type."""
    shape = tuple(_substitute(d, _COLS, cols) for d in t.shape)
    return Type(t.kind, shape, token=t.token, diag=t.diag, operator=t.operator)


def _substitute(d: Dim, placeholder: Dim, value: Dim) -> Dim:
    """d with the placeholder atom replaced by value, also inside products (shuffle's a*b)."""
    (((atom,), _),) = placeholder.terms
    out = Dim.const(0)
    for mono, coef in d.terms:
        term = Dim.const(coef)
        for a in mono:
            term = term * (value if a == atom else Dim.of(a))
        out = out + term
    return out


# Calls whose value is computed once at init, whatever their arguments' stage.
INIT_TIME = {"svd", "eye", "inv"}
# Calls whose second (or only, for eye) argument is a dim that enters the result shape.
DIM_ARGUMENT = {"svd": 1, "eye": 0, "offdiag": 1, "skew": 1, "rotate_half": 0, "repeat_blocks": 2, "rows": 1}
DIM_ARGUMENT |= {"cols": 1, "haar": 0, "fold": 0, "shuffle": 0, "sparse": 2}
# Calls whose argument at this index is a second dim that enters the result shape (as _COLS).
COLS_ARGUMENT = {"fold": 1, "shuffle": 1, "sparse": 3}
