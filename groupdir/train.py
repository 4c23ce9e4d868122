"""The training recipe: data -> groups -> model -> epochs of Eq. 5 -> best-on-validation -> test once.

`train(cfg, run_dir)` is the whole per-worker loop, readable top to bottom. It runs one process now
(world size 1); a Ray Train worker will call it unchanged.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from groupdir import __version__
from groupdir.atomic import write_json_atomic
from groupdir.config import Config, load_config
from groupdir.data import open_data
from groupdir.data.loaders import normalize
from groupdir.errors import TrainingError
from groupdir.grouping import Grouping, make_grouping
from groupdir.losses import group_contrastive_loss, label_weights, regression_loss, soft_label_loss
from groupdir.losses.regression import label_bins
from groupdir.metrics import group_metrics, shot_metrics, shot_of_bins
from groupdir.model import ROUTES, DIRNet, Output, route

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"


def train(cfg: Config, run_dir: str | Path, progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # --- data and groups ------------------------------------------------------------------
    train_labels, loaders = open_data(cfg)
    label_range = (cfg.label_min, cfg.label_max) if cfg.label_min is not None else None
    grouping = make_grouping(train_labels, cfg.num_groups, cfg.grouping, label_range)
    weigh = label_weights(train_labels, cfg.reweight, cfg.lds, cfg.lds_kernel, cfg.lds_ks,
                          cfg.lds_sigma, cfg.label_bin_width)

    # --- model and optimiser --------------------------------------------------------------
    model = DIRNet(cfg.backbone, cfg.num_groups, grouped=cfg.method == "groupdir")
    init_regressor_bias(model, train_labels, grouping)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # --- epochs ---------------------------------------------------------------------------
    best, step = math.inf, 0
    history = []
    with open(run_dir / "steps.jsonl", "w") as step_log:
        for epoch in range(cfg.epochs):
            model.train()
            sums: dict[str, float] = {}
            started = time.perf_counter()
            bar = tqdm(loaders["train"], desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=None if progress else True, dynamic_ncols=True)  # None: off when not a TTY
            for images, labels, _ in bar:
                groups = torch.as_tensor(grouping.assign(labels.numpy()), device=device)
                weights = torch.as_tensor(weigh(labels.numpy()), device=device) if weigh else None
                output = model(normalize(images.to(device)))
                terms = loss_terms(cfg, output, labels.to(device, torch.float32), groups, weights)
                check_finite(terms, epoch, step)
                optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                optimizer.step()
                values = {name: value.item() for name, value in terms.items()}
                step_log.write(json.dumps({"epoch": epoch + 1, "step": step, **values}) + "\n")
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
                step += 1
            train_terms = {f"train/{k}": v / len(loaders["train"]) for k, v in sums.items()}
            val = evaluate(model, loaders["val"], grouping, train_labels, cfg, device)["predicted"]
            if math.isnan(val[cfg.select_metric]):
                raise TrainingError(f"validation {cfg.select_metric} is NaN (no validation sample in that "
                                    f"shot); pick another select_metric")
            improved = val[cfg.select_metric] < best
            if improved:
                best = val[cfg.select_metric]
                save_checkpoint(run_dir / CHECKPOINT, model, cfg, grouping, train_labels, epoch + 1, val)
            record = {"epoch": epoch + 1, "seconds": time.perf_counter() - started, **train_terms,
                      **{f"val/{k}": v for k, v in val.items()}}
            history.append(record)
            write_json_atomic(run_dir / "history.json", history)  # every epoch: a crash keeps what was done
            if progress:
                print(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {train_terms['train/total']:.3f}  "
                      f"val MAE {val['mae/all']:.2f}  val bMAE {val['bmae/all']:.2f}  "
                      f"group acc {val['group_acc']:.3f}{'  *best' if improved else ''}", flush=True)

    # --- one test evaluation of the best-on-validation checkpoint -------------------------
    best_state = load_checkpoint(run_dir / CHECKPOINT)
    model.load_state_dict(best_state["model"])
    results = evaluate(model, loaders["test"], grouping, train_labels, cfg, device)
    results["best_epoch"] = best_state["epoch"]
    write_json_atomic(run_dir / RESULTS, results)
    return results


def loss_terms(cfg: Config, output: Output, labels: torch.Tensor, groups: torch.Tensor,
               weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Paper Eq. 5: lambda_grc * L_grc + lambda_reg * L_reg + lambda_soft * L_cls, term by term."""
    if cfg.method == "vanilla":
        reg = regression_loss(output.experts[:, 0], labels, cfg.reg_loss, weights)
        return {"total": reg, "reg": reg}
    # Training regresses every sample with its TRUE group's expert.
    reg = regression_loss(output.experts.gather(1, groups[:, None]).squeeze(1), labels, cfg.reg_loss, weights)
    if cfg.group_loss == "soft":
        cls = soft_label_loss(output.group_logits, groups, cfg.beta)
    else:
        cls = F.cross_entropy(output.group_logits, groups)
    terms = {"reg": reg, "cls": cls}
    total = cfg.lambda_reg * reg + cfg.lambda_soft * cls
    if cfg.lambda_grc > 0:
        terms["grc"] = group_contrastive_loss(output.features, groups, cfg.temperature, cfg.similarity,
                                              cfg.loss_backend)
        total = total + cfg.lambda_grc * terms["grc"]
    return {"total": total, **terms}


@torch.no_grad()
def evaluate(model: DIRNet, loader, grouping: Grouping, train_labels: np.ndarray, cfg: Config,
             device: torch.device) -> dict[str, dict[str, float]]:
    """Shot and group metrics per route; vanilla has only the predicted route."""
    model.eval()
    routes = ROUTES if cfg.method == "groupdir" else ("predicted",)
    predictions = {r: [] for r in routes}
    chosen_groups, targets = [], []
    for images, labels, _ in loader:
        output = model(normalize(images.to(device)))
        groups = torch.as_tensor(grouping.assign(labels.numpy()), device=device)
        for name in routes:
            predictions[name].append(route(output, name, groups).float().cpu())
        if output.group_logits is not None:
            chosen_groups.append(output.group_logits.argmax(dim=1).cpu())
        targets.append(labels)
    target = torch.cat(targets).numpy()
    true_groups = grouping.assign(target)
    shots = shot_of_bins(label_bins(target, cfg.label_bin_width), train_labels, cfg.many_shot, cfg.few_shot,
                         cfg.label_bin_width)
    results = {}
    for name in routes:
        pred = torch.cat(predictions[name]).numpy()
        metrics = shot_metrics(pred, target, train_labels, cfg.many_shot, cfg.few_shot, cfg.label_bin_width)
        if name == "oracle":
            used_groups = true_groups
        elif chosen_groups:
            used_groups = torch.cat(chosen_groups).numpy()
        else:  # vanilla: the group its predicted value falls into
            used_groups = grouping.assign(pred)
        results[name] = {**metrics, **group_metrics(used_groups, true_groups, shots)}
    return results


def init_regressor_bias(model: DIRNet, train_labels: np.ndarray, grouping: Grouping) -> None:
    """Start each regressor at its label prior (the mean training label of its group, the overall
    mean for vanilla), so short runs spend their steps on features rather than on offsets."""
    labels = np.asarray(train_labels)
    with torch.no_grad():
        if model.classifier is None:
            model.experts.bias.fill_(float(labels.mean()))
            return
        groups = grouping.assign(labels)
        for g in range(grouping.num_groups):
            members = labels[groups == g]
            centre = members.mean() if len(members) else (grouping.edges[g] + grouping.edges[g + 1]) / 2
            model.experts.bias[g] = float(centre)


def check_finite(terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value):
            raise TrainingError(f"loss term '{name}' is {value.item()} at epoch {epoch + 1}, step {step}; "
                                f"stopping (try a lower lr or a higher temperature)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, model: DIRNet, cfg: Config, grouping: Grouping, train_labels, epoch: int,
                    val: dict) -> None:
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "group_edges": list(grouping.edges),
             "train_labels": torch.as_tensor(np.asarray(train_labels), dtype=torch.float64),
             "epoch": epoch, "val": val, "version": __version__}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint behind


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} not found") from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise TrainingError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err


def evaluate_checkpoint(path: str | Path, data: str, split: str = "test", batch_size: int | None = None,
                        device: str | None = None) -> dict:
    """`groupdir eval`: the checkpoint's model on a split of a data root, every route."""
    state = load_checkpoint(path)
    cfg = load_config(overrides={**state["config"], "data": str(data)})
    model = DIRNet(cfg.backbone, cfg.num_groups, grouped=cfg.method == "groupdir")
    model.load_state_dict(state["model"])
    target_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target_device)
    if batch_size:
        cfg.batch_size = batch_size
    loader = open_data(cfg, [split], augmented=None)[1][split]
    grouping = Grouping(tuple(state["group_edges"]))
    return evaluate(model, loader, grouping, state["train_labels"].numpy(), cfg, target_device)
