"""The built-in prompt set of benchmark traces (``bench.traces``): short, varied, DiffusionDB-like.

``fresh_prompt(k)`` gives the k-th never-used prompt of a trace: the 50 subjects in a shuffled
order first, then the subjects again with one of the style suffixes, so a trace of a few hundred
requests repeats a prompt only when the trace's repetition knob asks for it.
"""

from __future__ import annotations

PROMPTS: tuple[str, ...] = (
    "a red fox standing in fresh snow at dawn",
    "a bowl of ramen on a wooden table, steam rising",
    "an astronaut riding a horse on the moon",
    "portrait of an old sailor with a white beard",
    "a lighthouse on a cliff during a storm",
    "a cozy reading nook with a cat asleep on a blanket",
    "a futuristic city skyline at night with flying cars",
    "a field of sunflowers under a blue sky",
    "a medieval castle on a hill surrounded by fog",
    "a close-up of a dew drop on a green leaf",
    "a vintage car parked on a cobblestone street",
    "a dragon curled around a mountain peak",
    "a plate of pancakes with berries and syrup",
    "a koi pond in a japanese garden in autumn",
    "an owl perched on a branch under a full moon",
    "a desert caravan of camels at sunset",
    "a robot watering plants in a greenhouse",
    "a snowy cabin in the woods with smoke from the chimney",
    "a bustling night market with lanterns",
    "an underwater coral reef with tropical fish",
    "a steaming cup of coffee next to an open book",
    "a waterfall in a lush rainforest",
    "a hot air balloon over rolling hills",
    "a fantasy library with floating books",
    "a golden retriever puppy playing in leaves",
    "a sailboat on a calm lake at sunrise",
    "a neon-lit alley in the rain",
    "a bowl of fresh fruit on a marble counter",
    "a mountain lake reflecting snowy peaks",
    "a vintage typewriter on a wooden desk",
    "a tiger resting in tall grass",
    "an ancient temple overgrown with vines",
    "a bicycle leaning against a brick wall with flowers",
    "a space station orbiting a blue planet",
    "a cup of tea in a sunlit kitchen",
    "a wolf howling on a ridge at night",
    "a colorful hot sauce market stall",
    "a pair of hiking boots on a mountain trail",
    "a fairy tale cottage with a thatched roof",
    "a jellyfish glowing in the deep sea",
    "a chess board mid-game by a window",
    "a bridge over a river in a misty forest",
    "a basket of baked bread in a bakery",
    "a penguin colony on an icy shore",
    "a watercolor painting of a harbor town",
    "a steam locomotive crossing a viaduct",
    "a hummingbird hovering near a red flower",
    "a candlelit dinner table set for two",
    "a giant tree house in an old oak",
    "a paper lantern festival over a river",
)
"""Fifty subjects; the order is shuffled per trace seed."""

STYLES: tuple[str, ...] = (
    "oil painting",
    "watercolor",
    "cinematic lighting",
    "pencil sketch",
    "studio photograph",
    "isometric illustration",
    "35mm film",
    "digital art",
)
"""Suffixes that make new prompts once the fifty subjects are used up."""


def fresh_prompt(k: int, order: list[int]) -> str:
    """The k-th new prompt of a trace; ``order`` is the trace's permutation of ``PROMPTS``."""
    subject = PROMPTS[order[k % len(PROMPTS)]]
    epoch = k // len(PROMPTS)
    if epoch == 0:
        return subject
    return f"{subject}, {STYLES[(epoch - 1) % len(STYLES)]}" + ("" if epoch <= len(STYLES) else f" #{epoch}")
