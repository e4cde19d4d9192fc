import numpy as np
import pytest

from worker.toy import world
from worker.toy.world import SceneSpec

NONE_NAMED = {k: 0.0 for k in ("shape", "colour", "size", "shade", "position", "background")}


def _random_scenes(n: int, seed: int) -> list[world.Scene]:
    rng = np.random.default_rng(seed)
    return [world.resolve(world.sample_spec(rng, NONE_NAMED), rng) for _ in range(n)]


def _accuracy(scenes: list[world.Scene], size: int, degrade_seed: int | None) -> dict[str, float]:
    rng = np.random.default_rng(degrade_seed)
    hits = {a: 0 for a in world.ATTRIBUTES}
    for scene in scenes:
        image = world.render_scene(scene, size)
        if degrade_seed is not None:
            image = world.degrade(image, rng)
        seen = world.describe(image)
        for attr in world.ATTRIBUTES:
            hits[attr] += getattr(seen, attr) == getattr(scene.spec, attr)
    return {a: h / len(scenes) for a, h in hits.items()}


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64])
def test_render_extract_round_trip(size: int) -> None:
    acc = _accuracy(_random_scenes(400, seed=size), size, degrade_seed=None)
    print(size, acc)
    assert acc["colour"] >= 0.99
    assert acc["shape"] >= 0.99
    for attr in ("size", "shade", "horizontal", "vertical", "background"):
        assert acc[attr] >= 0.97, attr


def test_extractors_survive_blur_and_noise() -> None:
    acc = _accuracy(_random_scenes(300, seed=7), 32, degrade_seed=3)
    print(acc)
    assert acc["colour"] >= 0.99
    assert acc["shape"] >= 0.95
    assert acc["size"] >= 0.95


def test_render_shape_and_dtype() -> None:
    for size in (32, 64):
        image = world.render("a red circle", 0, size=size)
        assert image.shape == (size, size, 3)
        assert image.dtype == np.uint8


def test_render_is_deterministic_for_a_seed() -> None:
    a = world.render("a small blue square", rng=5)
    b = world.render("a small blue square", rng=5)
    c = world.render("a small blue square", rng=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_prompts_seeded() -> None:
    assert world.sample_prompts(20, seed=1) == world.sample_prompts(20, seed=1)
    assert world.sample_prompts(20, seed=1) != world.sample_prompts(20, seed=2)


def test_parse_prompt_examples() -> None:
    assert world.parse_prompt("a large red circle") == SceneSpec(
        shape="circle", colour="red", size="large", shade="plain"
    )
    assert world.parse_prompt("a small dark blue square on the left") == SceneSpec(
        shape="square", colour="blue", size="small", shade="dark", horizontal="left"
    )
    assert world.parse_prompt("a light green cross at the top right on a black background") == (
        SceneSpec(
            shape="cross",
            colour="green",
            shade="light",
            horizontal="right",
            vertical="top",
            background="black",
        )
    )
    assert world.parse_prompt("a yellow triangle in the center") == SceneSpec(
        shape="triangle", colour="yellow", shade="plain", horizontal="center", vertical="middle"
    )
    assert world.parse_prompt("a shape at the bottom") == SceneSpec(vertical="bottom")
    # A neutral word before "background" is the background, not a colour.
    assert world.parse_prompt("a purple circle on a white background").background == "white"


def test_format_then_parse_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = world.sample_spec(rng)
        assert world.parse_prompt(world.format_prompt(spec)) == spec


def test_vocabulary_covers_sampled_prompts() -> None:
    vocab = set(world.vocabulary())
    for prompt in world.sample_prompts(300, seed=3):
        assert set(prompt.split()) <= vocab, prompt


def test_rendered_image_has_prompted_attributes() -> None:
    prompt = "a large dark purple triangle at the bottom left on a white background"
    image = world.render(prompt, rng=0)
    assert world.attribute_matches(prompt, image) == {
        "shape": True,
        "colour": True,
        "size": True,
        "shade": True,
        "horizontal": True,
        "vertical": True,
        "background": True,
    }
    assert world.prompt_alignment(prompt, image) == 1.0
    # The same image judged against a different prompt fails the attributes that differ.
    matches = world.attribute_matches("a small red circle", image)
    assert matches == {"shape": False, "colour": False, "size": False, "shade": False}


def test_area_fraction_and_centroid_follow_the_scene() -> None:
    scene = world.resolve(
        SceneSpec("square", "red", "large", "plain", "right", "top", "black"),
        np.random.default_rng(0),
    )
    image = world.render_scene(scene, 64)
    assert world.extract_area_fraction(image) == pytest.approx(scene.area, rel=0.05)
    cx, cy = world.extract_centroid(image)
    assert cx == pytest.approx(scene.cx, abs=0.02)
    assert cy == pytest.approx(scene.cy, abs=0.02)


def test_blank_image_has_no_foreground() -> None:
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert world.extract_colour(blank) is None
    assert world.extract_shape(blank) is None
    assert world.extract_area_fraction(blank) == 0.0
    assert world.extract_background(blank) == "gray"


def test_demo_prompts_are_canonical_toy_prompts() -> None:
    # app.demo writes its prompts out (the web imports nothing from worker/): each must be a
    # prompt of the grammar, in the form the toy models were trained on.
    from app.demo import DEMO_TEST_PROMPTS, DEMO_TRAIN_PROMPTS

    prompts = [*DEMO_TRAIN_PROMPTS, *DEMO_TEST_PROMPTS]
    assert len(set(prompts)) == len(prompts)
    for text in prompts:
        assert world.format_prompt(world.parse_prompt(text)) == text
