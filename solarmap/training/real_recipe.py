"""The recipe for a pretrained backbone on real imagery: fine-tune the classifier on views of the
real sets, train the greedy CAM branch on them (everything else frozen), then choose everything
else on real validation data: the decision threshold (best worst-source score), CAM offsets, scales
and mask rules, the colour prior (real training tiles) and its rule, a segmentation head trained on
PV01's pixel masks, and which outline method is the default (best PV01 validation pixel IoU).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from solarmap.model.network import ModelConfig, SolarNet
from solarmap.model.seg import class_attention, segment
from solarmap.model.scorer import ModelScorer
from solarmap.pipeline import DetectConfig
from solarmap.training.calibrate import sweep_detect_configs
from solarmap.training.data import Sample
from solarmap.training.finetune import (FinetuneConfig, by_source_and_label, finetune_classifier, predict_images,
                                        source_scores, worst_source)
from solarmap.training.pseudoseg import IGNORE, erasing_saliency, pseudo_masks, train_pseudo_seg
from solarmap.training.real_data import NEGATIVE_SOURCES, RealImage, write_pv01_scenes
from solarmap.training.recipe import StagePlan, cached_seg_head, calibrate_model, run_stages
from solarmap.training.views import ViewConfig, centre_view, random_view

__all__ = ["BRANCH_PLAN", "HARD_NEGATIVE_GROUP", "as_samples", "choose_threshold", "finish_model",
           "mine_hard_negatives", "released_network", "train_network", "train_real_model"]

BRANCH_PLAN = (StagePlan("branch1", "branch1", epochs=8, lr=1e-3, batch_size=64),
               StagePlan("branch2", "branch2", epochs=5, lr=1e-3, batch_size=64))
THRESHOLDS = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))


def as_samples(images: Sequence[RealImage], size_px: int) -> list[Sample]:
    """Centre views as training samples (what the branch stages train on)."""
    return [Sample(pixels=centre_view(im.pixels, size_px), label=im.label, source=im.source, key=im.key)
            for im in images]


def choose_threshold(images: Sequence[RealImage], probs: np.ndarray) -> tuple[float, dict]:
    """The decision threshold with the best worst-source score (see finetune.worst_source)."""
    scored = {t: worst_source(source_scores(images, probs, t)) for t in THRESHOLDS}
    best = max(scored, key=lambda t: (scored[t], -abs(t - 0.5)))
    return float(best), scored


def seg_windows(images: Sequence[RealImage], *, views: int, size_px: int, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random views of images with masks and their labels (1 panel, 0 not, IGNORE for mixed edges)."""
    rng = np.random.default_rng(seed)
    config = ViewConfig(size_px=size_px)
    pixels, labels = [], []
    for image in images:
        for _ in range(views):
            view, fraction = random_view(image.pixels, rng, config, mask=image.mask)
            label = np.full(fraction.shape, IGNORE, np.uint8)
            label[fraction >= 192] = 1
            label[fraction <= 64] = 0
            pixels.append(view)
            labels.append(label)
    return torch.from_numpy(np.stack(pixels)), torch.from_numpy(np.stack(labels))


def one_view_each(images: Sequence[RealImage], *, sources: Sequence[str], label: int, per_source: int,
                  size_px: int, seed: int) -> list[np.ndarray]:
    """One random view each of ``per_source`` images of each source with that label (chosen at random)."""
    rng = np.random.default_rng(seed)
    config = ViewConfig(size_px=size_px)
    views = []
    for source in sources:
        pool = [image for image in images if image.source == source and image.label == label]
        for index in rng.choice(len(pool), size=min(per_source, len(pool)), replace=False):
            views.append(random_view(pool[index].pixels, rng, config)[0])
    return views


def seg_negative_windows(images: Sequence[RealImage], *, per_source: int, size_px: int, seed: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``per_source`` negative images from each of the ``NEGATIVE_SOURCES`` (chosen at
    random, each once), labelled background everywhere: roofs, pavement and fields from other places
    and sensors than the masks' one UAV set."""
    views = one_view_each(images, sources=NEGATIVE_SOURCES, label=0, per_source=per_source, size_px=size_px,
                          seed=seed)
    pixels = torch.from_numpy(np.stack(views)) if views else torch.zeros((0, 3, size_px, size_px))
    return pixels, torch.zeros((len(pixels), size_px, size_px), dtype=torch.uint8)


PSEUDO_SOURCES = ("bern", "fresno")  # positives with image-level labels only, unlike PV01's roofs and sensor


def seg_pseudo_windows(net: SolarNet, images: Sequence[RealImage], *, per_source: int, size_px: int,
                       high: float = 0.5, seed: int = 2, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``per_source`` positive images of each of ``PSEUDO_SOURCES`` (chosen at random, each
    once), labelled by ``net``'s own pseudo masks (:func:`~solarmap.training.pseudoseg.pseudo_masks`
    of the branch CAM and erasing saliency: panel where their product reaches ``high`` of its peak,
    background where it is low, IGNORE between).

    Why: a head that has seen panels only in PV01's UAV photos draws nothing on most residential
    arrays elsewhere, though the classifier finds them (version 12 on Fresno / Bern validation chips
    detected alone: a polygon on 0.37 / 0.58 of the positives; with 120 such views per source 0.88 /
    0.88, but PV01 pixel IoU 0.762 -> 0.681: the CAM-made labels are blobs; docs/real-imagery.md)."""
    views = one_view_each(images, sources=PSEUDO_SOURCES, label=1, per_source=per_source, size_px=size_px,
                          seed=seed)
    if not views:
        return torch.zeros((0, 3, size_px, size_px)), torch.zeros((0, size_px, size_px), dtype=torch.uint8)
    pixels = torch.from_numpy(np.stack(views))
    net.eval()
    labels = torch.cat([pseudo_masks(class_attention(net, x.float()), erasing_saliency(net, x.float()), high=high)
                        for x in pixels.split(batch_size)])
    return pixels, labels


def head_on_views(net: SolarNet, views: torch.Tensor, *, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """The trained head's panel probability on training views, as the head alone draws (no gate),
    one batch at a time (a caller that reduces each keeps no full maps) and without gradients: what
    mining and relabelling judge a first-round head by."""
    for x in views.split(batch_size):
        with torch.no_grad():
            probability = segment(net, x.float(), attention_floor=0.0)
        yield probability


def relabel_by_head(labels: torch.Tensor, head: torch.Tensor, *, panel: float = 0.5, background: float = 0.2,
                    min_cover: float = 0.25) -> torch.Tensor:
    """CAM-made labels (uint8 1 / 0 / IGNORE, batch of maps) tightened by a trained head's panel
    probability ``head`` on the same views: where the head (>= ``panel``) covers at least ``min_cover``
    of a view's panel pixels, panel is where both say so, background where the label said so or
    where the label said panel and the head is below ``background``, unsure elsewhere; a view whose
    array the head misses keeps its label as it was.

    Why: the CAM-made labels are blobs 1.5-2 times the array (pseudo-masked heads lost PV01 pixel
    IoU: 0.762 -> 0.736-0.759 on validation, docs/real-imagery.md); the head, trained on PV01's real
    edges, is tighter where it sees an array, and a head that misses one must not teach it as
    background."""
    out = labels.clone()
    marked, seen = labels == 1, head >= panel
    cover = (marked & seen).flatten(1).sum(dim=1) / marked.flatten(1).sum(dim=1).clamp(min=1)
    tight = (cover >= min_cover) & marked.flatten(1).any(dim=1)
    relabelled = torch.full_like(labels[tight], IGNORE)
    relabelled[labels[tight] == 0] = 0
    relabelled[marked[tight] & (head[tight] < background)] = 0
    relabelled[marked[tight] & seen[tight]] = 1
    out[tight] = relabelled
    return out


def seg_hard_negative_windows(net: SolarNet, images: Sequence[RealImage], *, per_source: int, size_px: int,
                              level: float = 0.5, seed: int = 4, batch_size: int = 32
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``per_source`` views of negative images, one view each of every image of each of the
    ``NEGATIVE_SOURCES``, on which ``net``'s trained head draws most (share of pixels with panel
    probability >= ``level``, no gate; views where it draws nothing are never taken), labelled
    background everywhere: hard negatives mined from the images given (the training split).

    Why: heads that learnt Bern's and Fresno's arrays from CAM-made labels outline dark roof planes
    and building shadows in negative imagery (UC Merced validation chips with a polygon: version 12
    8 of 150, such a head 13); random negative views hold few of them."""
    pixels = []
    net.eval()
    for source in NEGATIVE_SOURCES:
        pool = [image for image in images if image.source == source and image.label == 0]
        if not pool:
            continue
        views = torch.from_numpy(np.stack(one_view_each(pool, sources=(source,), label=0, per_source=len(pool),
                                                        size_px=size_px, seed=seed)))
        drawn = torch.cat([(probability >= level).float().mean(dim=(1, 2))
                           for probability in head_on_views(net, views, batch_size=batch_size)])
        order = [int(i) for i in torch.argsort(drawn, descending=True, stable=True) if drawn[i] > 0][:per_source]
        pixels.append(views[order])
    pixels = torch.cat(pixels) if pixels else torch.zeros((0, 3, size_px, size_px))
    return pixels, torch.zeros((len(pixels), size_px, size_px), dtype=torch.uint8)


def train_seg_on_masks(net: SolarNet, images: Sequence[RealImage], *, workdir: Path, say: Callable[[str], None],
                       views: int = 8, epochs: int = 8, reads_branch: bool = True, reads_context: bool = True,
                       negatives: Sequence[RealImage] = (), negatives_per_source: int = 0,
                       pseudo_per_source: int = 0, pseudo_high: float = 0.5, hard_negatives_per_source: int = 0,
                       relabel: bool = False) -> dict:
    """The segmentation head on real pixel masks (views of ``images`` as windows the size detection
    reads), kept under ``workdir`` and reused when rerun.

    ``reads_branch``: the head also reads the CAM branch's maps. On version 8's network, PV01
    validation pixel IoU was the same either way (0.69 / 0.68), but a head on RGB + stem alone learns
    colour and edges from one UAV set's 41 images; the branch's maps were trained on all five sets.
    ``reads_context``: and the backbone's stride-16 stage. On version 10's network it drew half as
    much away from the arrays (PV01 validation: 13.2 -> 6.4 m² per image) at a higher pixel IoU
    (0.720 -> 0.772; docs/real-imagery.md).
    ``negatives_per_source``: that many background-only views of ``negatives`` from each other source
    (:func:`seg_negative_windows`) beside the masks: the masks' one UAV set is the head's only notion
    of what is not a panel otherwise (negative scene on validation: 112 -> 3 m²; docs/real-imagery.md).
    ``pseudo_per_source``: that many pseudo-masked views of ``negatives``' Bern and Fresno positives
    (:func:`seg_pseudo_windows`, panel at ``pseudo_high`` of the peak).
    ``hard_negatives_per_source``: a second round: the head trained as above (its own cached stage)
    mines that many hard negative views per source from ``negatives`` (:func:`seg_hard_negative_windows`),
    and a new head learns from everything plus those.
    ``relabel``: and, in that second round, the pseudo-masked views' labels are tightened by the
    first round's head (:func:`relabel_by_head`)."""
    if relabel and not (hard_negatives_per_source and pseudo_per_source):
        raise ValueError("relabel: only in a second round (hard negatives) over pseudo-masked views")
    net.config = replace(net.config, seg_reads_branch=reads_branch, seg_reads_context=reads_context)

    def train() -> dict:
        if hard_negatives_per_source:  # round 1 (loaded, or trained and kept): only when round 2 is not kept yet
            train_seg_on_masks(net, images, workdir=workdir, say=say, views=views, epochs=epochs,
                               reads_branch=reads_branch, reads_context=reads_context, negatives=negatives,
                               negatives_per_source=negatives_per_source, pseudo_per_source=pseudo_per_source,
                               pseudo_high=pseudo_high)
        window = net.config.train_tile_px + 2 * net.backbone.inference_geometry["context_px"]
        windows, masks = seg_windows(images, views=views, size_px=window)
        if negatives_per_source:
            extra, background = seg_negative_windows(negatives, per_source=negatives_per_source, size_px=window)
            say(f"segmentation head: {len(windows)} masked views + {len(extra)} negative views")
            windows, masks = torch.cat([windows, extra]), torch.cat([masks, background])
        if pseudo_per_source:
            extra, pseudo = seg_pseudo_windows(net, negatives, per_source=pseudo_per_source, size_px=window,
                                               high=pseudo_high)
            say(f"segmentation head: {len(extra)} pseudo-masked views of {', '.join(PSEUDO_SOURCES)} positives")
            if relabel:  # net holds round 1's head here
                tightened = relabel_by_head(pseudo, torch.cat(list(head_on_views(net, extra))))
                changed = int((tightened != pseudo).flatten(1).any(dim=1).sum())
                say(f"segmentation head, round 2: labels of {changed} of {len(extra)} pseudo-masked views "
                    f"tightened by round 1's head")
                pseudo = tightened
            windows, masks = torch.cat([windows, extra]), torch.cat([masks, pseudo])
        if hard_negatives_per_source:
            extra, background = seg_hard_negative_windows(net, negatives, per_source=hard_negatives_per_source,
                                                          size_px=window)
            say(f"segmentation head, round 2: {len(extra)} hard negative views mined by round 1's head")
            windows, masks = torch.cat([windows, extra]), torch.cat([masks, background])
        return {**train_pseudo_seg(net, windows, masks=masks, epochs=epochs, progress=say),
                "negatives_per_source": negatives_per_source, "pseudo_per_source": pseudo_per_source,
                "hard_negatives_per_source": hard_negatives_per_source, "relabel": relabel}

    # a head of another shape or data is another stage: a working directory of an older recipe keeps its own
    name = "seg_masks" + ("_context" if reads_context else "") + (f"_neg{negatives_per_source}"
                                                                  if negatives_per_source else "")
    if pseudo_per_source:
        name += f"_pseudo{pseudo_per_source}" + (f"_high{pseudo_high:g}" if pseudo_high != 0.5 else "")
    if hard_negatives_per_source:
        name += f"_hard{hard_negatives_per_source}" + ("_relabel" if relabel else "")
    return cached_seg_head(net, workdir, name, train, say)


def compare_outlines(net: SolarNet, scenes: Sequence[tuple[str, str]]) -> dict:
    """Pixel IoU and total-area error on validation scenes for each outline method the model has."""
    candidates = {"branch": dict(method="branch"), "branch-plain": dict(method="branch", refine=False)}
    if net.seg_head is not None:
        candidates["pseudo-seg"] = dict(method="pseudo-seg")
    results = {}
    for name, options in candidates.items():
        scorer = ModelScorer(net, **options)
        results.update(sweep_detect_configs(scorer, {name: DetectConfig.for_scorer(scorer)}, scenes, tile_size_px=256))
    return results


OUTLINE_GSDS_M = (0.5, 0.6)  # besides PV01's own 0.1 m: state orthophotos and NAIP
GATE_FLOORS = (0.1, 0.05, 0.0)  # tried below the calibrated floor; 0: no gate


def choose_gate_floor_across_gsds(net: SolarNet, scenes: Sequence[tuple[str, str]], *,
                                  say: Callable[[str], None]) -> dict:
    """The segmentation head's blob-gate floor again (its mask threshold kept), judged by mean pixel
    IoU on validation mosaics at several GSDs (``scenes``: PV01's own 0.1 m and the same mosaics
    coarser); ties keep the higher floor.

    Why: the gate keeps a blob of the head's mask only where the branch CAM reaches the floor, and at
    0.5-0.6 m the CAM on the same arrays is weaker, so a floor calibrated at 0.1 m drops them whole.
    Version 11 (floor 0.2, mask >= 0.6) on PV01 validation: pixel IoU 0.767 at 0.1 m, 0.507 at 0.5 m,
    0.366 at 0.6 m (area -4 %, -39 %, -56 %); without the gate 0.762, 0.788, 0.773 (docs/real-imagery.md)."""
    floors = sorted({float(net.config.seg_attention_floor), *GATE_FLOORS}, reverse=True)
    sweep = {}
    for floor in floors:
        net.config = replace(net.config, seg_attention_floor=floor)
        scorer = ModelScorer(net, method="pseudo-seg")
        sweep[floor] = sweep_detect_configs(scorer, {"rule": DetectConfig.for_scorer(scorer)}, scenes,
                                            tile_size_px=256)["rule"]
    best = max(floors, key=lambda floor: sweep[floor]["pixel_iou"])  # max keeps the first of equals
    net.config = replace(net.config, seg_attention_floor=best)
    say(f"gate floor across GSDs: {best} ({ {floor: round(row['pixel_iou'], 3) for floor, row in sweep.items()} })")
    return {"floor": best, "sweep": {str(floor): row for floor, row in sweep.items()}}


def train_real_model(net: SolarNet, images: Sequence[RealImage], *, data_root: str | Path, workdir: str | Path,
                     say: Callable[[str], None], finetune: FinetuneConfig = FinetuneConfig(),
                     hard_negatives: Sequence[RealImage] = (), **head_options) -> dict:
    """The whole recipe on ``images`` (every split; only train and val are read): the network
    (:func:`train_network`), then everything after it (:func:`finish_model`; ``head_options`` go there)."""
    info = train_network(net, images, workdir=workdir, say=say, finetune=finetune, hard_negatives=hard_negatives)
    return {**info, **finish_model(net, images, data_root=data_root, workdir=workdir, say=say, **head_options)}


HARD_NEGATIVE_GROUP = "hard:0"  # FinetuneConfig.per_source key of the mined hard negatives


def mine_hard_negatives(model: SolarNet, images: Sequence[RealImage], *, min_score: float = 0.2,
                        size_px: int = FinetuneConfig.val_size_px) -> list[RealImage]:
    """The training negatives ``model`` scores at least ``min_score`` on their centre view: what a
    released model still mistakes for panels, for a new network to see more often.

    Why: the scenes a model confuses with panels are a few in a hundred of the negatives, drawn no more
    often than the rest; seen as a group of their own, often enough, they cut a new network's false
    positives on every negative source (docs/real-imagery.md, hard negatives from ImageNet up)."""
    negatives = [im for im in images if im.split == "train" and im.label == 0]
    scores = predict_images(model, negatives, size_px=size_px)
    return [im for im, score in zip(negatives, scores) if score >= min_score]


def train_network(net: SolarNet, images: Sequence[RealImage], *, workdir: str | Path, say: Callable[[str], None],
                  finetune: FinetuneConfig = FinetuneConfig(), hard_negatives: Sequence[RealImage] = ()) -> dict:
    """Steps 1-2 of the recipe: the classifier fine-tuned, then the greedy CAM branch (about 30 min).
    ``hard_negatives`` (:func:`mine_hard_negatives`) are drawn as a group of their own,
    ``finetune.per_source[HARD_NEGATIVE_GROUP]`` times an epoch."""
    workdir = Path(workdir)
    train = [im for im in images if im.split == "train"]
    val = [im for im in images if im.split == "val"]
    size = net.config.train_tile_px
    groups = by_source_and_label(train)
    if hard_negatives:
        if any(im.split != "train" or im.label != 0 for im in hard_negatives):
            raise ValueError("hard negatives must be training negatives")
        groups[HARD_NEGATIVE_GROUP] = list(hard_negatives)
    info: dict = {"finetune": finetune_classifier(net, groups, val, finetune, workdir=workdir, progress=say)}
    info["finetune"].pop("history")
    info["stages"] = run_stages(net, BRANCH_PLAN, as_samples(train, size), as_samples(val, size), workdir=workdir,
                                say=say)
    return info


# what the network's training fixes; everything else in a released model's config was chosen after it
NETWORK_FIELDS = ("backbone", "branch_at", "train_tile_px", "gsd_m", "mean", "std", "branch_channels", "branch_levels")


def released_network(net: SolarNet) -> SolarNet:
    """A released model's network and CAM branch as the recipe has them before its later steps:
    no segmentation head, and nothing calibrated (the CAM's scale and offsets among them, which the
    head's pseudo masks and hard-negative mining read).

    Why: a new head or calibration over a released model needs no working directory of its run
    (the network's 30 min of training, lost with the machine it ran on), and judges the weights
    users have (fp16-rounded) rather than the run's fp32 ones."""
    if net.config.branch_levels == 0:
        raise ValueError("this model has no trained CAM branch: nothing for the recipe's later steps to build on")
    kept = {name: getattr(net.config, name) for name in NETWORK_FIELDS}
    net.config = ModelConfig.for_backbone(kept.pop("backbone"), **kept)
    net.seg_head = None
    return net


def finish_model(net: SolarNet, images: Sequence[RealImage], *, data_root: str | Path, workdir: str | Path,
                 say: Callable[[str], None], seg_negatives_per_source: int = 60, seg_pseudo_per_source: int = 0,
                 seg_pseudo_high: float = 0.5, seg_hard_negatives_per_source: int = 0,
                 seg_relabel: bool = False) -> dict:
    """Steps 3-5 of the recipe over a trained network and branch: the decision threshold, the
    segmentation head, and every calibration on validation data."""
    workdir = Path(workdir)
    train = [im for im in images if im.split == "train"]
    val = [im for im in images if im.split == "val"]
    size = net.config.train_tile_px
    info: dict = {}
    threshold, sweep = choose_threshold(val, predict_images(net, val, size_px=size))
    net.config = replace(net.config, decision_threshold=threshold)
    info["decision_threshold"] = threshold
    say(f"decision threshold {threshold} (worst-source score {sweep[threshold]:.3f} on validation)")
    # real masks only: adding synthetic chips' masks (twice as many as PV01's) took the head's PV01
    # validation pixel IoU from about 0.77 to 0.58 (area -5 % to -31 %)
    masked = [im for im in train if im.source == "pv01" and im.mask is not None]
    info["seg_head"] = train_seg_on_masks(net, masked, workdir=workdir, say=say, negatives=train,
                                          negatives_per_source=seg_negatives_per_source,
                                          pseudo_per_source=seg_pseudo_per_source, pseudo_high=seg_pseudo_high,
                                          hard_negatives_per_source=seg_hard_negatives_per_source,
                                          relabel=seg_relabel)
    pv01_val = [im.key.split(":")[1] for im in val if im.source == "pv01"]
    scenes = write_pv01_scenes(data_root, pv01_val, workdir / "pv01_val")
    train_samples = as_samples(train, size)
    info["calibration"] = calibrate_model(net, train=train_samples, val=(), val_scenes=scenes, workdir=workdir, say=say)
    coarser = [pair for gsd_m in OUTLINE_GSDS_M
               for pair in write_pv01_scenes(data_root, pv01_val, workdir / "pv01_val", gsd_m=gsd_m)]
    info["gate_across_gsds"] = choose_gate_floor_across_gsds(net, scenes + coarser, say=say)
    info["outlines"] = compare_outlines(net, scenes)
    best = max(info["outlines"], key=lambda k: info["outlines"][k]["pixel_iou"])
    say(f"outline methods on PV01 validation: {info['outlines']}; default: {best}")
    info["default_outline"] = best
    return info
