"""The demo models: a 4-layer Llama "target" and a 1-layer Llama "draft" distilled from it,
trained deterministically on the Python standard library's own source with the demo tokenizer,
so that speculative decoding has a pair that agrees often (no model hub needed).

``build_demo_models`` caches the pair under a directory named by the recipe's hash.
`torch` and `transformers` are imported inside the functions that train and save, so that
importing this module (the CLI) stays cheap.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from cluster.models.cache import cached_build, default_models_dir, is_complete, progress_logger
from cluster.models.checkpoint import progress_bars, save_model
from cluster.models.corpus import split_corpus
from cluster.models.recipe import DemoRecipe, recipe_hash
from cluster.models.tokenizer import BOS, EOS, PAD, build_tokenizer, ensure_chat_template, load_tokenizer_file

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

    log = progress_logger(progress)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    tok_dir = build_tokenizer(root, recipe, progress=progress)
    tok = load_tokenizer_file(tok_dir)
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
    with progress_bars(progress):
        save_model(target, tmp / "target", tok_dir)
        save_model(draft, tmp / "draft", tok_dir)
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
    log = progress_logger(progress)
    name = f"demo-{recipe_hash(recipe)}"
    if not is_complete(root / name):
        log(f"building {root / name} (a few minutes, once per machine)")
    built = cached_build(root, name, lambda tmp: _build_demo(tmp, recipe, root, progress))
    for model in ("target", "draft"):  # caches built before the demo chat template existed
        ensure_chat_template(built / model)
    return built


def demo_target() -> str:
    """The demo target model's directory (built on first use): the default model everywhere."""
    return str(build_demo_models() / "target")


def demo_draft() -> str:
    """The demo draft model's directory (built on first use), for `--spec-draft-model demo`."""
    return str(build_demo_models() / "draft")
