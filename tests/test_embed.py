"""embed.py: the kNN and pair numbers on features whose answer is known, and runs on tiny run folders."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import dfc_finetune
import embed
import meterml_finetune
import sen12ms_pretrain
from datasets import MeterMLDataset
from helpers import PNG_SIGNATURE
from models import SharedNet, load_checkpoint
from synthetic_data import write_dfc2020, write_meterml, write_sen12ms

KNN_KEYS = {"s1", "s2", "s1_to_s2", "s2_to_s1"}


def clusters(classes=4, per_class=10, dim=16, noise=0.05, seed=0):
    """Features in tight clusters around orthogonal class centres: (N, dim) and labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    z = F.one_hot(labels, dim).double() + noise * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return z, labels


def angles(degrees):
    """Unit vectors in the plane at the given angles: (N, 2)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_knn_is_perfect_on_class_clusters_within_and_across_modalities():
    z1, labels = clusters(seed=0)
    z2 = z1 + 0.05 * torch.randn(z1.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    numbers = embed.embedding_numbers(z1, z2, labels, k=5)
    assert numbers["knn_accuracy"] == {key: 100.0 for key in KNN_KEYS}
    # S2 clusters moved one class on: each modality alone is perfect, across them nothing matches.
    shifted = z2[(torch.arange(len(labels)) + 10) % len(labels)]
    knn = embed.embedding_numbers(z1, shifted, labels, k=5)["knn_accuracy"]
    assert (knn["s1"], knn["s2"], knn["s1_to_s2"], knn["s2_to_s1"]) == (100.0, 100.0, 0.0, 0.0)


def test_leave_one_out_keeps_a_query_from_finding_itself():
    # angles 0, 10, 25, 45 degrees with labels 0, 1, 0, 1: every point's nearest other point is of the other class
    z, labels = angles([0, 10, 25, 45]), torch.tensor([0, 1, 0, 1])
    assert embed.knn_accuracy(z, labels, z, labels, k=1, leave_one_out=False) == 100.0
    assert embed.knn_accuracy(z, labels, z, labels, k=1, leave_one_out=True) == 0.0
    # k larger than the keys left: all 3 others vote; 0 degrees sees (1, 0, 1) -> 1, wrong; and so on by hand
    assert embed.knn_accuracy(z, labels, z, labels, k=50, leave_one_out=True) == 0.0


def test_a_tied_vote_goes_to_the_more_similar_class():
    keys, key_labels = angles([10, 60]), torch.tensor([0, 1])  # one neighbour of each class
    query = angles([0])
    assert embed.knn_accuracy(query, torch.tensor([0]), keys, key_labels, k=2) == 100.0  # 10 degrees is nearer
    assert embed.knn_accuracy(query, torch.tensor([1]), keys, key_labels, k=2) == 0.0
    # two votes beat one vote of higher similarity: labels (0, 1, 1) at 10, 60, 70 degrees
    keys3 = angles([10, 60, 70])
    assert embed.knn_accuracy(query, torch.tensor([1]), keys3, torch.tensor([0, 1, 1]), k=3) == 100.0


def test_knn_is_cosine_so_feature_length_does_not_matter():
    z, labels = clusters(seed=2)
    scale = torch.rand(len(z), 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10 + 0.1
    assert embed.knn_accuracy(z * scale, labels, z, labels, k=3, leave_one_out=True) == 100.0


def test_knn_refuses_what_it_cannot_compute():
    z, labels = angles([0, 10]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="share D"):
        embed.knn_accuracy(z, labels, torch.zeros(2, 3), labels)
    with pytest.raises(ValueError, match="one key per query"):
        embed.knn_accuracy(z, labels, z[:1], labels[:1], leave_one_out=True)
    with pytest.raises(ValueError, match="at least one query and one key"):
        embed.knn_accuracy(z[:1], labels[:1], z[:1], labels[:1], leave_one_out=True)


def test_pair_similarity_knows_identical_orthogonal_and_random_features():
    z = F.one_hot(torch.arange(6), 6).double()  # orthogonal: any two different samples have cosine 0
    same = embed.pair_similarity(z, z, seed=0)
    assert same["paired"] == pytest.approx(1.0) and same["random"] == 0.0  # random pairs never pair a sample with itself
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 128, generator=g), torch.randn(2000, 128, generator=g)
    noise = embed.pair_similarity(a, b, seed=0)
    assert abs(noise["paired"]) < 0.01 and abs(noise["random"]) < 0.01  # std of one cosine is 1 / sqrt(128)
    aligned = embed.pair_similarity(a, -a, seed=0)
    assert aligned["paired"] == pytest.approx(-1.0) and abs(aligned["random"]) < 0.01
    z1, _ = clusters(seed=4)
    assert embed.pair_similarity(z1, z1, seed=7) == embed.pair_similarity(z1, z1, seed=7)
    assert embed.pair_similarity(z1, z1, seed=7)["random"] != embed.pair_similarity(z1, z1, seed=8)["random"]
    # by hand: 10 of 40 samples share a class, so a random partner is of the same class about a quarter of the time
    assert 0.1 < embed.pair_similarity(z1, z1, seed=7)["random"] < 0.45


@pytest.mark.slow
def test_tsne_points_are_s1_then_s2_and_keep_the_clusters():
    z1, labels = clusters(classes=3, per_class=8, seed=5)
    z2 = z1 + 0.05 * torch.randn(z1.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    points = embed.tsne_points(z1, z2, seed=0)
    assert points.shape == (48, 2)
    assert (points == embed.tsne_points(z1, z2, seed=0)).all()  # fixed random_state
    flat = torch.from_numpy(points)
    both = torch.cat([labels, labels])
    assert embed.knn_accuracy(flat, both, flat, both, k=3, leave_one_out=True) == 100.0  # clusters survive in 2-D


@pytest.mark.slow
@pytest.mark.parametrize("color_by", ["class", "modality"])
def test_tsne_modalities_are_large_markers_of_two_shapes(tmp_path, color_by):
    labels = torch.arange(3).repeat_interleave(4).numpy()  # 12 samples, 3 classes
    points = torch.randn(24, 2, generator=torch.Generator().manual_seed(0)).numpy()
    fig = embed.tsne_figure(tmp_path / "tsne.png", points, labels, ["a", "b", "c"], color_by, "title")
    assert (tmp_path / "tsne.png").read_bytes()[:8] == PNG_SIGNATURE
    collections = fig.axes[0].collections
    assert all(size >= 30 for c in collections for size in c.get_sizes())
    shapes = {}  # marker outline (its vertices) -> points drawn with it
    for c in collections:
        key = c.get_paths()[0].vertices.round(3).tobytes()
        shapes[key] = shapes.get(key, 0) + len(c.get_offsets())
    assert sorted(shapes.values()) == [12, 12]  # two shapes: the 12 S1 points and the 12 S2 points


def test_run_kind_is_the_script_recorded_in_config_json():
    for script in embed.KINDS:
        assert embed.run_kind({"script": script, "arch": "resnet18"}) == script
    for config in ({"arch": "resnet18", "eval_split": "test"}, {"script": "train.py"}):
        with pytest.raises(embed.NotARunError, match="names no script of this project"):
            embed.run_kind(config)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        embed.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert "is not a run folder: no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.1}))
    with pytest.raises(SystemExit):
        embed.main([str(tmp_path)])
    assert "names no script of this project" in capsys.readouterr().err


def check_outputs(out, info, total):
    """embedding.json holds `info` with sane values; tsne.png is a PNG."""
    assert json.loads((out / "embedding.json").read_text()) == info
    assert (out / "tsne.png").read_bytes()[:8] == PNG_SIGNATURE
    assert set(info["knn_accuracy"]) == KNN_KEYS and all(0 <= v <= 100 for v in info["knn_accuracy"].values())
    cosines = info["pair_cosine"]
    assert -1 <= cosines["paired"] <= 1 and -1 <= cosines["random"] <= 1
    assert info["n"] + info["ignored"] == info["encoded"] == total
    assert sum(info["class_counts"].values()) == info["n"] and info["k"] == min(5, info["n"] - 1)


@pytest.fixture(scope="module")
def dfc_root(tmp_path_factory):
    return write_dfc2020(tmp_path_factory.mktemp("dfc"), n_validation=12, n_test=6, seed=0, size=64)


@pytest.mark.slow
def test_embed_a_meterml_finetuning_run(tmp_path):
    root = write_meterml(tmp_path / "meter", n=20, seed=0)  # 4 val
    run = tmp_path / "run"
    meterml_finetune.main(["random", "--data_root", str(root), "--save_path", str(run), "--workers", "0", "--epochs", "1",
                           "--batch_size", "8", "--model", "shared", "--use_sup_con"])
    info = embed.main([str(run)])
    check_outputs(run / "embedding", info, 4)
    assert (info["kind"], info["dataset"], info["split"], info["checkpoint"], info["epoch"]) == (
        "meterml_finetune", "METER-ML", "val", "last.pt", 1)
    assert info["classes"] == MeterMLDataset.classes
    # The same numbers from the checkpoint alone, encoded here.
    encoder = SharedNet()
    load_checkpoint(encoder, run / "last.pt")
    encoder.eval()
    val = MeterMLDataset(root, "val")
    batch = default_collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        numbers = embed.embedding_numbers(encoder(batch["s1"]), encoder(batch["s2"]), batch["label"])
    assert info["knn_accuracy"] == numbers["knn_accuracy"]
    assert info["pair_cosine"] == pytest.approx(numbers["pair_cosine"], abs=1e-6)
    # --out and --color_by modality; --max_samples takes a seeded subset
    other = embed.main([str(run), "--out", str(tmp_path / "elsewhere"), "--color_by", "modality", "--max_samples", "3"])
    check_outputs(tmp_path / "elsewhere", other, 3)
    assert (other["of"], other["color_by"], info["color_by"]) == (4, "modality", "class")


@pytest.mark.slow
def test_embed_a_dfc2020_run_reads_its_evaluation_split(dfc_root, tmp_path):
    run = tmp_path / "run"
    dfc_finetune.main(["--data_root", str(dfc_root), "--save_path", str(run), "--arch", "resnet18", "--crop", "32",
                       "--eval_crop", "0", "--workers", "0", "--batch_size", "4", "--epochs", "1"])
    info = embed.main([str(run)])
    check_outputs(run / "embedding", info, 6)
    assert (info["kind"], info["dataset"], info["split"], len(info["classes"])) == ("dfc_finetune", "DFC2020", "test", 8)
    results = json.loads((run / "results.json").read_text())["last"]
    assert info["ignored"] == results["ignored"] and info["n"] == results["n"]  # the evaluation's samples
    missing = embed.main([str(run), "--split", "validation", "--out", str(tmp_path / "val")])
    assert missing["split"] == "validation" and missing["encoded"] == 12


@pytest.mark.slow
def test_embed_pretraining_runs(dfc_root, tmp_path):
    """A tiny sen12ms_pretrain.py run (backbones only, no classifier), on SEN12MS and on DFC2020;
    a METER-ML pre-training run folder made by hand (config.json and encoder.pth only)."""
    sen12ms = write_sen12ms(tmp_path / "sen12ms", n_per_season=2, seed=0, size=48)
    run = tmp_path / "sen12ms_run"
    sen12ms_pretrain.main(["--data_root", str(sen12ms), "--arch", "resnet18", "--crop", "32", "--epochs", "1",
                           "--batch_size", "4", "--device", "cpu", "--workers", "0", "--save_path", str(run)])
    info = embed.main([str(run), "--split", "spring,fall"])
    check_outputs(run / "embedding", info, 4)
    assert (info["kind"], info["data"], info["split"], info["epoch"]) == ("sen12ms_pretrain", "SEN12MS", "spring,fall", 1)
    on_dfc = embed.main([str(run), "--data_root", str(dfc_root), "--out", str(tmp_path / "dfc")])
    check_outputs(tmp_path / "dfc", on_dfc, 6)
    assert (on_dfc["data"], on_dfc["split"]) == ("DFC2020", "test")

    meter = write_meterml(tmp_path / "meter", n=20, seed=0)
    pre = tmp_path / "meterml_pre"
    pre.mkdir()
    (pre / "config.json").write_text(json.dumps({"script": "meterml_pretrain", "arch": "shared", "use_pairs": True, "data_root": str(meter), "seed": 0}))
    torch.save(SharedNet().state_dict(), pre / "encoder.pth")
    info = embed.main([str(pre)])
    check_outputs(pre / "embedding", info, 4)
    assert (info["kind"], info["checkpoint"], info["epoch"]) == ("meterml_pretrain", "encoder.pth", None)


def test_a_run_without_its_checkpoint_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"script": "dfc_finetune", "arch": "resnet18", "eval_split": "test"}))
    with pytest.raises(FileNotFoundError, match="last.pt not found .*checkpoints in the run folder: none"):
        embed.main([str(run)])
