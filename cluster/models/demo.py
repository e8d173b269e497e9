"""Small, locally trained demo models (no model hub needed) and random-weight models.

``build_demo_models`` trains, on the Python standard library's own source, a byte-level
BPE tokenizer, a 4-layer Llama "target" and a 1-layer Llama "draft" distilled from it,
so that speculative decoding has a pair that agrees often.  ``write_random_model``
writes random weights with real shapes for speed / KV-size studies.

Every artifact is cached under a directory named by a hash of its recipe; builds go to
a temp dir that is renamed into place after a ``DONE`` marker is written, under a file
lock, so parallel callers build once and an interrupted build never looks complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
DONE = "DONE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Stdlib folders that are tests, generated tables or GUI demos rather than ordinary code.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "turtledemo",
        "pydoc_data",
        "encodings",
        "ensurepip",
        "lib-dynload",
    }
)
_EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")


@dataclass(frozen=True)
class DemoRecipe:
    """Every knob of the demo build; its hash names the cache directory."""

    # Bump when the code changes what gets built, so stale caches are not reused.
    version: str = "2"
    seed: int = 0
    # Corpus: stdlib *.py files in a hash order, capped for speed.
    corpus_max_bytes: int = 3_000_000
    max_file_bytes: int = 150_000
    holdout_mod: int = 16  # a file is held out when crc32(path) % holdout_mod == 0
    eval_max_bytes: int = 300_000
    # Tokenizer.
    vocab_size: int = 4096
    min_frequency: int = 2
    model_max_length: int = 1024
    # Target model (GQA: 4 query heads share 2 KV heads).
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # Target training.
    seq_len: int = 128
    # Small batches, many steps: on a tiny budget more updates beat bigger batches.
    batch_size: int = 8
    target_steps: int = 600
    target_lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    # Draft distillation.
    draft_layers: int = 1
    draft_steps: int = 250
    draft_lr: float = 2e-3
    distill_temperature: float = 1.0
    # Evaluation.
    eval_seqs: int = 48


# Fields that decide the tokenizer; it is cached on its own so random models can reuse it.
_TOKENIZER_FIELDS = (
    "version",
    "corpus_max_bytes",
    "max_file_bytes",
    "holdout_mod",
    "eval_max_bytes",
    "vocab_size",
    "min_frequency",
    "model_max_length",
)


def _hash(payload: dict) -> str:
    payload = {**payload, "python": list(sys.version_info[:2])}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def recipe_hash(recipe: DemoRecipe) -> str:
    return _hash(asdict(recipe))


def tokenizer_hash(recipe: DemoRecipe) -> str:
    fields = asdict(recipe)
    return _hash({"tokenizer": {k: fields[k] for k in _TOKENIZER_FIELDS}})


def default_models_dir() -> Path:
    """$DISAGG_MODELS_DIR, else ~/.cache/disagg-serve/models (same rule as cluster.config)."""
    return Path(os.environ.get("DISAGG_MODELS_DIR") or Path.home() / ".cache/disagg-serve/models")


def _logger(progress: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if progress:
            print(f"[models] {msg}", file=sys.stderr, flush=True)

    return log


# --------------------------------------------------------------------------- caching


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _make_readable(root: Path) -> None:
    """Some writers (mkdtemp, safetensors) create owner-only files; caches are shared."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _is_complete(path: Path) -> bool:
    return (path / DONE).is_file()


def _cached_build(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return root/name, building it with build(tmp_dir) first unless already complete."""
    root = Path(root).expanduser().resolve()
    final = root / name
    if _is_complete(final):
        return final
    with _file_lock(root / f".{name}.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        # Holding the lock, anything left over is debris of an interrupted build.
        if final.exists():
            shutil.rmtree(final)
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            build(tmp)
            _make_readable(tmp)
            (tmp / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
            os.rename(tmp, final)  # atomic: readers see all or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(root: str | Path | None = None) -> list[Path]:
    """All eligible stdlib *.py files, sorted by their path relative to root."""
    root = Path(root) if root is not None else stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS or part.startswith(_EXCLUDED_PREFIXES) for part in rel.parts):
            continue
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _path_key(path: Path, root: Path) -> int:
    return zlib.crc32(path.relative_to(root).as_posix().encode())


def split_corpus(recipe: DemoRecipe, root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) texts; held-out files never reach the tokenizer."""
    root = Path(root) if root is not None else stdlib_dir()
    # Hash order mixes packages, so the byte cap doesn't keep only names starting with 'a'..'e'.
    files = sorted(list_corpus_files(root), key=lambda p: (_path_key(p, root), p.as_posix()))
    train, held, n_train, n_held = [], [], 0, 0
    for path in files:
        if path.stat().st_size > recipe.max_file_bytes:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if _path_key(path, root) % recipe.holdout_mod == 0:
            if n_held < recipe.eval_max_bytes:
                held.append(text)
                n_held += len(text)
        elif n_train < recipe.corpus_max_bytes:
            train.append(text)
            n_train += len(text)
    return train, held


# --------------------------------------------------------------------------- tokenizer


def _train_tokenizer(texts: list[str], recipe: DemoRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(s)) must give s back byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=recipe.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prompts start with BOS, as every training sequence does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _save_tokenizer(tok, out: Path, recipe: DemoRecipe) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=recipe.model_max_length,
    )
    hf_tok.save_pretrained(str(out))
    # transformers 5 writes its new class name "TokenizersBackend"; the old alias loads in
    # both 4.x and 5.x.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    # Newer transformers no longer write this file; older loaders still look for it.
    special_map = out / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(
            json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
        )


def build_tokenizer(
    out_dir: str | Path | None = None, recipe: DemoRecipe | None = None, *, progress: bool = True
) -> Path:
    """Train (or reuse) the demo tokenizer; returns out_dir/tokenizer-<hash>/."""
    recipe = recipe or DemoRecipe()
    root = Path(out_dir) if out_dir is not None else default_models_dir()
    log = _logger(progress)

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        train, _ = split_corpus(recipe)
        tok = _train_tokenizer(train, recipe)
        _save_tokenizer(tok, tmp, recipe)
        log(
            f"tokenizer: {tok.get_vocab_size()} tokens from {sum(map(len, train)) / 1e6:.1f} MB "
            f"in {time.perf_counter() - t0:.1f}s"
        )

    return _cached_build(root, f"tokenizer-{tokenizer_hash(recipe)}", build)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, dst / name)


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


# --------------------------------------------------------------------------- data


def _token_stream(tok, texts: list[str]):
    """One long id tensor: each file's tokens followed by EOS."""
    import torch

    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream, seq_len: int, bos_id: int):
    """Non-overlapping windows of seq_len-1 tokens, each prefixed with BOS."""
    import torch

    body = seq_len - 1
    n = stream.numel() // body
    rows = stream[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)


def _batches(windows, batch_size: int, steps: int, seed: int) -> Iterator:
    """steps batches from seeded permutations of windows (a new one each epoch)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(windows.shape[0], generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        yield windows[idx]


def _spread(windows, count: int):
    """count windows evenly spaced over all of them, so every held-out file gets a say."""
    import torch

    idx = torch.linspace(0, windows.shape[0] - 1, min(count, windows.shape[0])).round().long()
    return windows[idx]


# --------------------------------------------------------------------------- models


def _llama_config(recipe: DemoRecipe, tok, num_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.model_max_length,
        rms_norm_eps=recipe.rms_norm_eps,
        rope_theta=recipe.rope_theta,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _optimizer(model, lr: float, weight_decay: float):
    import torch

    # No decay on norms: they are scales around 1, decaying them only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine down to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _train_loop(model, batches, steps: int, lr: float, recipe: DemoRecipe, loss_fn, log, label):
    import torch

    opt = _optimizer(model, lr, recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, recipe.warmup_steps, steps)
    )
    model.train()
    t0, running = time.perf_counter(), None
    for step, batch in enumerate(batches):
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(
                f"{label} step {step + 1}/{steps} loss {running:.3f} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
    model.eval()
    return running


def _train_target(recipe: DemoRecipe, tok, windows, log):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_llama_config(recipe, tok, recipe.num_layers))
    batches = _batches(windows, recipe.batch_size, recipe.target_steps, recipe.seed)

    def loss_fn(batch):
        return model(input_ids=batch, labels=batch).loss

    final = _train_loop(
        model, batches, recipe.target_steps, recipe.target_lr, recipe, loss_fn, log, "target"
    )
    return model, final


def _init_draft(recipe: DemoRecipe, tok, target):
    """Draft = target's embeddings, first layer, final norm and head: an early exit."""
    from transformers import LlamaForCausalLM

    draft = LlamaForCausalLM(_llama_config(recipe, tok, recipe.draft_layers))
    own = draft.state_dict()
    shared = {k: v for k, v in target.state_dict().items() if k in own}
    draft.load_state_dict(shared, strict=False)
    return draft


def _distill_draft(recipe: DemoRecipe, tok, target, windows, log):
    import torch
    import torch.nn.functional as F

    draft = _init_draft(recipe, tok, target)
    batches = _batches(windows, recipe.batch_size, recipe.draft_steps, recipe.seed + 1)
    temp = recipe.distill_temperature

    def loss_fn(batch):
        with torch.no_grad():
            t_logp = F.log_softmax(target(input_ids=batch).logits.float() / temp, dim=-1)
        d_logp = F.log_softmax(draft(input_ids=batch).logits / temp, dim=-1)
        # KL(target || draft) per position; temp^2 keeps gradient scale temperature-free.
        kl = F.kl_div(
            d_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        return kl * temp * temp

    final = _train_loop(
        draft, batches, recipe.draft_steps, recipe.draft_lr, recipe, loss_fn, log, "draft"
    )
    return draft, final


def _evaluate(target, draft, windows) -> dict:
    """Held-out loss of both models and how often their top-1 predictions agree."""
    import torch
    import torch.nn.functional as F

    losses = {"target": 0.0, "draft": 0.0}
    agree = total = 0
    with torch.no_grad():
        for batch in windows.split(16):
            logits = {
                "target": target(input_ids=batch).logits,
                "draft": draft(input_ids=batch).logits,
            }
            for name, lg in logits.items():
                losses[name] += F.cross_entropy(
                    lg[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
                ).item()
            agree += (logits["target"].argmax(-1) == logits["draft"].argmax(-1)).sum().item()
            total += batch.numel()
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    t_loss, d_loss = losses["target"] / n_pred, losses["draft"] / n_pred
    return {
        "target_eval_loss": t_loss,
        "target_eval_ppl": math.exp(t_loss),
        "draft_eval_loss": d_loss,
        "draft_eval_ppl": math.exp(d_loss),
        "top1_agreement": agree / total,
        "eval_positions": total,
    }


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own save bars; silence them when progress is off."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _save_model(model, out: Path, tok_dir: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    # transformers >= 5 always writes safetensors (the safe_serialization flag is gone).
    model.save_pretrained(str(out))
    if not (out / "model.safetensors").exists():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors in {out}")
    cfg = model.config
    GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    ).save_pretrained(str(out))
    _copy_tokenizer(tok_dir, out)


# --------------------------------------------------------------------------- demo build


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """At most n threads while training (shared 2-core machines); the caller's setting after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_demo(tmp: Path, recipe: DemoRecipe, root: Path, progress: bool) -> None:
    with _torch_threads(2):
        _train_and_save_demo(tmp, recipe, root, progress)


def _train_and_save_demo(tmp: Path, recipe: DemoRecipe, root: Path, progress: bool) -> None:
    import torch

    log = _logger(progress)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    tok_dir = build_tokenizer(root, recipe, progress=progress)
    tok = load_tokenizer(tok_dir)
    train_texts, held_texts = split_corpus(recipe)
    bos = tok.token_to_id(BOS)
    train_win = _windows(_token_stream(tok, train_texts), recipe.seq_len, bos)
    eval_win = _spread(
        _windows(_token_stream(tok, held_texts), recipe.seq_len, bos), recipe.eval_seqs
    )
    seconds["tokenizer_and_data"] = time.perf_counter() - t0
    log(
        f"data: {train_win.shape[0]} train windows, {eval_win.shape[0]} held-out windows "
        f"of {recipe.seq_len} tokens"
    )

    t0 = time.perf_counter()
    target, target_train_loss = _train_target(recipe, tok, train_win, log)
    seconds["target"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    init_agreement = _evaluate(target, _init_draft(recipe, tok, target), eval_win)["top1_agreement"]
    draft, distill_loss = _distill_draft(recipe, tok, target, train_win, log)
    seconds["draft"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics = _evaluate(target, draft, eval_win)
    metrics.update(
        target_train_loss=target_train_loss,
        draft_distill_loss=distill_loss,
        draft_init_top1_agreement=init_agreement,
    )
    with _progress_bars(progress):
        _save_model(target, tmp / "target", tok_dir)
        _save_model(draft, tmp / "draft", tok_dir)
    seconds["eval_and_save"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    record = {
        "recipe": asdict(recipe),
        "hash": recipe_hash(recipe),
        "metrics": metrics,
        "seconds": seconds,
        "versions": _versions(),
        "threads": torch.get_num_threads(),
    }
    (tmp / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    log(
        f"done in {seconds['total']:.0f}s: target held-out loss {metrics['target_eval_loss']:.3f} "
        f"(ppl {metrics['target_eval_ppl']:.1f}), draft loss {metrics['draft_eval_loss']:.3f}, "
        f"draft/target top-1 agreement {metrics['top1_agreement']:.3f} "
        f"(before distillation {init_agreement:.3f})"
    )


def build_demo_models(
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    recipe: DemoRecipe | None = None,
) -> Path:
    """Train (or reuse) the demo target/draft pair; returns the dir holding target/ and draft/."""
    recipe = recipe or DemoRecipe()
    root = Path(out_dir).expanduser() if out_dir is not None else default_models_dir()
    root.mkdir(parents=True, exist_ok=True)
    log = _logger(progress)
    name = f"demo-{recipe_hash(recipe)}"
    if not _is_complete(root / name):
        log(f"building {root / name} (a few minutes, once per machine)")
    return _cached_build(root, name, lambda tmp: _build_demo(tmp, recipe, root, progress))


# --------------------------------------------------------------------------- random models


@dataclass(frozen=True)
class RandomPreset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    dtype: str


RANDOM_PRESETS: dict[str, RandomPreset] = {
    # Llama-3.2-1B's shape, with the demo tokenizer's small vocabulary.
    "llama-1b": RandomPreset(2048, 16, 32, 8, 8192, 8192, 500000.0, True, "bfloat16"),
    "tiny": RandomPreset(128, 2, 4, 2, 344, 1024, 10000.0, False, "float32"),
    # Long-context KV at cheap compute (migration benchmarks): 8192 positions, 64 KiB of KV
    # per token (16 layers x 8 KV heads x 64 dims x K,V x 4 bytes), ~45M parameters.
    "kv-heavy": RandomPreset(512, 16, 8, 8, 1024, 8192, 10000.0, False, "float32"),
}
_RANDOM_VERSION = "1"


def _random_config(preset: RandomPreset, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rope_theta=preset.rope_theta,
        rms_norm_eps=1e-5,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        tie_word_embeddings=preset.tie_word_embeddings,
        torch_dtype=preset.dtype,
    )


def _random_llama(config, dtype, seed: int):
    """Allocate on 'meta' (free), then fill each tensor once: no costly default init."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    # Non-persistent buffers (rotary inv_freq) stay uninitialised: they are not saved.
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def write_random_model(
    out_dir: str | Path, preset: str = "llama-1b", *, seed: int = 0, progress: bool = True
) -> Path:
    """Random-weight Llama of a preset's shape, cached at out_dir/random-<preset>-<hash>/."""
    import torch

    spec = RANDOM_PRESETS[preset]
    root = Path(out_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    tok_recipe = DemoRecipe()
    key = {
        "random": asdict(spec),
        "preset": preset,
        "seed": seed,
        "version": _RANDOM_VERSION,
        "tokenizer": tokenizer_hash(tok_recipe),
    }

    def build(tmp: Path) -> None:
        # The same tokenizer as the demo models (deterministic, shared cache).
        tok_dir = build_tokenizer(default_models_dir(), tok_recipe, progress=progress)
        tok = load_tokenizer(tok_dir)
        model = _random_llama(_random_config(spec, tok), getattr(torch, spec.dtype), seed)
        with _progress_bars(progress):
            _save_model(model, tmp, tok_dir)

    return _cached_build(root, f"random-{preset}-{_hash(key)}", build)
