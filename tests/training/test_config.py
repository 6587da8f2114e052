"""TrainConfig: strict keys with did-you-mean, fVLM defaults, path resolution, the LR schedule."""

from __future__ import annotations

import pytest

from visd.errors import ConfigError
from visd.training.config import StageConfig, TrainConfig, lr_factor


def _base(**changes):
    data = {
        "model": {"config": {}, "tokenizer": "tok"},
        "data": {"manifest": "m.csv"},
        "stages": [{}],
        "output_dir": "out",
    }
    data.update(changes)
    return data


def test_fvlm_defaults():
    s = TrainConfig.from_dict(_base()).stages[0]
    assert (s.lr, s.min_lr, s.epochs, s.batch_size, s.weight_decay) == (1e-4, 1e-6, 20, 14, 0.05)
    assert (s.momentum, s.disease_temperature) == (0.995, 0.07)
    assert TrainConfig.from_dict(_base()).data.flip_prob == 0.2


@pytest.mark.parametrize(
    "changes, where, suggestion",
    [
        ({"dta": {}}, "'dta'", "Did you mean 'data'?"),
        ({"stages": [{"batchsize": 2}]}, "'stages.0.batchsize'", "Did you mean 'batch_size'?"),
        ({"data": {"manifest": "m.csv", "num_worker": 2}}, "'data.num_worker'", "Did you mean 'num_workers'?"),
        ({"model": {"pretrained": "x", "tokeniser": "t"}}, "'model.tokeniser'", "Did you mean 'tokenizer'?"),
    ],
)
def test_unknown_keys_are_errors_with_suggestions(changes, where, suggestion):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(_base(**changes))
    assert where in str(e.value) and suggestion in str(e.value)


def test_wrong_option_value_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'alignment'"):
        TrainConfig.from_dict(_base(stages=[{"objectives": ["alignmnet"]}]))
    with pytest.raises(ConfigError, match="Did you mean 'bf16'"):
        TrainConfig.from_dict(_base(precision="bf61"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": {"pretrained": "a", "config": {}}}, "exactly one of"),
        ({"model": {"config": {"embed_dim": 30, "attention_heads": 4}}}, "divisible"),
        ({"model": {"config": {}}}, "needs a tokenizer"),
        ({"stages": [{"objectives": ["normality", "alignment"]}]}, "own stage"),
        ({"stages": [{"objectives": ["disease"], "freeze": ["vision", "pooling", "normality"]}]}, "nothing to train"),
        ({"stages": [{"lr": 1e-6, "min_lr": 1e-4}]}, "min_lr"),
        ({"stages": [{}, {}]}, "distinct"),
        ({"stages": []}, "at least 1"),
    ],
)
def test_invalid_configs(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(_base(**changes))


def test_frozen():
    config = TrainConfig.from_dict(_base())
    with pytest.raises(Exception):
        config.seed = 1  # type: ignore[misc]


def test_trainable_groups():
    assert StageConfig(objectives=("alignment",)).trainable_groups == ("vision", "pooling", "text", "temperature")
    assert StageConfig(objectives=("disease",)).trainable_groups == ("vision", "pooling")
    assert StageConfig(objectives=("normality",)).trainable_groups == ("normality",)
    assert StageConfig(objectives=("normality",), freeze=("vision",)).trainable_groups == ("normality",)
    assert StageConfig(objectives=("alignment",), freeze=()).trainable_groups == (
        "vision", "normality", "pooling", "text", "temperature"
    )
    assert StageConfig(objectives=("alignment", "disease")).views == 2


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "train.yaml").write_text(
        "model: {pretrained: org/name}\n"
        "data: {manifest: ../data/m.csv}\n"
        "stages: [{objectives: [normality]}]\n"
        "output_dir: runs/a\n"
    )
    c = TrainConfig.from_file(tmp_path / "cfg" / "train.yaml")
    assert c.data.manifest == str((tmp_path / "data" / "m.csv").resolve())
    assert c.output_dir == str((tmp_path / "cfg" / "runs" / "a").resolve())
    assert c.model.pretrained == "org/name"  # a Hub repo id is not a path


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        TrainConfig.from_file(path)


def test_lr_schedule_known_values():
    lr, lo = 1e-4, 1e-6
    f = [lr * lr_factor(s, 11, 5, lr, lo) for s in range(11)]
    assert f[0] == pytest.approx(lo)  # warmup starts at min_lr
    assert f[1] == pytest.approx(lo + (lr - lo) / 5)
    assert f[5] == pytest.approx(lr)  # peak after warmup
    assert f[10] == pytest.approx(lo)  # cosine ends at min_lr on the last step
    # halfway through the decay (12 steps, 5 warmup: decay over steps 5..11), cos(pi/2) = 0
    assert lr * lr_factor(8, 12, 5, lr, lo) == pytest.approx((lr + lo) / 2)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))  # monotone decay
    assert lr_factor(0, 1, 0, lr, lo) == 1.0  # a one-step stage runs at lr
