"""The settings every recipe's TrainingArguments share (recipe_utils.recipe_training_arguments)."""

from __future__ import annotations

import pytest

from hf_vl.training import clip_recipe, detr_recipe, sam_recipe, vit_recipe
from hf_vl.training.recipe_utils import recipe_training_arguments


def test_shared_settings_and_overrides_win(tmp_path):
    args = recipe_training_arguments(tmp_path, 7, label_names=["labels"], save_strategy="epoch")
    assert args.use_cpu and args.report_to == [] and not args.remove_unused_columns
    assert args.ddp_find_unused_parameters is False and args.dataloader_num_workers == 0
    assert args.eval_strategy == "no" and args.save_strategy == "epoch"  # the override wins
    assert (args.seed, args.data_seed, args.output_dir) == (7, 7, str(tmp_path))


@pytest.mark.parametrize(
    "recipe, own",
    [
        (vit_recipe, dict(label_names=["labels"])),
        (clip_recipe, dict(label_names=[], prediction_loss_only=True)),
        (detr_recipe, dict(label_names=["labels"], per_device_eval_batch_size=50)),
        (sam_recipe, dict(label_names=["labels"])),
    ],
)
def test_each_recipe_adds_its_own_settings(tmp_path, recipe, own):
    args = recipe.training_arguments(tmp_path, 3, learning_rate=0.5)
    assert all(getattr(args, key) == value for key, value in own.items())
    assert args.learning_rate == 0.5 and not args.remove_unused_columns and args.seed == 3
    assert recipe.training_arguments(tmp_path, 3, label_names=["x"]).label_names == ["x"]  # overrides win
