"""Benchmark: the project's training (stage 02) and extraction (stage 03) loops against bare timm + torch
loops on the same model, images, transforms, batch size and workers; and whether data loading or the model
bounds them.

Data: the generated demo competition (``--data demo``, made under ``inputs/`` on first use), fold 0 of 5,
full images (no crops). The project's stage outputs go to a temporary ``REID_WORKING_DIR``, deleted after.

* Training: :func:`common.engine.embedder.train_fold` with an :class:`~common.config.EmbedderConfig` against a bare loop
  written here: the same :class:`~common.lib.models.EmbeddingModel`, AdamW with the same two parameter groups, a
  ``DataLoader`` over :class:`~common.data.competition.ImageDataset` with the same training transforms, and per batch only
  forward, ArcFace cross-entropy, backward and step (AMP and loss scaling chosen as the project chooses them).
  The project's ``log.csv`` times each epoch's steps *and* its validation pass; the bench wraps
  ``seed_everything`` (the first call of each epoch), :func:`common.engine.fit.evaluate` and
  :func:`common.core.checkpoint.save_state` with timers, so it reports the steps alone (like for like), the epoch
  as logged, the epoch with its checkpoint, and the fixed cost of a ``train_fold`` call outside its epochs.
* Extraction: :func:`common.stages.extract_embeddings.extract` (flip TTA) against ``model.embed`` on the same loader, with the
  flip.
* Bottleneck: the training and extraction loaders alone (batches, no model) and the model alone (the same
  steps on one cached batch, repeated). With ``num_workers=0`` both run in turn in one process, so the loop's
  rate is about ``1 / (1/loader + 1/model)`` and the slower part bounds it.

Both sides are warmed up first, then the repeats alternate (project first, then bare first, ...), each
followed by one round of the bottleneck parts, and the median over all epochs or passes is reported, to be
fair on a loaded, shared machine. Every figure is given by wall clock and by this process's CPU time (less
disturbed by other jobs, though not immune: they share caches and SMT siblings).

Run from the repository root (``--record`` appends a section to bench/RESULTS.md; ~8 min on 2 cores):

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.loop_overhead --record
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("REID_PROGRESS", "text")  # as the papermill runner sets it: bars at most every 10 s

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common_args import add_record_args, command_line, env_set  # noqa: E402
from common.data import artefacts  # noqa: E402
from common.stages import train_embedder  # noqa: E402

TARGET_PCT = 5.0


# ------------------------------------------------------------------------------------------ pure helpers
def overhead_pct(project_ips: float, bare_ips: float) -> float:
    """Extra time per image of the project's loop over the bare loop, in percent (negative: it is faster).

    Args:
        project_ips: the project's images per second.
        bare_ips: the bare loop's images per second.
    """
    if project_ips <= 0 or bare_ips <= 0:
        raise ValueError(f"images per second must be > 0 (project {project_ips}, bare {bare_ips})")
    return 100.0 * (bare_ips / project_ips - 1.0)


def verdict(pct: float, target: float = TARGET_PCT) -> str:
    """``met`` when the overhead ``pct`` is at most ``target`` percent, else ``not met``."""
    return "met" if pct <= target else "not met"


def median_rate(samples: Sequence[tuple[float, ...]], clock: int = 1) -> float:
    """Median images per second over ``(images, wall s[, CPU s])`` samples (one per epoch or pass).

    Args:
        samples: images processed, then the durations; each duration must be > 0.
        clock: which duration: 1 = wall clock, 2 = CPU time.
    """
    if not samples:
        raise ValueError("median_rate: no samples")
    if any(s[clock] <= 0 for s in samples):
        raise ValueError(f"median_rate: every duration must be > 0, got {[s[clock] for s in samples]}")
    return statistics.median(s[0] / s[clock] for s in samples)


def bottleneck(loader_ips: float, model_ips: float) -> dict[str, float | str]:
    """Which part bounds a loop whose loader and model were timed apart.

    Args:
        loader_ips: images per second of the loader alone (no model).
        model_ips: images per second of the model alone (one cached batch).

    Returns:
        ``bound`` (``data loading`` or ``model``: the slower part), ``serial_ips`` (the loop's rate when the
        two run in turn, as with ``num_workers=0``: ``1 / (1/loader + 1/model)``), ``overlap_ips`` (its best
        rate when loader workers run beside the model: the slower part's), ``loader_share`` (the loader's
        share of the serial time) and ``headroom`` (faster part / slower part).
    """
    if loader_ips <= 0 or model_ips <= 0:
        raise ValueError(f"images per second must be > 0 (loader {loader_ips}, model {model_ips})")
    t_load, t_model = 1.0 / loader_ips, 1.0 / model_ips
    return {
        "bound": "data loading" if loader_ips < model_ips else "model",
        "serial_ips": 1.0 / (t_load + t_model),
        "overlap_ips": min(loader_ips, model_ips),
        "loader_share": t_load / (t_load + t_model),
        "headroom": max(loader_ips, model_ips) / min(loader_ips, model_ips),
    }


def interleaved_order(repeats: int) -> list[tuple[str, str]]:
    """The side order of each repeat: project first on even repeats, bare first on odd ones."""
    return [("project", "bare") if r % 2 == 0 else ("bare", "project") for r in range(repeats)]


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocks() -> tuple[float, float]:
    """``(wall, cpu)`` seconds now: ``perf_counter`` and this process's CPU time (all its threads)."""
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def timed_calls(module, name: str, into: list[tuple[float, float, float, float]]) -> Iterator[None]:
    """Replace ``module.name`` by a wrapper that appends ``(wall0, cpu0, wall1, cpu1)`` of each call (start
    and end, see :func:`clocks`) to ``into``; the original is restored on exit."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = clocks()
        try:
            return original(*args, **kwargs)
        finally:
            into.append((*start, *clocks()))

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def autocast(device: torch.device, amp: bool):
    """The project's AMP choice, written out: bf16 autocast on CUDA where supported, else fp16; none on
    CPU."""
    if not amp or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


# -------------------------------------------------------------------------------------------- the sides
class Setup:
    """Everything both sides share: config, competition, fold split, labels, normalisation, device."""

    def __init__(self, args: argparse.Namespace) -> None:
        from common.config import EmbedderConfig
        from common.core.runtime import resolve_device
        from common.core.weights import backbone_normalization
        from common.data import competition as data

        self.args = args
        # GPU speed knobs of the project's config, where its version has them (the bare loop mirrors them)
        knobs = {k: v for k, v in (("channels_last", True), ("compile", args.compile))
                 if k in EmbedderConfig.field_names()}
        self.cfg = EmbedderConfig(
            data=args.data, exp="loopbench", seed=0, device=args.device, num_workers=args.num_workers,
            force=True, backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
            epochs=args.epochs, batch_size=args.batch_size, arc_s=20.0, arc_m=0.3, n_folds=5, folds="0",
            use_crops=False, max_images=args.max_images, amp=True, **knobs,
        )
        if "oof_new_share" in EmbedderConfig.field_names():  # the loop's cost on every image: no open-set split
            self.cfg = dataclasses.replace(self.cfg, oof_new_share=0.0)
        self.device = resolve_device(args.device)  # a clear error for cuda on a machine without it
        try:  # -1 = sized to the machine, in versions of the project that have it
            from common.core.runtime import loader_workers
            self.workers = loader_workers(self.cfg.num_workers)
        except ImportError:
            self.workers = self.cfg.num_workers
        # the project applies channels-last on CUDA and (since 2026-12-04) on the CPU: the bare loop follows it
        self.channels_last = self.device.type in ("cuda", "cpu") and getattr(self.cfg, "channels_last", False)
        self.compile = getattr(self.cfg, "compile", False)
        if self.device.type == "cuda":  # as the project's configure_device: both sides, from the start
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.comp = data.open_competition(args.data, check_pixels=False)
        self.folds = train_embedder.prepare_folds(self.cfg, self.comp)
        self.fit, self.valid, _ = artefacts.fold_split(self.cfg, self.comp, self.folds, 0)
        self.classes = sorted(self.fit["individual_id"].unique())
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[c] for c in self.fit["individual_id"]]
        self.mean, self.std = backbone_normalization(self.cfg.backbone, self.cfg.pretrained)
        self.all_files = list(self.comp.train["path"]) + list(self.comp.test["path"])
        bs = self.cfg.batch_size
        self.images_per_epoch = len(self.fit) // bs * bs if len(self.fit) > bs else len(self.fit)

    def model(self) -> torch.nn.Module:
        """A fresh :class:`~common.lib.models.EmbeddingModel` as stage 02 builds it (no dynamic margins, no
        species head), on the device."""
        from common.lib.models import EmbeddingModel

        c = self.cfg
        return EmbeddingModel(c.backbone, c.pretrained, c.embedding_dim, n_classes=len(self.classes),
                              gem_p=c.gem_p, dropout=c.dropout, arc_s=c.arc_s, arc_m=c.arc_m).to(self.device)

    def train_loader(self, seed: int, workers: int | None = None) -> torch.utils.data.DataLoader:
        """The bare loop's loader: the fold's training images and transforms, shuffled, full batches only."""
        from common.data.competition import ImageDataset, build_transforms

        c = self.cfg
        ds = ImageDataset(self.fit["path"], self.labels, transform=build_transforms(
            c.image_size, True, self.mean, self.std, scale_min=c.rrc_scale_min, hflip=c.hflip))
        return torch.utils.data.DataLoader(
            ds, batch_size=c.batch_size, shuffle=True, drop_last=len(ds) > c.batch_size,
            num_workers=self.workers if workers is None else workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed))

    def extract_loader(self) -> torch.utils.data.DataLoader:
        """Every train and test image, resized and normalised as in stage 03, in order."""
        from common.data.competition import ImageDataset, build_transforms

        ds = ImageDataset(self.all_files, transform=build_transforms(self.cfg.image_size, False, self.mean,
                                                                     self.std))
        return torch.utils.data.DataLoader(ds, batch_size=self.args.extract_batch_size, shuffle=False,
                                           num_workers=self.workers, pin_memory=self.device.type == "cuda")


Sample = tuple[float, float, float]  # (images, wall seconds, CPU seconds)


def bare_train(setup: Setup, epochs: int, max_steps: int = 0) -> list[Sample]:
    """The bare loop: fresh model, AdamW, per batch forward / CE / backward / step; one sample per epoch."""
    c, dev = setup.cfg, setup.device
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    model = setup.model().to(memory_format=fmt).train()
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": c.lr},
                             {"params": head, "lr": c.lr * c.head_lr_mult}], weight_decay=c.weight_decay)
    fp16 = c.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    run = torch.compile(model) if setup.compile else model
    samples = []
    for epoch in range(epochs):
        loader = setup.train_loader(seed=epoch)
        _sync(dev)
        (w0, c0), seen = clocks(), 0
        for step, batch in enumerate(loader):
            if max_steps and step >= max_steps:
                break
            x = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=fmt)
            y = batch["label"].to(dev, non_blocking=True)
            with autocast(dev, c.amp):
                out = run(x, labels=y)
            loss = F.cross_entropy(out["logits"].float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(y)
        _sync(dev)
        w1, c1 = clocks()
        samples.append((seen, w1 - w0, c1 - c0))
    return samples


def project_train(setup: Setup, run: int, epochs: int = 0) -> dict:
    """One :func:`common.engine.embedder.train_fold` call (``epochs`` overrides the config's when > 0), timed per epoch.

    The epoch's steps run from its ``seed_everything`` call (the first statement of each epoch) to the start
    of its ``evaluate``; validation is ``evaluate``, the checkpoint ``checkpoint.save_state``. Both clocks are
    read there through :func:`timed_calls`; the wall-clock steps are checked against ``log.csv``.
    """
    import dataclasses

    from common.core import checkpoint
    from common.engine import embedder as train
    from common.engine import fit as engine

    cfg = dataclasses.replace(setup.cfg, exp=f"loopbench-r{run}", epochs=epochs or setup.cfg.epochs)
    folds = train_embedder.prepare_folds(cfg, setup.comp)
    seeds, evals, saves = [], [], []
    with (timed_calls(engine, "seed_everything", seeds), timed_calls(engine, "evaluate", evals),
          timed_calls(checkpoint, "save_state", saves)):
        w0, c0 = clocks()
        log = train.train_fold(cfg, setup.comp, folds, 0)
        w1, c1 = clocks()
    n, logged = setup.images_per_epoch, [float(s) for s in log["seconds"]]
    if not (len(seeds) - 1 == len(evals) == len(saves) == len(logged) == cfg.epochs):
        raise RuntimeError(
            f"expected 1 + {cfg.epochs} seed_everything calls and one evaluate and save_state per epoch, "
            f"timed {len(seeds)}, {len(evals)}, {len(saves)} ({len(logged)} epochs logged): "
            "common.engine.fit changed, update bench/loop_overhead.py")
    steps = [(n, e[0] - s[0], e[1] - s[1]) for s, e in zip(seeds[1:], evals, strict=True)]
    val = [(e[2] - e[0], e[3] - e[1]) for e in evals]
    ckpt = [(k[2] - k[0], k[3] - k[1]) for k in saves]
    return {
        "steps": steps,
        "logged": [(n, w + v[0], c + v[1]) for (_, w, c), v in zip(steps, val, strict=True)],
        "with_ckpt": [(n, w + v[0] + k[0], c + v[1] + k[1]) for (_, w, c), v, k in zip(steps, val, ckpt,
                                                                                       strict=True)],
        "call": (n * cfg.epochs, w1 - w0, c1 - c0),
        "log_gap": max(abs(lg - (w + v[0])) for lg, (_, w, _c), v in zip(logged, steps, val, strict=True)),
        "eval_s": [v[0] for v in val], "ckpt_s": [k[0] for k in ckpt],
    }


@torch.no_grad()
def bare_extract(setup: Setup, model: torch.nn.Module) -> torch.Tensor:
    """The bare extraction loop: ``model.embed`` of each batch and of its flip, averaged, L2-normalised."""
    dev, out = setup.device, []
    for batch in setup.extract_loader():
        x = batch["image"].to(dev, non_blocking=True)
        with autocast(dev, setup.cfg.amp):
            e = (model.embed(x).float() + model.embed(torch.flip(x, dims=[3])).float()) / 2
        out.append(e.cpu())
    return F.normalize(torch.cat(out), dim=1)


def project_extract(setup: Setup, model: torch.nn.Module):
    """Stage 03's :func:`common.stages.extract_embeddings.extract` over the same files, batch, workers and AMP."""
    from common.stages.extract_embeddings import extract

    return extract(model, setup.all_files, setup.cfg.image_size, list(setup.mean), list(setup.std),
                   setup.args.extract_batch_size, True, setup.device, setup.cfg.num_workers, setup.cfg.amp)


def timed(fn: Callable[[], object], images: int, device: torch.device) -> Sample:
    """``(images, wall s, CPU s)`` of one call of ``fn``, synchronised on CUDA."""
    _sync(device)
    w0, c0 = clocks()
    fn()
    _sync(device)
    w1, c1 = clocks()
    return images, w1 - w0, c1 - c0




def loader_alone(loader_fn: Callable[[], torch.utils.data.DataLoader], passes: int) -> list[Sample]:
    """Full passes over fresh loaders, batches read and dropped; one sample per pass."""
    samples = []
    for _ in range(passes):
        loader = loader_fn()  # built outside the clock: its first build imports albumentations
        (w0, c0), seen = clocks(), 0
        for batch in loader:
            seen += len(batch["image"])
        w1, c1 = clocks()
        samples.append((seen, w1 - w0, c1 - c0))
    return samples


def cached_train_step(setup: Setup) -> tuple[Callable[[], None], int]:
    """A training step as the bare loop's on one cached batch (fresh model, 2 warm-up steps):
    ``(step, batch)``."""
    c, dev = setup.cfg, setup.device
    fmt = torch.channels_last if setup.channels_last else torch.contiguous_format
    batch = next(iter(setup.train_loader(seed=0, workers=0)))
    x, y = batch["image"].to(dev).contiguous(memory_format=fmt), batch["label"].to(dev)
    model = setup.model().to(memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    run = torch.compile(model) if setup.compile else model

    def step() -> None:
        with autocast(dev, c.amp):
            out = run(x, labels=y)
        loss = F.cross_entropy(out["logits"].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    return step, len(x)


def cached_extract_step(setup: Setup, model: torch.nn.Module) -> tuple[Callable[[], None], int]:
    """Embed + flip of one cached extraction batch (2 warm-up calls): ``(step, batch)``."""
    dev = setup.device
    x = next(iter(setup.extract_loader()))["image"].to(dev)

    @torch.no_grad()
    def step() -> None:
        with autocast(dev, setup.cfg.amp):
            model.embed(x).float().add(model.embed(torch.flip(x, dims=[3])).float())

    for _ in range(2):
        step()
    return step, len(x)


# ------------------------------------------------------------------------------------------------- main
def measure(args: argparse.Namespace) -> dict:
    """Run every measurement (see the module docstring); returns the samples by name.

    Each repeat runs both sides (order alternating), then one round of the model alone on a cached batch and
    one pass of the loader alone, so the bottleneck parts see the same machine load as the loops.
    """
    setup = Setup(args)
    dev, bs = setup.device, setup.cfg.batch_size
    res: dict = {"setup": setup, "n_fit": len(setup.fit), "n_valid": len(setup.valid)}
    res.update({k: [] for k in ("bare_train", "train_model", "train_loader", "bare_extract",
                                "project_extract", "extract_model", "extract_loader")})
    # Warm-up (not timed): a loader pass fills the page cache; cached steps, a few bare steps and a one-epoch
    # project run warm the kernels, the allocator and the project's code paths.
    loader_alone(lambda: setup.train_loader(seed=0), 1)
    train_step, tb = cached_train_step(setup)
    k = max(1, min(3, setup.images_per_epoch // bs))  # cached steps per round
    bare_train(setup, 1, max_steps=2)
    project_train(setup, 99, epochs=1)
    proj = []
    for r, order in enumerate(interleaved_order(args.repeats)):
        for side in order:
            if side == "bare":
                res["bare_train"] += bare_train(setup, args.epochs)
            else:
                proj.append(project_train(setup, r))
        res["train_model"].append(timed(lambda: [train_step() for _ in range(k)], k * tb, dev))
        res["train_loader"] += loader_alone(lambda r=r: setup.train_loader(seed=r + 1), 1)
        proj_steps = [s for p in proj for s in p["steps"]]
        print(f"training repeat {r + 1}/{args.repeats}: bare {median_rate(res['bare_train']):.1f} img/s, "
              f"project steps {median_rate(proj_steps):.1f} img/s (medians so far)",
              file=sys.stderr, flush=True)
    for key in ("steps", "logged", "with_ckpt"):
        res[f"project_{key}"] = [s for p in proj for s in p[key]]
    res["call_fixed_s"] = statistics.median(p["call"][1] - sum(s[1] for s in p["with_ckpt"]) for p in proj)
    res["log_gap"] = max(p["log_gap"] for p in proj)
    res["eval_s"] = statistics.median(s for p in proj for s in p["eval_s"])
    res["ckpt_s"] = statistics.median(s for p in proj for s in p["ckpt_s"])

    torch.manual_seed(0)
    model = setup.model().eval()
    n_all = len(setup.all_files)
    ref, got = bare_extract(setup, model), project_extract(setup, model)  # warm-up of both, and agreement
    res["extract_max_diff"] = float((ref - torch.from_numpy(got)).abs().max())
    extract_step, xb = cached_extract_step(setup, model)
    xk = max(1, min(2, n_all // xb))
    for order in interleaved_order(args.repeats):
        for side in order:
            fn = bare_extract if side == "bare" else project_extract
            res[f"{side}_extract"].append(timed(lambda fn=fn: fn(setup, model), n_all, dev))
        res["extract_model"].append(timed(lambda: [extract_step() for _ in range(xk)], xk * xb, dev))
        res["extract_loader"] += loader_alone(setup.extract_loader, 1)
    return res


def profile_project(setup: Setup, top: int) -> str:
    """cProfile of one one-epoch :func:`common.engine.embedder.train_fold` call: the ``top`` functions by cumulative and
    by own time, as text (CPU-side only: on CUDA, kernels run asynchronously; use torch.profiler there)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(project_train, setup, 98, 1)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def report(args: argparse.Namespace, res: dict, command: str, load: tuple[float, float], wall: float) -> str:
    """The markdown section: header lines, the loops table, the bottleneck table and the verdicts."""
    from bench._report import torch_machine_line, utc_stamp

    setup, c = res["setup"], res["setup"].cfg
    samples = {k: v for k, v in res.items() if isinstance(v, list) and k not in ("eval_s", "ckpt_s")}
    wall_ips = {k: median_rate(v, 1) for k, v in samples.items()}
    cpu_ips = {k: median_rate(v, 2) for k, v in samples.items()}
    amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16 + GradScaler") if setup.device.type == "cuda" \
        else "off (CPU)"
    lines = [
        "", f"## Loop overhead: stage 02 training and stage 03 extraction vs bare timm + torch loops "
        f"({c.backbone}, {c.image_size} px, {setup.device.type})", "",
        f"- command: `{command}` (from the repository root)",
        f"- date: {utc_stamp()}",
        f"- machine: {torch_machine_line(setup.device.type, load[0])}; load average at end {load[1]:.2f}",
        f"- data: `{args.data}` competition, fold 0 of 5, full images: {res['n_fit']} training images "
        f"({setup.images_per_epoch} per epoch, drop_last), {res['n_valid']} validation; extraction over all "
        f"{len(setup.all_files)} train + test images",
        f"- config: EmbeddingModel({c.backbone}, pretrained={c.pretrained}, GeM, 512-d neck, ArcFace over "
        f"{len(setup.classes)} individuals), AdamW, batch {c.batch_size} (extraction "
        f"{args.extract_batch_size}), num_workers {setup.workers}, AMP {amp}, channels_last "
        f"{setup.channels_last}, compile {setup.compile} (both sides), project progress bars "
        f"REID_PROGRESS={os.environ.get('REID_PROGRESS', '')}",
        f"- protocol: both sides warmed up, then {args.repeats} alternating repeats (training: {args.epochs} "
        "epoch(s) each, a fresh model per repeat); median over epochs / passes. Bare = forward, "
        "cross-entropy, backward, step (no scheduler, metrics, logging or validation). img/s is wall clock; "
        "img per CPU-s divides by this process's CPU time (all its threads, not loader workers), which "
        "other jobs on a shared machine disturb less (not immune: shared caches, SMT siblings). Wall time "
        f"{wall:.0f} s", "",
        "| loop | img/s | project / bare | overhead | img per CPU-s | overhead (CPU time) |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, key: str, base: str | None) -> str:
        w, cpu = wall_ips[key], cpu_ips[key]
        if base is None:
            return f"| {name} | {w:.1f} | 1.00 | reference | {cpu:.1f} | reference |"
        return (f"| {name} | {w:.1f} | {w / wall_ips[base]:.3f} | {overhead_pct(w, wall_ips[base]):+.1f} % | "
                f"{cpu:.1f} | {overhead_pct(cpu, cpu_ips[base]):+.1f} % |")

    lines += [
        row("training, bare loop (forward/backward/step)", "bare_train", None),
        row("training, `train_fold`: steps only", "project_steps", "bare_train"),
        row("training, `train_fold`: epoch as in log.csv (steps + validation)", "project_logged",
            "bare_train"),
        row("training, `train_fold`: epoch + checkpoint (last.pt)", "project_with_ckpt", "bare_train"),
        row("extraction, bare loop (model.embed + flip)", "bare_extract", None),
        row("extraction, `common.stages.extract_embeddings.extract` (flip TTA)", "project_extract", "bare_extract"),
        "",
        f"per epoch (median): validation {res['eval_s']:.2f} s ({res['n_valid']} images), checkpoint "
        f"{res['ckpt_s']:.2f} s; per `train_fold` call, outside its epochs (model build with pretrained "
        f"weights, folds, final model.pt): {res['call_fixed_s']:.2f} s; log.csv seconds agree with steps + "
        f"validation timed here within {res['log_gap']:.2f} s; extraction agrees with the bare loop "
        f"within {res['extract_max_diff']:.1e} (max abs difference)",
        "", f"| part (bottleneck) | img/s | bound by | {'serial' if setup.workers == 0 else 'overlapped'} "
        "estimate img/s | loader share of serial time |",
        "|---|---|---|---|---|",
    ]
    for what, label in (("train", "training"), ("extract", "extraction")):
        loader, model = wall_ips[f"{what}_loader"], wall_ips[f"{what}_model"]
        bn = bottleneck(loader, model)
        lines += [
            f"| {label} loader alone (decode + transforms, workers {setup.workers}) | {loader:.1f} | | | |",
            f"| {label} model alone (one cached batch) | {model:.1f} | | | |",
            f"| {label} bare loop, measured | {wall_ips[f'bare_{what}']:.1f} | **{bn['bound']}** "
            f"({bn['headroom']:.1f}x) | {bn['serial_ips' if setup.workers == 0 else 'overlap_ips']:.1f} | "
            f"{100 * bn['loader_share']:.0f} % |",
        ]
    lines.append("")
    for clock, ips in (("wall clock", wall_ips), ("CPU time", cpu_ips)):
        worst = max(overhead_pct(ips["project_steps"], ips["bare_train"]),
                    overhead_pct(ips["project_extract"], ips["bare_extract"]))
        lines.append(f"like-for-like overhead by {clock} (training steps, extraction): worst {worst:+.1f} % "
                     f"(target <= {TARGET_PCT:g} %: {verdict(worst)})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="demo", help="competition name or folder (demo is generated)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--pretrained", default="auto",
                    help="as EmbedderConfig.pretrained (auto: offline weights)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per training repeat (per side)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--extract-batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=0, help="cap on training images (0 = all)")
    ap.add_argument("--repeats", type=int, default=6, help="alternating repeats per side")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); 1 by default: on the shared 2-core machine a "
                         "second thread mostly spin-waits against the other jobs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training model on both sides "
                    "(where the project's config has `compile`)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print a cProfile (top N functions) of a one-epoch train_fold call "
                         "(not recorded)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny run for the tests: demo_tiny, 32 px, batch 4, 1 epoch, 1 repeat, random init")
    add_record_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.data, args.pretrained, args.image_size, args.batch_size = "demo_tiny", "none", 32, 4
        args.extract_batch_size, args.epochs, args.repeats = 8, 1, 1
    if min(args.epochs, args.repeats, args.batch_size, args.extract_batch_size, args.image_size) < 1:
        ap.error("--epochs, --repeats, --batch-size, --extract-batch-size and --image-size must be >= 1")

    from bench._report import append_section

    if args.threads:
        torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loopbench-") as tmp, env_set("REID_WORKING_DIR", tmp):
        res = measure(args)  # the project's stage outputs go to tmp: thrown away after
        if args.profile:
            res["profile"] = profile_project(res["setup"], args.profile)
    command = command_line("loop_overhead", argv)
    text = report(args, res, command, (load0, os.getloadavg()[0]), time.perf_counter() - t0)
    print(res.get("profile", "") + text)
    if args.record:
        print(f"appended to {append_section(args.results, text)}")
    res["text"] = text
    return res


if __name__ == "__main__":
    main()
