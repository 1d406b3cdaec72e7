from pathlib import Path

import pytest

from rayrec.config import Config, ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.glob("configs/**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_has_a_launch_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any("python jobs/" in line for line in header), f"{path.name}: its header comment shows no launch command"


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=0.01", "model.head=ce", "eval.ks=[1,10]", "eval.metric=val_hr_1", "model.norm_first=false"])
    assert cfg.train.lr == 0.01 and cfg.model.head == "ce" and cfg.eval.ks == [1, 10] and cfg.model.norm_first is False



def test_scientific_notation_is_a_number_in_overrides_and_yaml(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4, without a dot, as a string
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1E-3\n  weight_decay: 5e-2\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.weight_decay == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(None, ["train.lr=3e-4x"])


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.lrr=1"], "unknown config key(s) ['train.lrr']"),
        (["bogus=1"], "unknown config key(s) ['bogus']"),
        (["model.head=softmax"], "choose one of ['bce', 'gbce', 'sampled_softmax', 'ce', 'mse', 'soft_bce', 'masked_diffusion']"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["model.emb_init_std=-0.1"], "model.emb_init_std must be >= 0"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["model.hidden=50", "model.num_heads=3"], "divisible by model.num_heads"),
        (["eval.metric=test_ndcg_10"], "must be a validation metric"),
        (["eval.metric=val_ndcg_7"], "k in eval.ks"),
        (["model.norm_first=maybe"], "must be true or false"),
        (["train.epochs=1.5"], "must be an integer"),
        (["scale.backend=nccl"], "needs scale.use_gpu=true"),
        (["eval.protocol=sampled", "data.eval_negatives=0"], "needs data.eval_negatives > 0"),
        (["train.lr"], "must look like key.sub=value"),
    ],
)
def test_bad_config_fails_with_a_clear_message(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.head=ce", "train.betas=[0.9,0.99]"])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
