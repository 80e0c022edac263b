"""Few-shot segmentation: pooling maths, episodes, the chunk protocol, conditioning, end to end, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsight.errors import MedsightError
from medsight.models.fewshot import (
    FewShotNet,
    combine_local_similarities,
    cosine_logits,
    local_prototypes,
    masked_average_pooling,
)
from medsight.scan import Scan
from medsight.transforms import EpisodeSampler, body_mask, superpixels
from medsight.transforms.slices import chunk_centres, chunk_of, chunk_plan, matching_range


# -- pooling and similarity ---------------------------------------------------------------------
def test_masked_average_pooling_by_hand():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # (1, 2, 2, 2)
    hard = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert torch.allclose(masked_average_pooling(features, hard), torch.tensor([[2.0, 20.0]]), atol=1e-4)
    soft = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])  # (1*1 + 0.5*2) / 1.5 and (10 + 10) / 1.5
    assert torch.allclose(masked_average_pooling(features, soft), torch.tensor([[4 / 3, 40 / 3]]), atol=1e-4)


def test_cosine_assignment_by_hand():
    # pixels (1, 0), (0, 1), (1, 1), (-1, 0.1) against prototypes background=(1, 0), foreground=(0, 1)
    features = torch.tensor([[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 1.0, 0.1]]).reshape(1, 2, 1, 4)
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    logits = cosine_logits(features, prototypes, 10.0)[0, :, 0]  # (K, pixels)
    d = 1 / math.sqrt(1.01)
    expected = torch.tensor(
        [[10.0, 0.0, 10 / math.sqrt(2), -10 * d], [0.0, 10.0, 10 / math.sqrt(2), 1.0 * d]]
    )
    assert torch.allclose(logits, expected, atol=1e-4)
    assert logits.argmax(0)[:2].tolist() == [0, 1] and logits.argmax(0)[3].item() == 1
    probability = logits.softmax(0)[1, 0].item()  # 1 / (1 + e^10)
    assert probability == pytest.approx(1 / (1 + math.exp(10)), rel=1e-4)


def test_local_prototypes_on_a_hand_made_grid():
    # one feature channel holding 0..15 row by row on a 4x4 grid, windows of 2x2
    features = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1  # top-left window fully inside: mean of 0, 1, 4, 5 = 2.5
    mask[2:, :2] = 1  # bottom-left window fully inside: mean of 8, 9, 12, 13 = 10.5
    mask[0, 2] = mask[0, 3] = mask[1, 2] = 1  # top-right window 3/4 inside: below the 0.95 share
    protos = local_prototypes(features, mask, window=2, threshold=0.95)
    assert sorted(protos[:, 0].tolist()) == [2.5, 10.5]
    # with a 0.7 share the top-right window counts, averaged under its mask: (2 + 3 + 6) / 3
    loose = local_prototypes(features, mask, window=2, threshold=0.7)
    assert sorted(loose[:, 0].tolist()) == pytest.approx([2.5, 11 / 3, 10.5])


def test_soft_maximum_over_local_similarities():
    s = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    expected = (math.e * 1 + math.e**3 * 3) / (math.e + math.e**3)
    assert combine_local_similarities(s).item() == pytest.approx(expected, rel=1e-5)


# -- superpixels and episodes --------------------------------------------------------------------
def test_body_mask_finds_air_and_flat_fill():
    rng = np.random.default_rng(0)
    dark = np.zeros((1, 20, 20, 4), np.float32)
    dark[:, 5:15, 5:15] = 400 + rng.normal(0, 10, (10, 10, 4))
    assert np.array_equal(body_mask(dark)[..., 0], dark[0, ..., 0] > 0)
    zscored = np.zeros((1, 20, 20, 4), np.float32)  # BraTS-like: 0 outside, N(0, 1) inside (half negative)
    zscored[:, 5:15, 5:15] = rng.normal(0, 1, (10, 10, 4))
    body = body_mask(zscored)
    assert body[5:15, 5:15].all() and not body[:5].any() and not body[:, :5].any()


def test_superpixels_ignore_background_and_small_pieces():
    image = np.zeros((40, 40), np.float32)
    image[:, 20:] = 1.0  # left half is air
    image[20:, 20:] = 0.5
    body = image > 0.1
    labels = superpixels(image, body, scale=50, sigma=0.5, min_size=10, max_fraction=0.4)
    assert (labels[:, :20] == 0).all()  # air gives no pseudo-class
    assert set(np.unique(labels[:, 20:])) - {0} and labels.max() == len(np.unique(labels)) - 1


@pytest.fixture(scope="module")
def phantom_slices():
    from medsight.datasets.phantom import make_phantom_3d
    from medsight.tasks.fewshot import training_slices

    image, _, _ = make_phantom_3d(3)
    return training_slices(image, None, 2, 64)


def test_episode_sampler_invariants(phantom_slices):
    slices, bodies = phantom_slices
    sampler = EpisodeSampler(slices, bodies, np.random.default_rng(1))
    for _ in range(40):
        e = sampler.sample()
        assert e.support_mask.any() and e.query_mask.any()
        assert e.support_mask.shape == e.query_mask.shape == e.support_image.shape[1:]
        assert not np.array_equal(e.query_image, e.support_image)
        assert np.array_equal(e.support_image, slices[e.slice_index])
        labels = sampler.labels(e.slice_index)
        chosen = np.unique(labels[e.support_mask])
        assert 1 <= len(chosen) <= 2 and 0 not in chosen  # one superpixel, or two adjacent ones
        assert e.support_mask.sum() >= sampler.min_size
    s_img, s_mask, q_img, q_mask = sampler.batch(3)
    assert s_img.shape == q_img.shape == (3, *slices.shape[1:]) and q_mask.dtype == np.int64


# -- chunk protocol ------------------------------------------------------------------------------
def test_chunk_protocol_hand_worked():
    # support labelled on slices 10..21 (12 slices): chunks 10-13, 14-17, 18-21, centres at
    # offsets floor(1.5*4)=... i.e. 10 + 2, 10 + 6, 10 + 10; query slices 0..8: three per chunk.
    assert chunk_centres(10, 21, 3) == [12, 16, 20]
    assert [chunk_of(q, 0, 8, 3) for q in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert chunk_plan((10, 21), (0, 8), 3) == {0: 12, 1: 12, 2: 12, 3: 16, 4: 16, 5: 16, 6: 20, 7: 20, 8: 20}
    # uneven: 5 support slices 0..4 in 2 chunks -> centres floor(5/4)=1 and floor(15/4)=3
    assert chunk_centres(0, 4, 2) == [1, 3]
    # support slices 5..32 of 38 -> same fractions of a 76-slice query: floor(10.0)=10 .. ceil(66.0)-1=65
    assert matching_range((5, 32), 38, 76) == (10, 65)
    with pytest.raises(ValueError):
        chunk_plan((0, 3), (0, 3), 0)


# -- conditioning ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["prototype", "conditional"])
def test_k_shot_conditioning_is_the_mean_of_single_shots(head):
    torch.manual_seed(0)
    net = FewShotNet(1, head, width=8, features=16).eval()
    images = torch.randn(1, 3, 1, 32, 32)
    masks = torch.zeros(1, 3, 32, 32)
    masks[0, 0, 4:12, 4:12] = masks[0, 1, 10:20, 8:16] = masks[0, 2, 20:28, 20:30] = 1
    with torch.no_grad():
        joint = net.condition(images, masks)
        singles = [net.condition(images[:, i : i + 1], masks[:, i : i + 1]) for i in range(3)]
        key = "prototypes" if head == "prototype" else "se_weights"
        if head == "prototype":
            assert joint[key].shape == (1, 2, 16)
            assert torch.allclose(joint[key], torch.stack([s[key] for s in singles]).mean(0), atol=1e-5)
        else:
            assert len(joint[key]) == 2 and all(w.shape == (1, 16) for w in joint[key])
            for b, w in enumerate(joint[key]):
                assert ((w > 0) & (w < 1)).all()
                assert torch.allclose(w, torch.stack([s[key][b] for s in singles]).mean(0), atol=1e-5)
        logits = net.segment(torch.randn(5, 1, 32, 32), joint)  # one conditioning, five queries
    assert logits.shape == (5, 2, 32, 32)


def test_se_conditioning_batches_episodes():
    net = FewShotNet(2, "conditional", width=8, features=16, se_blocks=3).eval()
    with torch.no_grad():
        cond = net.condition(torch.randn(4, 2, 2, 24, 24), (torch.rand(4, 2, 24, 24) > 0.5).float())
        assert len(cond["se_weights"]) == 3 and cond["se_weights"][0].shape == (4, 16)
        assert net.segment(torch.randn(4, 2, 24, 24), cond).shape == (4, 2, 24, 24)


# -- end to end on the phantom ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A local-prototype model trained on the images of four phantom volumes (no labels), 300 steps of
    8 episodes; one of the four volumes gives the validation episodes."""
    from medsight.datasets.phantom import write_phantom_dataset
    from medsight.tasks.fewshot import FewShotConfig, train

    root = tmp_path_factory.mktemp("fewshot")
    write_phantom_dataset(root / "data", 4, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster than two fighting for a shared CPU
    try:
        config = FewShotConfig(
            data=str(root / "data"), out=str(root / "run"), method="fewshot-local-prototype", epochs=3,
            steps_per_epoch=100, lr=2e-3, progress=False,
        )  # fmt: skip
        summary = train(config)
    finally:
        torch.set_num_threads(threads)
    return summary, root


def test_training_writes_a_self_describing_checkpoint(trained):
    from medsight.engine import checkpoint

    summary, root = trained
    for name in ("best.pt", "last.pt"):
        payload = checkpoint.load(root / "run" / name)
        assert payload["task"] == "fewshot" and payload["model"]["kind"] == "fewshot-2d"
        assert (
            payload["model"]["name"] == "fewshot-local-prototype"
            and payload["model"]["head"] == "local-prototype"
        )
        assert payload["preprocessing"]["size"] == [64, 64] and payload["preprocessing"]["slice_axis"] == 2
        assert payload["preprocessing"]["normalisation"]["name"] == "percentile-zscore"
    # 300 steps as 3 epochs of 100; one of the four volumes is held out for validation
    assert summary["steps"] == 300 and summary["episodes"] == 2400 and summary["epochs_run"] == 3
    assert summary["scans"] == 3 and len(summary["val_ids"]) == 1
    assert not set(summary["case_ids"]) & set(summary["val_ids"])
    lines = (root / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,val_episode_dice") and len(lines) == 1 + 3


def test_best_checkpoint_holds_the_weights_with_the_best_held_out_episode_dice(trained):
    """val_score is the mean Dice of the query predictions on superpixel episodes drawn once, with a
    fixed seed, from the held-out images; best.pt holds the weights (their average) that scored best.
    Recomputed here episode by episode from best.pt with numpy Dice."""
    from medsight.engine import checkpoint
    from medsight.tasks.fewshot import VALIDATION_STREAM, FewShotConfig, read_training_slices
    from medsight.tasks.fewshot_predict import FewShotPredictor

    summary, root = trained
    best = checkpoint.load(summary["best"])
    history = best["training"]["history"]
    top = max(history, key=lambda row: row["val_episode_dice"])
    assert best["training"]["best"] == pytest.approx(top["val_episode_dice"]) == summary["best_val_score"]
    assert best["training"]["epoch"] + 1 == top["epoch"]  # saved at the epoch that scored best
    held_out = read_training_slices(
        FewShotConfig(data=str(root / "data"), include_ids=best["data"]["val_ids"], progress=False)
    )
    sampler = EpisodeSampler(held_out.slices, held_out.bodies, np.random.default_rng([0, VALIDATION_STREAM]))
    s_img, s_mask, q_img, q_mask = (torch.from_numpy(a) for a in sampler.batch(best["data"]["val_episodes"]))
    model = FewShotPredictor(summary["best"]).model
    dice = []
    with torch.no_grad():
        for i in range(len(s_img)):
            cond = model.condition(s_img[i : i + 1, None], s_mask[i : i + 1, None])
            found = model.segment(q_img[i : i + 1], cond).argmax(1)[0].numpy() == 1
            truth = q_mask[i].numpy() == 1
            dice.append(2 * (found & truth).sum() / (found.sum() + truth.sum()))
    assert np.mean(dice) == pytest.approx(top["val_episode_dice"], abs=2e-3)


def test_slices_read_once_train_the_same_model(trained, tmp_path):
    """The benchmark reads the images once for three heads: that must not change what is learnt."""
    from medsight.engine import checkpoint
    from medsight.tasks.fewshot import FewShotConfig, read_training_slices, train

    _, root = trained
    weights = []
    for pre_read in (False, True):
        cfg = FewShotConfig(
            data=str(root / "data"), out=str(tmp_path / str(pre_read)), method="fewshot-prototype", epochs=1,
            steps_per_epoch=3, val_episodes=4, progress=False,
        )  # fmt: skip
        summary = train(cfg, read_training_slices(cfg) if pre_read else None)
        weights.append(checkpoint.load(summary["best"])["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(MedsightError, match="not the configured size"):
        train(FewShotConfig(data=cfg.data, out=str(tmp_path / "x"), size=32), read_training_slices(cfg))


@pytest.mark.slow
def test_resume_after_an_interruption_matches_an_unbroken_run(trained, tmp_path):
    """Weights, their average and the history after an interrupted run is resumed are those of an
    unbroken run; a resume with another option is refused before anything is read."""
    import signal

    from medsight.engine import checkpoint
    from medsight.tasks.fewshot import FewShotConfig, FewShotTask, train

    _, root = trained
    options = dict(data=str(root / "data"), method="fewshot-prototype", epochs=3, steps_per_epoch=2,
                   batch_size=2, val_episodes=4, ema_decay=0.9, progress=False)  # fmt: skip
    train(FewShotConfig(out=str(tmp_path / "a"), **options))

    class Interrupted(FewShotTask):
        def on_train_epoch_start(self):
            if self.current_epoch == 2:
                raise KeyboardInterrupt  # as Ctrl-C would, after two finished epochs
            super().on_train_epoch_start()

    handler = signal.getsignal(signal.SIGINT)
    try:
        from medsight.engine.loop import fit

        cfg = FewShotConfig(out=str(tmp_path / "b"), **options)
        with pytest.raises(KeyboardInterrupt):
            fit(Interrupted(cfg), cfg)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT once it has shut down
    assert len(checkpoint.load(tmp_path / "b" / "last.pt")["training"]["history"]) == 2
    with pytest.raises(MedsightError, match=r"other options \(--lr\)"):
        train(FewShotConfig(out=str(tmp_path / "b"), resume=True, **{**options, "lr": 0.01}))
    summary = train(FewShotConfig(out=str(tmp_path / "b"), resume=True, **options))
    assert summary["epochs_run"] == 3
    a, b = (checkpoint.load(tmp_path / run / "last.pt") for run in ("a", "b"))
    assert [row["val_episode_dice"] for row in a["training"]["history"]] == pytest.approx(
        [row["val_episode_dice"] for row in b["training"]["history"]]
    )
    for left, right in (
        (a["state_dict"], b["state_dict"]),
        (a["training"]["weights"], b["training"]["weights"]),
    ):
        for key in left:
            assert torch.allclose(left[key], right[key], atol=1e-5), key
    assert not all(torch.equal(a["state_dict"][k], a["training"]["weights"][k]) for k in a["state_dict"])


def test_one_shot_beats_chance_on_the_phantom(trained):
    from medsight.datasets.phantom import make_phantom_3d
    from medsight.evaluate import segmentation_metrics
    from medsight.tasks.fewshot_predict import FewShotPredictor

    predictor = FewShotPredictor(trained[0]["best"])
    dice, chance = [], []
    for seed in (100, 101, 102):
        support_image, support_label, _ = make_phantom_3d(seed + 50)
        query_image, query_label, _ = make_phantom_3d(seed)
        for value in (1, 2):  # the cyst (dark) and the vessel (bright), never labelled in training
            support_mask = support_label.with_array((support_label.array == value).astype(np.uint8))
            ref = query_label.array[0] == value
            z = np.flatnonzero(ref.any(axis=(0, 1)))
            mask = predictor.segment([(support_image, support_mask)], query_image, query_range=(z[0], z[-1]))
            assert mask.same_geometry(query_image) and mask.array.dtype == np.uint8
            dice.append(
                segmentation_metrics(mask.array[0], ref.astype(np.uint8), labels={1: "s"})["s"]["dice"]
            )
            # chance: as many voxels as the support mask, placed at random in the same query slices
            n_pred, n_ref, n_range = support_mask.array.sum(), ref.sum(), ref[..., z[0] : z[-1] + 1].size
            chance.append(2 * (n_pred * n_ref / n_range) / (n_pred + n_ref))
    assert np.mean(dice) > max(0.12, 10 * np.mean(chance)), (dice, chance)


def test_prepared_support_serves_many_queries(trained):
    from medsight.datasets.phantom import make_phantom_3d
    from medsight.tasks.fewshot_predict import FewShotPredictor

    predictor = FewShotPredictor(trained[0]["best"])
    support_image, support_label, _ = make_phantom_3d(60)
    support = [(support_image, support_label.with_array((support_label.array == 1).astype(np.uint8)))]
    prepared = predictor.prepare(support, chunks=2)
    assert len(prepared.conditions) == 2 and prepared.ranges[0][2] == support_image.spatial_shape[2]
    for seed in (61, 62):
        query, _, _ = make_phantom_3d(seed)
        once = predictor.segment(prepared, query, query_range=(3, 9))
        assert np.array_equal(
            once.array, predictor.segment(support, query, chunks=2, query_range=(3, 9)).array
        )
        assert not once.array[0, ..., :3].any() and not once.array[0, ..., 10:].any()  # outside the range
    # the ensemble averages the shots' probabilities: two copies of one shot give the one-shot mask
    query, _, _ = make_phantom_3d(61)
    one = predictor.segment(support, query, chunks=2).array
    assert np.array_equal(predictor.segment(support * 2, query, chunks=2, combine="ensemble").array, one)
    with pytest.raises(MedsightError, match="unknown k-shot combination 'vote'"):
        predictor.prepare(support, combine="vote")
    flat = Scan(np.zeros((1, 20, 20), np.float32), path="flat.png")
    with pytest.raises(MedsightError, match="differ in dimensionality"):
        predictor.prepare([*support, (flat, flat.with_array(np.ones((1, 20, 20), np.uint8)))])


def test_neighbouring_chunks_join_as_extra_shots(trained):
    """neighbours=1: a chunk's slices see the support slices of the chunks beside it, exactly as if
    those were extra shots of the plain protocol (fewer at the ends of the range)."""
    import dataclasses

    from medsight.datasets.phantom import make_phantom_3d
    from medsight.tasks.fewshot_predict import FewShotPredictor

    predictor = FewShotPredictor(trained[0]["best"])
    support_image, support_label, _ = make_phantom_3d(60)
    prepared = predictor.prepare(
        [(support_image, support_label.with_array((support_label.array == 1).astype(np.uint8)))], chunks=4
    )
    query, _, _ = make_phantom_3d(61)
    span = (2, 13)  # 12 query slices: chunk c holds slices 2 + 3c .. 4 + 3c
    got = predictor.segment(prepared, query, query_range=span, neighbours=1).array[0]

    def as_shots(chunk_ids):
        pooled = [cond for j in chunk_ids for cond in prepared.conditions[j]]
        plain = dataclasses.replace(prepared, conditions=[pooled] * prepared.chunks)
        return predictor.segment(plain, query, query_range=span, neighbours=0).array[0]

    for c, window in enumerate([[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]):
        members = slice(2 + 3 * c, 5 + 3 * c)
        assert np.array_equal(got[..., members], as_shots(window)[..., members]), c
    wide = predictor.segment(prepared, query, query_range=span, neighbours=9).array[0]
    assert np.array_equal(wide, as_shots(range(4)))
    with pytest.raises(MedsightError, match="neighbours must be >= 0"):
        predictor.segment(prepared, query, neighbours=-1)


def test_propagation_keeps_annotations_and_geometry(trained):
    from medsight.datasets.phantom import make_phantom_3d
    from medsight.tasks.fewshot_predict import FewShotPredictor

    predictor = FewShotPredictor(trained[0]["best"])
    image, label, _ = make_phantom_3d(7)
    cyst = label.array[0] == 1
    middle = int(np.flatnonzero(cyst.any(axis=(0, 1))).mean())
    partial = np.zeros_like(cyst)
    partial[..., middle] = cyst[..., middle]
    result = predictor.propagate(image, label.with_array(partial[None].astype(np.uint8)))
    assert result.same_geometry(image)
    assert np.array_equal(result.array[0, ..., middle] > 0, cyst[..., middle])
    filled = np.flatnonzero(result.array[0].any(axis=(0, 1)))
    assert np.all(np.diff(filled) == 1)  # stop_at_empty: one unbroken run of slices


# -- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_name_the_file(trained):
    from medsight.tasks.fewshot_predict import FewShotPredictor

    predictor = FewShotPredictor(trained[0]["best"])
    rng = np.random.default_rng(0)
    image = Scan(rng.random((1, 20, 20, 6)).astype(np.float32), path="sup.nii.gz")
    query = Scan(rng.random((1, 20, 20, 6)).astype(np.float32), path="query.nii.gz")
    mask = np.zeros((1, 20, 20, 6), np.uint8)
    with pytest.raises(MedsightError, match=r"mask\.nii\.gz: support mask is empty"):
        predictor.segment([(image, Scan(mask, path="mask.nii.gz"))], query)
    mask[0, 5:10, 5:10, 2:4] = 1
    with pytest.raises(MedsightError, match=r"query2\.nii\.gz: query has 2 channel"):
        predictor.segment(
            [(image, Scan(mask))], Scan(np.concatenate([query.array] * 2), path="query2.nii.gz")
        )
    with pytest.raises(MedsightError, match=r"small\.nii\.gz: mask shape \[20, 20, 5\] differs"):
        predictor.segment([(image, Scan(mask[..., :5], path="small.nii.gz"))], query)
    with pytest.raises(MedsightError, match="not a medsight checkpoint|no such checkpoint"):
        FewShotPredictor(trained[1] / "missing.pt")


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_fewshot_end_to_end(trained, tmp_path):
    from typer.testing import CliRunner

    from medsight import io
    from medsight.cli.main import app
    from medsight.datasets.phantom import make_phantom_3d
    from medsight.tasks.fewshot_predict import FewShotPredictor

    summary, _ = trained
    support, support_label, _ = make_phantom_3d(20)
    query, _, _ = make_phantom_3d(21)
    io.write(support, tmp_path / "s.nii.gz")
    io.write(
        support_label.with_array((support_label.array == 1).astype(np.uint8)), tmp_path / "s_mask.nii.gz"
    )
    io.write(query, tmp_path / "q.nii.gz")
    out = tmp_path / "out"
    args = ["fewshot", "--model", summary["best"], "--support", str(tmp_path / "s.nii.gz")]
    args += [str(tmp_path / "s_mask.nii.gz"), str(tmp_path / "q.nii.gz"), "-o", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    mask = io.read(out / "q.nii.gz")
    assert mask.same_geometry(query) and set(np.unique(mask.array)) <= {0, 1}

    again = CliRunner().invoke(app, args)  # the output exists and --overwrite is not given
    assert again.exit_code == 2 and "already exists" in again.output

    from skimage.measure import label as connected

    one_piece = CliRunner().invoke(app, [*args, "--largest-component", "--combine", "average", "--overwrite"])
    assert one_piece.exit_code == 0, one_piece.output
    assert connected(io.read(out / "q.nii.gz").array[0] > 0, connectivity=3).max() <= 1
    bad = CliRunner().invoke(app, [*args, "--combine", "vote", "--overwrite"])
    assert bad.exit_code == 2 and "unknown k-shot combination 'vote'" in bad.output
    plain = CliRunner().invoke(app, [*args, "--neighbours", "0", "--overwrite"])
    assert plain.exit_code == 0, plain.output
    pair = (io.read(tmp_path / "s.nii.gz"), io.read(tmp_path / "s_mask.nii.gz"))
    expected = FewShotPredictor(summary["best"]).segment([pair], io.read(tmp_path / "q.nii.gz"), neighbours=0)
    assert np.array_equal(io.read(out / "q.nii.gz").array, expected.array)
    assert CliRunner().invoke(app, [*args, "--neighbours", "-1", "--overwrite"]).exit_code == 2

    partial = np.zeros_like(support_label.array)
    middle = support_label.array.shape[-1] // 2
    partial[..., middle] = support_label.array[..., middle] > 0
    io.write(support_label.with_array(partial), tmp_path / "partial.nii.gz")
    run = CliRunner().invoke(
        app, ["fewshot", "-m", summary["best"], "--support", str(tmp_path / "s.nii.gz"),
              str(tmp_path / "partial.nii.gz"), "--propagate", "--largest-component", "-o", str(tmp_path / "prop")],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    propagated = io.read(tmp_path / "prop" / "s.nii.gz")
    assert propagated.same_geometry(support)
    assert (
        connected(propagated.array[0] > 0, connectivity=3).max() <= 1
    )  # --largest-component applies here too


def test_cli_fewshot_2d_and_bad_input(trained, tmp_path):
    from typer.testing import CliRunner

    from medsight import io
    from medsight.cli.main import app
    from medsight.datasets.phantom import make_phantom_2d

    summary, _ = trained
    image, label, _ = make_phantom_2d(1, shape=(48, 48))
    io.write(image, tmp_path / "img.png")
    io.write(label.with_array((label.array > 0).astype(np.uint8) * 255), tmp_path / "mask.png")
    io.write(label.with_array(np.zeros_like(label.array)), tmp_path / "empty.png")
    model = summary["best"]
    run = CliRunner().invoke(app, ["fewshot", "-m", model, "--support", str(tmp_path / "img.png"),
                                   str(tmp_path / "mask.png"), str(tmp_path / "img.png"), "-o", str(tmp_path / "o")])  # fmt: skip
    assert run.exit_code == 0, run.output
    written = io.read(tmp_path / "o" / "img.png")
    assert written.spatial_shape == (48, 48) and set(np.unique(written.array)) <= {0, 255}

    bad = CliRunner().invoke(app, ["fewshot", "-m", model, "--support", str(tmp_path / "img.png"),
                                   str(tmp_path / "empty.png"), str(tmp_path / "img.png"), "-o", str(tmp_path / "p")])  # fmt: skip
    assert bad.exit_code == 2 and "empty.png: support mask is empty" in bad.output
    missing = CliRunner().invoke(
        app, ["fewshot", "-m", model, "--support", str(tmp_path / "img.png"), "-o", "x"]
    )
    assert missing.exit_code == 2  # a support pair needs two paths


def test_k_shot_volumes_of_different_shapes(trained):
    from medsight.tasks.fewshot_predict import FewShotPredictor

    predictor = FewShotPredictor(trained[0]["best"])
    rng = np.random.default_rng(1)
    support = []
    for shape in ((20, 20, 6), (24, 18, 9)):
        mask = np.zeros((1, *shape), np.uint8)
        mask[0, 4:10, 4:10, 1:5] = 1
        support.append((Scan(rng.random((1, *shape)).astype(np.float32)), Scan(mask)))
    query = Scan(rng.random((1, 22, 26, 7)).astype(np.float32), np.diag([0.5, 0.5, 2.0, 1.0]))
    mask = predictor.segment(support, query, chunks=2)
    assert mask.same_geometry(query)


def test_shared_encoder_trains_every_head(tmp_path, trained):
    from medsight.datasets.phantom import make_phantom_3d, write_phantom_dataset
    from medsight.models.fewshot import HEADS, shared_heads
    from medsight.tasks.fewshot import FewShotConfig, train
    from medsight.tasks.fewshot_predict import FewShotPredictor

    write_phantom_dataset(tmp_path / "data", 2, seed=0)
    cfg = FewShotConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "run"),
        method="fewshot-shared",
        epochs=1,
        steps_per_epoch=3,
        val_episodes=4,
        progress=False,
    )
    summary = train(cfg)
    assert summary["heads"] == list(HEADS)
    torch.manual_seed(cfg.seed)  # the initial weights, built as training builds them
    initial = shared_heads(HEADS, {"in_channels": 1})
    image, label, _ = make_phantom_3d(5)
    support = [(image, label.with_array((label.array == 1).astype(np.uint8)))]
    for head in HEADS:
        predictor = FewShotPredictor(summary["best"], head=head)
        assert predictor.head == head
        changed = {
            name.split(".")[0]
            for name, value in predictor.model.state_dict().items()
            if not torch.equal(value, initial[head].state_dict()[name])
        }
        # every head's own part was trained, and so was the encoder they share
        assert "encoder" in changed and changed - {"encoder"}, (head, changed)
        assert predictor.segment(support, image).array.shape == label.array.shape
    assert FewShotPredictor(summary["best"]).head == "local-prototype"
    with pytest.raises(MedsightError, match="has no 'unet' head"):
        FewShotPredictor(summary["best"], head="unet")
    with pytest.raises(MedsightError, match="holds the 'local-prototype' head only"):
        FewShotPredictor(trained[0]["best"], head="conditional")
