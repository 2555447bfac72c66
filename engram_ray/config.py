"""Configuration: frozen keyword-only dataclasses and named presets.

Every field maps 1:1 onto a JSON key, so a config file is just ``asdict`` of the dataclass.
Unknown keys are refused by name rather than silently ignored, because a typo in a table
config silently changes nothing but the user's expectations.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EngramConfig",
    "ModelConfig",
    "TrainConfig",
    "model_tiny",
    "model_demo",
    "model_dense_1b",
    "MODEL_PRESETS",
    "model_preset",
    "OptimizerConfig",
    "StoreConfig",
    "ServiceConfig",
    "PRESETS",
    "FLOAT_DTYPES",
    "preset",
    "tiny",
    "demo",
    "reference_demo",
    "paper_27b",
    "table_100b",
    "deepseek_v41_flash",
    "with_table_params",
    "MIN_LR",
    "MAX_LR",
    "lr_error",
]

# numpy.random.default_rng accepts seeds up to this (and the reference adds 10007 * layer).
_MAX_SEED = 2**63 - 1


def _field_error(cls_name: str, name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{cls_name}.{name}={value!r}: expected {expected}")


def _int_tuple(cls_name: str, name: str, value: Any) -> tuple[int, ...]:
    """Accept a list/tuple of ints (JSON gives lists); refuse bools, floats and strings."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _field_error(cls_name, name, value, "a list of integers")
    out = tuple(value)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _field_error(cls_name, name, value, "a list of integers")
    return out


def _check_int(cls_name: str, name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(cls_name, name, value, "an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _field_error(cls_name, name, value, f"an integer {bound}")


class _JsonFields:
    """``to_dict`` / ``from_dict`` for a config dataclass: JSON keys are the field names."""

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v
        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]  # mixed into dataclasses only

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        return _from_dict(cls, data)


@dataclass(frozen=True, kw_only=True)
class EngramConfig(_JsonFields):
    """The Engram memory: which n-grams are hashed, into how many rows, of what width.

    Field names and defaults are those of the reference demo (``engram_demo_v1.py``), so a
    table trained with the reference maps onto the same row ids here.
    """

    #: Table size per n-gram order (orders 2..N), per head: each head's table is the
    #: smallest unused prime >= this number.
    engram_vocab_size: tuple[int, ...] = (129280 * 5, 129280 * 5)
    #: Largest n-gram order N; orders 2..N are hashed.
    max_ngram_size: int = 3
    #: Embedding width per n-gram order, split evenly over its heads.
    n_embed_per_ngram: int = 512
    #: Hash heads (and tables) per n-gram order.
    n_head_per_ngram: int = 8
    #: Transformer layers that carry an Engram module.
    layer_ids: tuple[int, ...] = (1, 15)
    #: Pad token id in the *original* tokenizer's id space (it is compressed like any id).
    pad_id: int = 2
    #: Seed of the per-layer hash multipliers.
    seed: int = 0
    #: Kernel of the causal ShortConv after the gated value.
    kernel_size: int = 4
    #: The ShortConv's initial weights: "zero" as the paper says (Y = SiLU(conv(.)) + V starts
    #: as the identity, so the branch learns a correction), or "default", PyTorch's own init,
    #: as the reference demo (engram_demo_v1.py) leaves it. The table's rows do not depend on it.
    short_conv_init: str = "zero"

    def __post_init__(self) -> None:
        name = type(self).__name__
        # Lists from JSON become tuples so the config stays hashable and immutable.
        object.__setattr__(self, "engram_vocab_size",
                           _int_tuple(name, "engram_vocab_size", self.engram_vocab_size))
        object.__setattr__(self, "layer_ids", _int_tuple(name, "layer_ids", self.layer_ids))
        _check_int(name, "max_ngram_size", self.max_ngram_size, 2, 16)
        _check_int(name, "n_head_per_ngram", self.n_head_per_ngram, 1)
        _check_int(name, "n_embed_per_ngram", self.n_embed_per_ngram, 1)
        _check_int(name, "pad_id", self.pad_id, 0)
        _check_int(name, "seed", self.seed, 0, _MAX_SEED - 10007 * 4096)
        _check_int(name, "kernel_size", self.kernel_size, 1)
        if self.short_conv_init not in ("zero", "default"):
            raise _field_error(name, "short_conv_init", self.short_conv_init, '"zero" (the paper) or "default"')
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise _field_error(
                name, "engram_vocab_size", list(self.engram_vocab_size),
                f"one size per n-gram order 2..{self.max_ngram_size}, i.e. "
                f"{self.max_ngram_size - 1} entries (max_ngram_size={self.max_ngram_size})")
        for v in self.engram_vocab_size:
            if v < 2 or v > 2**40:
                raise _field_error(name, "engram_vocab_size", list(self.engram_vocab_size),
                                   "sizes in [2, 2**40]")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise _field_error(
                name, "n_embed_per_ngram", self.n_embed_per_ngram,
                f"a multiple of n_head_per_ngram={self.n_head_per_ngram}")
        if not self.layer_ids:
            raise _field_error(name, "layer_ids", list(self.layer_ids), "at least one layer id")
        if len(set(self.layer_ids)) != len(self.layer_ids) or min(self.layer_ids) < 0:
            raise _field_error(name, "layer_ids", list(self.layer_ids),
                               "distinct non-negative layer ids")
        if max(self.layer_ids) > 4096:
            raise _field_error(name, "layer_ids", list(self.layer_ids), "layer ids <= 4096")

    # Derived shapes -------------------------------------------------------------------
    @property
    def orders(self) -> range:
        """The hashed n-gram orders, 2..N."""
        return range(2, self.max_ngram_size + 1)

    @property
    def heads_per_layer(self) -> int:
        """Hash heads per Engram layer: (N-1) orders x K heads."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def row_dim(self) -> int:
        """Width of one table row (one head's embedding)."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of the concatenated memory vector per token per layer ("d_mem")."""
        return self.heads_per_layer * self.row_dim

    # JSON -------------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> EngramConfig:
        """Load from a JSON file path, or from JSON text (anything starting with ``{`` or ``[``)."""
        text = str(path_or_text)
        if not text.lstrip().startswith(("{", "[")):
            text = Path(path_or_text).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cls.__name__}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known keys are {', '.join(sorted(names))}")
    return cls(**data)


_OPTIMIZERS = ("adam", "sgd", "none")
#: Dtypes a table's rows are stored (and served) in, with their width in bytes: the one
#: list (the codec, checkpoints, plan and the CLI read it from here).
#: fp8_e4m3 is a packed row, not a per-value width: a row of D values is D e4m3 code bytes
#: and D/32 ue8m0 scale bytes (core/fp8.py; core/dtypes.row_width), read-only.
STORE_DTYPE_BYTES: Mapping[str, int] = types.MappingProxyType({"float32": 4, "bfloat16": 2, "float16": 2,
                                                               "fp8_e4m3": 1})
STORE_DTYPES = tuple(STORE_DTYPE_BYTES)
#: The storage dtypes that hold values one by one (gradients come in these, or float64).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
#: Short names accepted wherever a storage dtype is given.
DTYPE_ALIASES: Mapping[str, str] = types.MappingProxyType({"fp32": "float32", "f32": "float32", "bf16": "bfloat16",
                                                     "fp16": "float16", "f16": "float16", "half": "float16",
                                                     "fp8": "fp8_e4m3", "e4m3": "fp8_e4m3"})


def store_dtype(name: str) -> str:
    """The canonical storage dtype of ``name`` (``bf16``-style aliases and any case accepted)."""
    canonical = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if canonical not in STORE_DTYPE_BYTES:
        raise ValueError(f"storage dtype {name!r}: expected one of {', '.join(STORE_DTYPES)} "
                         f"(or {', '.join(DTYPE_ALIASES)})")
    return canonical


def _check_float(cls_name: str, name: str, value: Any, lo: float, hi: float, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(cls_name, name, value, "a number")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above or value != value:
        raise _field_error(cls_name, name, value,
                           f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig(_JsonFields):
    """The sparse optimiser the shards apply to pushed row gradients.

    Adam without weight decay, with its own learning rate, as the paper trains Engram tables;
    bias correction uses a step count *per row*, so how a batch is split over shards or
    messages never changes the result.
    """

    kind: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.kind not in _OPTIMIZERS:
            raise _field_error(name, "kind", self.kind, f"one of {', '.join(_OPTIMIZERS)}")
        _check_float(name, "lr", self.lr, 0.0, 1e3, lo_open=True)
        _check_float(name, "beta1", self.beta1, 0.0, 1.0, hi_open=True)
        _check_float(name, "beta2", self.beta2, 0.0, 1.0, hi_open=True)
        _check_float(name, "eps", self.eps, 0.0, 1.0, lo_open=True)


@dataclass(frozen=True, kw_only=True)
class StoreConfig(_JsonFields):
    """How shards hold rows: storage dtype, deterministic initialisation, optimiser."""

    #: float32, bfloat16 (via ml_dtypes) or float16.
    dtype: str = "float32"
    #: Rows start as N(0, init_std^2); the reference's nn.Embedding uses 1.0.
    init_std: float = 1.0
    #: Seed of the row initialisation (a row's values depend only on this and its id).
    init_seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    #: Benchmarks only: cap each shard's resident rows (0 = every row resident). A capped
    #: shard maps local row r to resident row r mod cap, so a lookup still reads a random row
    #: of a large array in RAM, for a table larger than the machines' RAM; it serves lookups
    #: only (no updates, no checkpoints).
    resident_rows_per_shard: int = 0
    #: "ram" (rows in a numpy array) or "mmap": rows in a file under ``data_dir``, memory-
    #: mapped, so a node serves more table than it has RAM (the page cache is the hot tier).
    #: The file is filled once (from the checkpoint, or the initial rows) and reopened
    #: without a copy on restart; updates (SGD) land in it. Not with Adam, whose state
    #: (twice the rows, in RAM) would defeat it, nor with a resident cap.
    storage: str = "ram"
    #: Where an mmap shard keeps its rows file (one per shard range and layout).
    data_dir: str = ""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.optimizer, Mapping):
            object.__setattr__(self, "optimizer", _from_dict(OptimizerConfig, self.optimizer))
        try:
            dtype = store_dtype(self.dtype) if isinstance(self.dtype, str) else None
        except ValueError:
            dtype = None
        if dtype is None:
            raise _field_error(name, "dtype", self.dtype, f"one of {', '.join(STORE_DTYPES)}")
        object.__setattr__(self, "dtype", dtype)
        _check_float(name, "init_std", self.init_std, 0.0, 1e6)
        _check_int(name, "init_seed", self.init_seed, 0, 2**63 - 1)
        _check_int(name, "resident_rows_per_shard", self.resident_rows_per_shard, 0)
        if dtype == "fp8_e4m3" and self.optimizer.kind != "none":
            raise _field_error(name, "optimizer", self.optimizer.kind, "'none' with dtype='fp8_e4m3' (an FP8 "
                               "table is served read-only)")
        if self.storage not in ("ram", "mmap"):
            raise _field_error(name, "storage", self.storage, '"ram" or "mmap"')
        if self.storage == "mmap":
            if not self.data_dir:
                raise _field_error(name, "data_dir", self.data_dir, "a directory for the mapped rows file "
                                   "(storage='mmap')")
            if self.optimizer.kind == "adam":
                raise _field_error(name, "optimizer", "adam", "'none' or 'sgd' with storage='mmap' (Adam's "
                                   "state is twice the rows, in RAM)")
            if self.resident_rows_per_shard:
                raise _field_error(name, "resident_rows_per_shard", self.resident_rows_per_shard,
                                   "0 with storage='mmap' (a mapped shard holds every row)")



@dataclass(frozen=True, kw_only=True)
class ServiceConfig(_JsonFields):
    """How a memory service runs: who may call it, what it accepts, how it recovers."""

    #: Require a shared secret token (generated at deploy, handed to clients by the service
    #: handle) on every data-plane call; calls without it get UNAUTHENTICATED.
    auth: bool = True
    #: TLS: PEM files of the servers' certificate chain and private key, at the same path on
    #: every memory node. Empty: plaintext (the token still guards the service).
    tls_cert: str = ""
    tls_key: str = ""
    #: PEM of the CA clients trust (default: tls_cert itself, for a self-signed certificate).
    tls_ca: str = ""
    #: Most row ids in one Lookup or ApplyGradients request (RESOURCE_EXHAUSTED above).
    max_ids_per_request: int = 1 << 20
    #: Largest message either way, in bytes.
    max_message_bytes: int = 64 << 20
    #: Authenticated EngramMemory calls one shard serves at once; more get RESOURCE_EXHAUSTED,
    #: and clients back off. Unauthenticated calls and health checks never count against it.
    max_concurrent_rpcs: int = 64
    #: gRPC handler threads per shard.
    max_workers: int = 8
    #: LookupStreams one shard serves at once, each on a thread of its own for its life (at
    #: most 600 s): a node's lookup agent keeps one per shard it reads; past the limit clients
    #: use Lookup. 0: no streams.
    max_lookup_streams: int = 16
    #: Copies of each shard, on different nodes where the cluster has them.
    replicas: int = 1
    #: Directory for recovery checkpoints ("" = none): each shard writes its own there and
    #: reloads the newest after a restart. Use a disk that outlives the shard's process (a
    #: shared filesystem if a shard may restart on another node).
    checkpoint_dir: str = ""
    #: Seconds between a shard's automatic recovery checkpoints (0 = on demand only).
    checkpoint_every_s: float = 0.0
    #: How many times Ray restarts a shard actor that died (-1: always).
    max_restarts: int = -1
    #: Directory on each memory node under which Save (engram-ray checkpoint --dir, and
    #: MemoryService.save) may write portable checkpoints; the path a client gives is taken
    #: relative to it. "" = such saves are refused (recovery checkpoints still work).
    save_root: str = ""
    #: Seconds a copy that rejoins may take to stream the primary's rows; past it the primary
    #: gives the join up (the copy tries again) and pushes stop waiting for it.
    join_timeout_s: float = 3600.0
    #: Seconds a shard copy remembers the id of a push it applied, so that a retry of it is
    #: answered, not applied again (at most the last 1,000,000 pushes, whichever is fewer).
    dedup_window_s: float = 600.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_int(name, "max_ids_per_request", self.max_ids_per_request, 1)
        _check_int(name, "max_message_bytes", self.max_message_bytes, 1 << 16, 2**31 - 1)
        _check_int(name, "max_concurrent_rpcs", self.max_concurrent_rpcs, 1)
        _check_int(name, "max_workers", self.max_workers, 1, 1024)
        _check_int(name, "max_lookup_streams", self.max_lookup_streams, 0, 1024)
        _check_int(name, "replicas", self.replicas, 1, 16)
        _check_int(name, "max_restarts", self.max_restarts, -1)
        _check_float(name, "checkpoint_every_s", self.checkpoint_every_s, 0.0, 1e9)
        _check_float(name, "join_timeout_s", self.join_timeout_s, 1.0, 1e7)
        _check_float(name, "dedup_window_s", self.dedup_window_s, 1.0, 1e7)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise _field_error(name, "tls_cert/tls_key", (self.tls_cert, self.tls_key),
                               "both paths or neither")
        if self.checkpoint_every_s and not self.checkpoint_dir:
            raise _field_error(name, "checkpoint_every_s", self.checkpoint_every_s,
                               "0 unless checkpoint_dir is set")


_FFNS = ("moe", "dense")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_JsonFields):
    """The backbone: a decoder-only transformer with DeepSeek-style MoE and hyper-connections."""

    vocab_size: int = 50257
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 512
    #: "moe" (shared + top-k routed experts) or "dense" (one SwiGLU FFN, for baselines).
    ffn: str = "moe"
    #: Hidden width of the dense FFN and of each expert.
    ffn_dim: int = 512
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    top_k: int = 2
    #: Weight of the load-balancing term added to the loss.
    aux_loss_weight: float = 0.01
    #: Hyper-connection expansion: residual streams per token (1 = plain residual; paper: 4).
    hc_mult: int = 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    #: Share the token embedding with the output head (halves the vocab-sized parameters).
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_dim",
                  "n_routed_experts", "top_k", "hc_mult"):
            _check_int(name, f, getattr(self, f), 1)
        _check_int(name, "n_shared_experts", self.n_shared_experts, 0)
        if self.ffn not in _FFNS:
            raise _field_error(name, "ffn", self.ffn, f"one of {', '.join(_FFNS)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise _field_error(name, "dim", self.dim, f"a multiple of n_heads={self.n_heads} with an "
                               "even head size (rotary embeddings rotate pairs)")
        if self.top_k > self.n_routed_experts:
            raise _field_error(name, "top_k", self.top_k,
                               f"at most n_routed_experts={self.n_routed_experts}")
        _check_float(name, "aux_loss_weight", self.aux_loss_weight, 0.0, 10.0)
        _check_float(name, "rope_theta", self.rope_theta, 1.0, 1e9)
        _check_float(name, "norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)



def model_tiny() -> ModelConfig:
    """For unit tests: three layers of width 32, four routed experts, a 97-token vocabulary."""
    return ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=2, max_seq_len=64, ffn_dim=48,
                       n_routed_experts=4, n_shared_experts=1, top_k=2)


def model_demo() -> ModelConfig:
    """The CPU demo's backbone: 4 layers of 128 over GPT-2's vocabulary (a few minutes of CPU)."""
    return ModelConfig(vocab_size=50257, dim=128, n_layers=4, n_heads=4, max_seq_len=256,
                       ffn_dim=256, n_routed_experts=4, n_shared_experts=1, top_k=2)


def model_dense_1b() -> ModelConfig:
    """A ~1B-parameter dense backbone for GPU runs (bf16-friendly: every width a multiple of
    128): 16 layers of 2048, 16 heads of 128, SwiGLU FFN of 6144, GPT-2's vocabulary (tied):
    16 x (4 x 2048^2 + 3 x 2048 x 6144) + 50257 x 2048 = 0.98B parameters. Large enough that a
    forward is GPU-bound, so ``bench offload`` on CUDA measures the table against real compute;
    16 layers hold the Engram layers of every table preset (the 100B table's sit at 2 and 15).
    2048 positions: the paper's serving workload (prompts and outputs up to 1024 each)."""
    return ModelConfig(vocab_size=50257, dim=2048, n_layers=16, n_heads=16, max_seq_len=2048,
                       ffn="dense", ffn_dim=6144)


#: Backbone presets by name (``engram-ray bench offload --model``).
MODEL_PRESETS: Mapping[str, Callable[[], ModelConfig]] = types.MappingProxyType({
    "tiny": model_tiny,
    "demo": model_demo,
    "dense_1b": model_dense_1b,
})


def model_preset(name: str) -> ModelConfig:
    """The named backbone preset (``tiny``, ``demo``, ``dense_1b``; ``-`` accepted for ``_``)."""
    fn = MODEL_PRESETS.get(name.replace("-", "_"))
    if fn is None:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return fn()


#: The learning rates a push may carry, per step: at least MIN_LR (smaller rounds to 0 in the
#: float32 step while Adam's state still advances), at most MAX_LR (Adam moves a row by about
#: lr a step: anything larger is a mistake, or an attack on the rows).
MIN_LR = 1e-12
MAX_LR = 10.0


def lr_error(lr: object) -> str | None:
    """Why ``lr`` is not a push's learning rate (None: it is one). Bools and NaN are refused."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not MIN_LR <= float(lr) <= MAX_LR:
        return f"learning rate {lr!r}: expected a finite rate in [{MIN_LR:g}, {MAX_LR:g}]"
    return None


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_JsonFields):
    """The training loop, with the paper's recipe (arXiv 2601.07372, training details):

    * the backbone: AdamW at ``lr`` with ``warmup_steps`` of linear warmup, then a cosine
      decay to a tenth; weight decay on weight matrices (linear, embedding and convolution
      weights, the Engram layers' projections included), not on biases or other vectors, not
      on the Engram layers' RMSNorm gains (stored ``[n, D]``: matrices by shape only), not on
      the hyper-connections' mixing (initialised to the identity: decay would pull it to zero);
    * the Engram rows: the shards' sparse Adam (StoreConfig.optimizer), without weight decay,
      at ``table_lr_mult`` x the backbone's scheduled rate, sent with every push (the paper:
      5x, same warmup and decay). 0: the shards' own constant rate, as before the recipe.
    """

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    #: Learning rate of the Engram rows as a multiple of the backbone's, on its schedule (0:
    #: the rate the table was deployed with, constant).
    table_lr_mult: float = 5.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            _check_int(name, f, getattr(self, f), 1)
        _check_int(name, "warmup_steps", self.warmup_steps, 0)
        _check_int(name, "seed", self.seed, 0)
        _check_float(name, "lr", self.lr, 0.0, 10.0, lo_open=True)
        _check_float(name, "weight_decay", self.weight_decay, 0.0, 10.0)
        _check_float(name, "table_lr_mult", self.table_lr_mult, 0.0, 1e6)
        if self.table_lr_mult and self.table_lr_mult * self.lr > MAX_LR:
            raise _field_error(name, "table_lr_mult", self.table_lr_mult,
                               f"table_lr_mult x lr <= {MAX_LR:g} (lr={self.lr:g}): the rows' peak rate")
        _check_float(name, "grad_clip", self.grad_clip, 0.0, 1e6)



# Presets ------------------------------------------------------------------------------

def reference_demo() -> EngramConfig:
    """The reference demo's defaults (``engram_demo_v1.py``): 2 layers, orders 2-3, 8 heads,
    and its ShortConv init (PyTorch's default, not the paper's zeros)."""
    return EngramConfig(short_conv_init="default")


def tiny() -> EngramConfig:
    """Small enough for unit tests: one thousand-ish rows per head, two layers."""
    return EngramConfig(engram_vocab_size=(1000, 1000), max_ngram_size=3, n_embed_per_ngram=32,
                        n_head_per_ngram=2, layer_ids=(1, 2), pad_id=0, seed=0, kernel_size=4)


def demo() -> EngramConfig:
    """The CPU demo: ~640k rows of 32 floats (~82 MB fp32) over two Engram layers."""
    return EngramConfig(engram_vocab_size=(40_000, 40_000), max_ngram_size=3,
                        n_embed_per_ngram=128, n_head_per_ngram=4, layer_ids=(1, 3),
                        pad_id=0, seed=0, kernel_size=4)


def paper_27b() -> EngramConfig:
    """Engram-27B of the paper: vocab 2,262,400 per head, orders 2-3, 8 heads, d_mem 1280,
    layers [2, 15] -- 5.79B table parameters (rows of 80)."""
    return EngramConfig(engram_vocab_size=(2_262_400, 2_262_400), max_ngram_size=3,
                        n_embed_per_ngram=640, n_head_per_ngram=8, layer_ids=(2, 15),
                        pad_id=2, seed=0, kernel_size=4)


def table_100b() -> EngramConfig:
    """A 100B-parameter table for the offload benchmark (the paper's Table 4 size): the
    Engram-27B geometry with 39,062,500 rows per head -- 32 heads x 39.06M rows x 80."""
    return EngramConfig(engram_vocab_size=(39_062_500, 39_062_500), max_ngram_size=3,
                        n_embed_per_ngram=640, n_head_per_ngram=8, layer_ids=(2, 15),
                        pad_id=2, seed=0, kernel_size=4)


def deepseek_v41_flash() -> EngramConfig:
    """The Engram layers of DeepSeek-V4.1-Flash's checkpoint: layers 1 and 14, n-gram orders
    2-4 with 8 heads each (24 tables per layer), rows of 256 values (stored there as FP8 e4m3
    with ue8m0 block scales, 264 bytes). Every head's vocabulary is 16,000,000: the primes that
    follow give exactly the checkpoint's 384,006,168 rows for layer 1 and 384,016,682 for layer
    14 (768,022,850 rows, 196.6B values). Found by summing 24 consecutive primes from each
    candidate start (tests/test_config.py checks the counts). The hash multipliers (``seed``)
    and ``pad_id`` of the checkpoint are not published: this preset gives its geometry, for
    planning and import, not bit-identical hashing of its tokenizer's ids."""
    return EngramConfig(engram_vocab_size=(16_000_000, 16_000_000, 16_000_000), max_ngram_size=4,
                        n_embed_per_ngram=2048, n_head_per_ngram=8, layer_ids=(1, 14),
                        pad_id=2, seed=0, kernel_size=4)


def with_table_params(config: EngramConfig, params: float) -> EngramConfig:
    """``config``'s geometry (layers, orders, heads, row width) with every head's table
    resized so the whole table holds about ``params`` parameters (each size becomes a prime
    just above, so the total lands a hair over). For capacity planning at a given size."""
    per_head = int(params) // (len(config.layer_ids) * config.heads_per_layer * config.row_dim)
    if per_head < 2:
        raise ValueError(f"table_params={params:g}: too small for {len(config.layer_ids)} layers x "
                         f"{config.heads_per_layer} heads x rows of {config.row_dim}")
    return dataclasses.replace(config, engram_vocab_size=(per_head,) * (config.max_ngram_size - 1))


PRESETS: Mapping[str, Callable[[], EngramConfig]] = types.MappingProxyType({
    "tiny": tiny,
    "demo": demo,
    "reference_demo": reference_demo,
    "paper_27b": paper_27b,
    "table_100b": table_100b,
    "deepseek_v41_flash": deepseek_v41_flash,
})


def preset(name: str) -> EngramConfig:
    """Return the named preset (``tiny``, ``demo``, ``reference_demo``, ``paper_27b``,
    ``table_100b``); a ``-`` in the name is accepted for ``_``."""
    fn = PRESETS.get(name.replace("-", "_"))
    if fn is None:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return fn()
