import json
import math
import string
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.reward_model import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_DIR,
    VOCAB_FILE,
    PreferenceDataset,
    PreferenceRecord,
    RewardTrainConfig,
    ToyConvEncoder,
    attention_pool,
    build_reward_model,
    build_toyconv_model,
    choose_tie_threshold,
    coordinate_channels,
    evaluate_pairs,
    expected_calibration_error,
    images_to_tensor,
    label_from_votes,
    load_reward_model,
    log_loss,
    preference_loss,
    prompt_weights,
    read_reward_model_config,
    save_reward_model,
    score_images,
    split_by_prompt,
    split_three_ways,
    tie_aware_accuracy,
    train_reward_model,
    win_probability,
)
from worker.toy import world


@pytest.fixture(autouse=True)
def _one_thread():
    # The machine's cores are shared; one thread is also faster for these tiny convnets.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def test_loss_on_a_clear_win_is_softplus_of_minus_the_margin():
    # -log sigmoid(1 - 0) = log(1 + e^-1)
    loss = preference_loss(_t(1.0), _t(0.0), _t(1.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)


def test_tie_is_a_half_half_target():
    # 0.5 * log(1 + e^-1) + 0.5 * log(1 + e^1)
    loss = preference_loss(_t(1.0), _t(0.0), _t(0.5))
    expected = 0.5 * math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.e)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # A tie is best predicted by equal scores: ln 2, less than any unequal pair.
    assert preference_loss(_t(0.3), _t(0.3), _t(0.5)).item() == pytest.approx(math.log(2))
    assert loss.item() > math.log(2)


def test_several_votes_give_their_empirical_share():
    assert label_from_votes(2, 1) == pytest.approx(2 / 3)
    assert label_from_votes(1, 0, ties=1) == pytest.approx(0.75)
    assert label_from_votes(0, 0, ties=3) == 0.5
    with pytest.raises(ValueError):
        label_from_votes(0, 0)
    # Target (2/3, 1/3) at r0 - r1 = ln 2, i.e. p0 = 2/3: the cross-entropy is the entropy.
    loss = preference_loss(_t(math.log(2)), _t(0.0), _t(2 / 3))
    entropy = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    assert loss.item() == pytest.approx(entropy, abs=1e-12)


def test_prompt_weights_are_one_over_the_prompt_count_normalised_over_the_batch():
    prompts = ["a red circle", "a red circle", "a blue square"]
    weights = prompt_weights(prompts)
    assert weights.tolist() == pytest.approx([0.5, 0.5, 1.0])
    # Counts over the whole training set, not the batch.
    weights_ds = prompt_weights(prompts, {"a red circle": 4, "a blue square": 2})
    assert weights_ds.tolist() == pytest.approx([0.25, 0.25, 0.5])

    scores0, scores1 = _t(0.0, 2.0, 0.0), _t(0.0, 0.0, math.log(3))
    labels = _t(1.0, 0.0, 1.0)
    # Per-example losses: ln 2, log(1 + e^2), log(1 + 3); normalised weights 1/4, 1/4, 1/2.
    expected = 0.25 * math.log(2) + 0.25 * math.log(1 + math.e**2) + 0.5 * math.log(4)
    loss = preference_loss(scores0, scores1, labels, weights)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    # Only relative weights matter.
    assert preference_loss(scores0, scores1, labels, weights * 7).item() == pytest.approx(
        expected, abs=1e-7
    )
    # Unweighted: the plain mean.
    plain = (math.log(2) + math.log(1 + math.e**2) + math.log(4)) / 3
    assert preference_loss(scores0, scores1, labels).item() == pytest.approx(plain, abs=1e-12)


def test_loss_gradient_pushes_the_preferred_score_up():
    scores0 = _t(0.0, 0.0).requires_grad_(True)
    scores1 = _t(0.0, 0.0).requires_grad_(True)
    preference_loss(scores0, scores1, _t(1.0, 0.5)).backward()
    # d/dr0 of the mean loss = (p0 - label0) / B: -1/4 for the win, 0 for the tie.
    assert scores0.grad.tolist() == pytest.approx([-0.25, 0.0])
    assert scores1.grad.tolist() == pytest.approx([0.25, 0.0])


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

# p0 and labels (1: image0 preferred, 0: image1, 0.5: tie); |p0 - p1| = 0.8 0.1 0.1 0 0.6 0.2.
P0 = np.array([0.9, 0.55, 0.45, 0.5, 0.2, 0.6])
LABELS = np.array([1.0, 0.5, 0.5, 0.5, 1.0, 0.0])


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        # predictions 0 0 1 tie 1 0 -> credits 1 .5 .5 1 0 0
        (0.0, 3 / 6),
        # the two 0.1 margins become ties -> 1 1 1 1 0 0 (boundary counts as a tie)
        (0.1, 4 / 6),
        # the 0.2 margin too: tie against a win for image1 -> .5
        (0.2, 4.5 / 6),
        # the 0.6 margin too: tie against a win for image0 -> .5 instead of 0
        (0.6, 5 / 6),
        # everything a tie: 1 for the three tie labels, .5 for the others
        (1.0, 4.5 / 6),
    ],
)
def test_tie_aware_accuracy_hand_example(threshold, expected):
    assert tie_aware_accuracy(P0, LABELS, threshold) == pytest.approx(expected)


def test_tie_threshold_is_chosen_on_the_grid_smallest_best():
    t, acc = choose_tie_threshold(P0, LABELS)
    # 0.6 and 0.7 both reach 5/6; the smaller wins.
    assert (t, acc) == (0.6, pytest.approx(5 / 6))
    # Without ties in the labels, no tie prediction beats t = 0 on confident correct scores.
    t, acc = choose_tie_threshold(np.array([0.9, 0.2]), np.array([1.0, 0.0]))
    assert (t, acc) == (0.0, 1.0)


def test_soft_labels_count_by_their_majority():
    # 2/3 of votes for image0 is an image0 win for accuracy.
    assert tie_aware_accuracy(np.array([0.8]), np.array([2 / 3]), 0.0) == 1.0
    assert tie_aware_accuracy(np.array([0.8]), np.array([1 / 3]), 0.0) == 0.0


def test_win_probability_is_the_logistic_of_the_score_difference():
    p = win_probability(np.array([1.0, 0.0, 800.0]), np.array([0.0, 0.0, 0.0]))
    assert p.tolist() == pytest.approx([1 / (1 + math.exp(-1)), 0.5, 1.0])


def test_log_loss_hand_example():
    # (-ln 0.8 + ln 2) / 2: the tie's cross-entropy at p0 = 0.5 is ln 2.
    expected = (-math.log(0.8) + math.log(2)) / 2
    assert log_loss(np.array([0.8, 0.5]), np.array([1.0, 0.5])) == pytest.approx(expected)
    # Certainty in the wrong direction is clipped, not infinite.
    assert math.isfinite(log_loss(np.array([0.0]), np.array([1.0])))


def test_expected_calibration_error_hand_example():
    p0 = np.array([0.05, 0.15, 0.12, 0.95, 0.85])
    labels = np.array([0.0, 1.0, 0.0, 1.0, 0.5])
    # bin 0: |0.05 - 0| share 1/5; bin 1: |0.135 - 0.5| share 2/5; bin 8: |0.85 - 0.5| 1/5;
    # bin 9: |0.95 - 1| 1/5.
    expected = 0.2 * 0.05 + 0.4 * 0.365 + 0.2 * 0.35 + 0.2 * 0.05
    assert expected_calibration_error(p0, labels) == pytest.approx(expected)
    # p0 = 1.0 falls in the last bin; perfect calibration gives 0.
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0
    # Two bins: [0, 0.5) holds 0.05 and [0.5, 1] holds 0.95 and 0.85.
    two = expected_calibration_error(np.array([0.05, 0.95, 0.85]), np.array([0.0, 1.0, 1.0]), 2)
    assert two == pytest.approx(1 / 3 * 0.05 + 2 / 3 * 0.1)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_split_by_prompt_is_disjoint_complete_and_seeded():
    prompts = [f"prompt {i % 20}" for i in range(100)]
    train_idx, val_idx = split_by_prompt(prompts, 0.25, seed=3)
    train_prompts = {prompts[i] for i in train_idx}
    val_prompts = {prompts[i] for i in val_idx}
    assert not train_prompts & val_prompts
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(100))
    assert len(val_prompts) == 5  # a quarter of the 20 distinct prompts
    again = split_by_prompt(prompts, 0.25, seed=3)
    assert np.array_equal(again[1], val_idx)
    assert not np.array_equal(split_by_prompt(prompts, 0.25, seed=4)[1], val_idx)
    # Both sides keep at least one prompt even for extreme fractions.
    tr, va = split_by_prompt(["a", "b"], 0.99, seed=0)
    assert len(tr) == 1 and len(va) == 1
    with pytest.raises(ValueError):
        split_by_prompt(["a", "a"], 0.2, seed=0)
    with pytest.raises(ValueError):
        split_by_prompt(["a", "b"], 0.0, seed=0)


def test_three_way_split_is_disjoint_and_extends_the_two_way_one():
    prompts = [f"prompt {i % 20}" for i in range(100)]
    train, val, test = split_three_ways(prompts, 0.25, 0.2, seed=3)
    parts = [{prompts[i] for i in idx} for idx in (train, val, test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert [len(p) for p in parts] == [11, 5, 4]
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))
    # Without a test share it is the two-way split; the validation prompts do not move.
    assert np.array_equal(split_three_ways(prompts, 0.25, 0.0, 3)[1], val)
    assert np.array_equal(split_by_prompt(prompts, 0.25, 3)[1], val)
    assert len(split_three_ways(["a", "b", "c"], 0.1, 0.1, 0)[2]) == 1
    with pytest.raises(ValueError, match="3 distinct"):
        split_three_ways(["a", "b"], 0.2, 0.2, 0)
    with pytest.raises(ValueError, match="test_fraction"):
        split_three_ways(prompts, 0.5, 0.5, 0)


def test_records_are_validated():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        PreferenceRecord("p", image, image, 1.5)
    with pytest.raises(ValueError):
        PreferenceRecord("p", image[..., 0], image, 1.0)


def test_images_to_tensor_scales_and_resizes():
    small = np.full((8, 8, 3), 255, dtype=np.uint8)
    big = np.zeros((16, 12, 3), dtype=np.uint8)
    out = images_to_tensor([small, big])
    assert out.shape == (2, 3, 8, 8)
    assert out[0].min().item() == 1.0 and out[1].max().item() == 0.0
    assert images_to_tensor([small], size=4).shape == (1, 3, 4, 4)
    floats = np.full((8, 8, 3), 0.25, dtype=np.float32)
    assert images_to_tensor([floats])[0, 0, 0, 0].item() == 0.25


# --------------------------------------------------------------------------------------------
# Toy-world preference data
# --------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _size_pairs(prompts: list[str], per_prompt: int, rng: np.random.Generator) -> PreferenceDataset:
    """Noise-free: the image with the larger rendered size class wins; equal classes tie."""
    records = []
    for prompt in prompts:
        spec = world.parse_prompt(prompt)
        for _ in range(per_prompt):
            scenes = [world.resolve(spec, rng) for _ in range(2)]
            rank0, rank1 = (world.SIZES.index(s.spec.size) for s in scenes)
            label0 = 0.5 + 0.5 * float(np.sign(rank0 - rank1))
            images = [world.render_scene(s) for s in scenes]
            records.append(PreferenceRecord(prompt, images[0], images[1], label0))
    return PreferenceDataset(records)


# The simulated annotator's utility: colour fidelity to the prompt plus a taste for large shapes.
COLOUR_WEIGHT = 3.0
AREA_WEIGHT = 10.0


def _colour_pairs(
    prompts: list[str], per_prompt: int, rng: np.random.Generator
) -> tuple[PreferenceDataset, np.ndarray, np.ndarray]:
    """One noisy BT vote per pair; a toy generator gets the prompt's colour right half the time.

    Returns the data, the annotator's true P(image0 wins) and that probability from the area
    term alone (a prompt-blind judge).
    """
    records, p_true, p_area = [], [], []
    for prompt in prompts:
        spec = world.parse_prompt(prompt)
        for _ in range(per_prompt):
            scenes = []
            for _ in range(2):
                colour = spec.colour if rng.random() < 0.5 else str(rng.choice(world.COLOURS))
                scenes.append(world.resolve(replace(spec, colour=colour), rng))
            utility = [
                COLOUR_WEIGHT * (s.spec.colour == spec.colour) + AREA_WEIGHT * s.area
                for s in scenes
            ]
            p0 = _sigmoid(utility[0] - utility[1])
            label0 = float(rng.random() < p0)
            images = [world.render_scene(s) for s in scenes]
            records.append(PreferenceRecord(prompt, images[0], images[1], label0))
            p_true.append(p0)
            p_area.append(_sigmoid(AREA_WEIGHT * (scenes[0].area - scenes[1].area)))
    return PreferenceDataset(records), np.array(p_true), np.array(p_area)


def _disjoint_prompts(n: int, seed: int, exclude: set[str], mention: dict[str, float]) -> list[str]:
    return [p for p in dict.fromkeys(world.sample_prompts(n, seed, mention)) if p not in exclude]


@pytest.fixture(scope="module")
def small_toy_dataset() -> PreferenceDataset:
    prompts = sorted(set(world.sample_prompts(24, seed=5)))
    return _size_pairs(prompts, 2, np.random.default_rng(5))


# --------------------------------------------------------------------------------------------
# Toyconv training, persistence, scoring
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_noise_free_size_preference_reaches_90_percent_held_out():
    # Prompts leave the size open, so each pair shows a random size class on each side.
    mention = {"size": 0.0}
    rng = np.random.default_rng(0)
    prompts = sorted(set(world.sample_prompts(300, seed=1, mention=mention)))
    train = _size_pairs(prompts, 3, rng)
    test = _size_pairs(_disjoint_prompts(300, 2, set(prompts), mention), 2, rng)
    assert len(test) >= 200
    config = RewardTrainConfig(
        steps=300, batch_size=32, eval_every=50, patience=3, seed=0, restarts=1
    )
    result = train_reward_model(train, config)
    held_out = evaluate_pairs(result.model, test, result.tie_threshold)
    # Measured: ~99 % held-out tie-aware accuracy (a third of the pairs are ties).
    print(f"size preference: held-out tie-aware accuracy {held_out['accuracy']:.3f}")
    assert held_out["accuracy"] >= 0.90
    assert result.val_accuracy >= 0.90
    assert result.tie_threshold > 0.0  # same-size pairs are ties, so ties must be predicted


@pytest.mark.slow
@pytest.mark.long(110)
def test_noisy_colour_preference_is_learned_well_above_chance():
    mention = {"shape": 1.0, "colour": 1.0, "size": 0.0}
    rng = np.random.default_rng(0)
    prompts = sorted(set(world.sample_prompts(300, seed=1, mention=mention)))
    train, _, _ = _colour_pairs(prompts, 6, rng)
    test_prompts = _disjoint_prompts(300, 2, set(prompts), mention)
    test, p_true, p_area = _colour_pairs(test_prompts, 3, rng)
    assert len(test) >= 300
    # The test set is built separately here, so no prompts are held out for one inside. Single
    # noisy votes want a lower rate than the noise-free default (3e-3 measured 0.675 here).
    config = RewardTrainConfig(
        steps=500,
        batch_size=32,
        eval_every=50,
        patience=3,
        seed=0,
        test_fraction=0.0,
        learning_rate=1e-3,
        restarts=1,
    )
    result = train_reward_model(train, config)
    held_out = evaluate_pairs(result.model, test, result.tie_threshold)["accuracy"]
    oracle = tie_aware_accuracy(p_true, test.labels0, 0.0)
    prompt_blind = tie_aware_accuracy(p_area, test.labels0, 0.0)
    # Measured: model ~0.72 (pooled backbone ~0.77), the annotator's own probabilities ~0.80,
    # prompt-blind ~0.59,
    # chance 0.5 (no ties in these labels).
    print(
        f"colour preference: held-out {held_out:.3f}, oracle {oracle:.3f}, "
        f"prompt-blind {prompt_blind:.3f}"
    )
    assert held_out >= 0.70
    # Beating a size-only judge means the score depends on the prompt's colour word.
    assert held_out >= prompt_blind + 0.08


def test_restarts_keep_the_initialisation_with_the_best_validation_loss(small_toy_dataset):
    base = {"steps": 40, "batch_size": 16, "eval_every": 10, "patience": 2, "seed": 3}
    single = train_reward_model(small_toy_dataset, RewardTrainConfig(**base, restarts=1))
    calls: list[tuple[int, int, dict[str, float]]] = []
    three = train_reward_model(
        small_toy_dataset,
        RewardTrainConfig(**base, restarts=3),
        on_progress=lambda *a: calls.append(a),
    )
    assert len(three.restart_val_losses) == 3 and len(single.restart_val_losses) == 1
    # The first initialisation is the run without restarts, exactly; the kept one is the best.
    assert three.restart_val_losses[0] == single.val_loss
    assert three.val_loss == min(three.restart_val_losses)
    assert len(set(three.restart_val_losses)) == 3  # three different initialisations
    # Progress counts every restart's steps against the whole.
    assert all(total == 3 * base["steps"] for _, total, _ in calls)
    assert calls[-1][0] > 2 * base["steps"]
    # Defaults: three for a small model from scratch, one for a pretrained CLIP.
    assert RewardTrainConfig().resolved_restarts() == 3
    assert RewardTrainConfig(backbone="clip").resolved_restarts() == 1


def test_early_stopping_keeps_the_best_validation_state(small_toy_dataset):
    # Random labels: validation loss cannot keep improving, so training stops early.
    rng = np.random.default_rng(0)
    noisy = PreferenceDataset(
        [replace(r, label0=float(rng.integers(2))) for r in small_toy_dataset]
    )
    calls: list[tuple[int, int, dict[str, float]]] = []
    config = RewardTrainConfig(
        steps=400,
        batch_size=16,
        eval_every=5,
        patience=2,
        learning_rate=3e-3,
        val_fraction=0.3,
        seed=1,
        restarts=1,
    )
    result = train_reward_model(noisy, config, on_progress=lambda *a: calls.append(a))
    assert result.stopped_early and result.steps_run < config.steps
    assert [c[0] for c in calls] == list(range(5, result.steps_run + 1, 5))
    assert all(total == config.steps for _, total, _ in calls)
    assert [c[2] for c in calls] == result.history
    val_losses = [h["val_loss"] for h in result.history]
    assert result.val_loss == min(val_losses)
    assert result.best_step == result.history[int(np.argmin(val_losses))]["step"]
    # The returned model is the best one, not the last one.
    _, val = noisy.split_by_prompt(config.val_fraction, config.seed)
    assert evaluate_pairs(result.model, val)["loss"] == pytest.approx(result.val_loss, rel=1e-5)
    assert result.n_train + result.n_val + result.n_test == len(noisy)
    summary = json.loads(json.dumps(result.metrics()))
    assert summary["best_step"] == result.best_step and "model" not in summary
    # Test figures: the kept model on prompts neither trained nor validated on, at the
    # validation threshold.
    _, val_part, test_part = noisy.split_three_ways(
        config.val_fraction, config.test_fraction, config.seed
    )
    assert set(test_part.prompts).isdisjoint(val_part.prompts)
    assert result.n_test == len(test_part) > 0
    again = evaluate_pairs(result.model, test_part, result.tie_threshold)
    assert result.test_accuracy == pytest.approx(again["accuracy"])
    assert result.test_loss == pytest.approx(again["loss"], rel=1e-5)


@pytest.mark.parametrize("head", ["mlp", "cosine"])
def test_toyconv_save_load_round_trip_gives_identical_scores(small_toy_dataset, tmp_path, head):
    config = RewardTrainConfig(steps=6, batch_size=8, eval_every=3, head=head, seed=2)
    result = train_reward_model(small_toy_dataset, config)
    prompts = small_toy_dataset.prompts[:5]
    images = [r.image0 for r in small_toy_dataset.records[:5]]
    before = score_images(result.model, prompts, images)

    target = tmp_path / "rm"
    save_reward_model(result.model, target, config, result.metrics())
    assert {p.name for p in target.iterdir()} == {MODEL_FILE, CONFIG_FILE, VOCAB_FILE}
    saved = read_reward_model_config(target)
    assert saved["model"]["head"] == head
    assert saved["train_config"]["steps"] == 6
    assert saved["metrics"]["best_step"] == result.best_step
    loaded = load_reward_model(target, device=result.model.device)
    assert np.array_equal(score_images(loaded, prompts, images), before)

    # Saving again replaces the model in place and leaves no temporary directories.
    other = build_toyconv_model(["red"], head=head)
    save_reward_model(other, target)
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]
    assert load_reward_model(target).encoder.vocab == ["red"]


def test_score_images_batches_without_grad_and_keeps_the_mode(small_toy_dataset):
    model = build_reward_model(RewardTrainConfig(), small_toy_dataset.prompts)
    model.train()
    prompts = small_toy_dataset.prompts[:7]
    arrays = [r.image1 for r in small_toy_dataset.records[:7]]
    batched = score_images(model, prompts, arrays, batch_size=3)
    assert batched.shape == (7,) and batched.dtype == np.float32
    assert model.training
    tensor = images_to_tensor(arrays)
    assert np.allclose(score_images(model, prompts, tensor), batched, atol=1e-6)
    model.eval()
    with torch.no_grad():
        direct = model.score(prompts, tensor).numpy()
    assert np.allclose(direct, batched, atol=1e-6)
    with pytest.raises(ValueError):
        score_images(model, prompts[:2], arrays)


def test_unknown_words_and_empty_prompts_still_score(small_toy_dataset):
    model = build_reward_model(RewardTrainConfig(), ["a red circle"])
    images = [small_toy_dataset[0].image0] * 2
    scores = score_images(model, ["zzz qqq", ""], images)
    # Unknown words and the empty prompt both fall back to the reserved word slot 0.
    assert np.isfinite(scores).all()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="backbone"):
        build_reward_model(RewardTrainConfig(backbone="resnet"), ["a"])
    with pytest.raises(ValueError, match="backbone"):
        build_reward_model(RewardTrainConfig(backbone="no such backbone"), ["a"])
    with pytest.raises(ValueError, match="head"):
        build_reward_model(RewardTrainConfig(head="linear"), ["a"])


# --------------------------------------------------------------------------------------------
# CLIP backbone (tiny, random, built from a config)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    # Character-level BPE without merges: every word splits into letters, the last with "</w>".
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=48)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 48,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            # 24 px so that the 32 px toy images exercise the resize.
            "image_size": 24,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    CLIPImageProcessor(image_mean=mean, image_std=std).save_pretrained(path)
    return path


@pytest.mark.parametrize("head", ["cosine", "mlp"])
def test_tiny_clip_trains_scores_and_round_trips(small_toy_dataset, tiny_clip_dir, tmp_path, head):
    config = RewardTrainConfig(
        backbone=str(tiny_clip_dir),
        head=head,
        steps=4,
        batch_size=8,
        eval_every=2,
        learning_rate=1e-3,
        head_hidden=16,
        seed=0,
    )
    initial = build_reward_model(config, [])
    assert initial.encoder.image_mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    result = train_reward_model(small_toy_dataset, config)
    model = result.model
    assert model.backbone == "clip" and len(result.history) == 2
    # The whole CLIP is fine-tuned, not only the head.
    vision_key = "encoder.clip.visual_projection.weight"
    assert not torch.equal(model.state_dict()[vision_key].cpu(), initial.state_dict()[vision_key])

    prompts = small_toy_dataset.prompts[:6]
    images = [r.image0 for r in small_toy_dataset.records[:6]]
    scores = score_images(model, prompts, images, batch_size=4)
    assert scores.shape == (6,) and np.isfinite(scores).all()
    assert len(set(scores.round(6).tolist())) > 1

    save_reward_model(model, tmp_path / "clip-rm", config, result.metrics())
    assert (tmp_path / "clip-rm" / TOKENIZER_DIR).is_dir()
    loaded = load_reward_model(tmp_path / "clip-rm", device=model.device)
    assert np.array_equal(score_images(loaded, prompts, images, batch_size=4), scores)


def test_clip_training_lowers_the_loss_on_a_learnable_preference(tiny_clip_dir):
    # Brighter image wins: a few full-batch steps must lower the training loss.
    rng = np.random.default_rng(0)
    records = []
    for i in range(16):
        bright = rng.integers(150, 255, (32, 32, 3), dtype=np.uint8)
        dark = rng.integers(0, 100, (32, 32, 3), dtype=np.uint8)
        first_bright = bool(i % 2)
        pair = (bright, dark) if first_bright else (dark, bright)
        records.append(PreferenceRecord(f"prompt {i % 8}", *pair, float(first_bright)))
    config = RewardTrainConfig(
        backbone=str(tiny_clip_dir),
        steps=12,
        batch_size=12,
        eval_every=4,
        patience=10,
        learning_rate=3e-3,
        val_fraction=0.25,
    )
    result = train_reward_model(PreferenceDataset(records), config)
    first, last = result.history[0]["train_loss"], result.history[-1]["train_loss"]
    assert last < first


# --------------------------------------------------------------------------------------------
# The spatial toy backbone
# --------------------------------------------------------------------------------------------


def test_coordinate_channels_hand_values():
    grid = coordinate_channels(1, 2, 4, torch.device("cpu"))
    assert grid.shape == (1, 2, 2, 4)
    assert grid[0, 0, 0].tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])
    assert grid[0, 1, :, 0].tolist() == pytest.approx([-0.5, 0.5])


def test_attention_pool_hand_values():
    features = torch.tensor([[[1.0, 3.0], [0.0, 10.0]]])  # (1, 2 channels, 2 positions)
    pooled = attention_pool(features, torch.tensor([[0.0, math.log(3.0)]]))  # weights 1/4, 3/4
    assert pooled[0].tolist() == pytest.approx([2.5, 7.5])


def test_old_pooled_models_still_load(tmp_path):
    model = build_toyconv_model(["red", "left"], arch="pooled", embed_dim=32, head_hidden=64)
    save_reward_model(model, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / CONFIG_FILE).read_text())
    del config["model"]["arch"]  # as written before the spatial backbone existed
    (tmp_path / "rm" / CONFIG_FILE).write_text(json.dumps(config))
    loaded = load_reward_model(tmp_path / "rm")
    assert isinstance(loaded.encoder, ToyConvEncoder)
    image = world.render("a red circle", rng=0)
    assert np.array_equal(
        score_images(loaded, ["a red circle"], [image]),
        score_images(model, ["a red circle"], [image]),
    )
    with pytest.raises(ValueError, match="arch"):
        build_toyconv_model(["red"], arch="transformer")
