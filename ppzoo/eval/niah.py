"""Needle in a haystack (NIAH): can the model retrieve one fact planted anywhere in a long context?

A grid of context lengths x needle depths; each cell holds `trials` prompts (see ppzoo.data.needle: built
from the built-in corpus's validation split, a needle "The secret passphrase for the <key> is <value>." at
the depth, and the question at the end), each with its own random key and value (seeded per cell, so a
cell's cases do not change when other lengths or depths are added). The model continues each prompt
greedily for a few tokens; a trial counts when the continuation's first word is the value (exact match).
Values are 4-digit numbers by default; `value_kind="token"` asks for one number token in a digit-free
haystack instead, the single-hop version a tiny model can learn (see ppzoo.data.needle).

    result = evaluate_niah(model, tokenizer, lengths=[256, 512], depths=[0, 0.5, 1], trials=4, out_dir="out")

writes out/niah.json (settings, the accuracy grid and every trial) and out/niah.png (a heatmap). Prompts go
through Generator with chunked prefill, so even the longest never materializes a full seq x seq score
matrix, and Generator's context limit is lifted to the longest length: probing beyond the trained context
is the point.
"""
import json
import os
from collections import defaultdict

import numpy as np

from ppzoo.data.needle import Haystack, NeedleBuilder, is_correct
from ppzoo.errors import PpzooError

DEFAULT_LENGTHS = (256, 512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def build_grid(builder, lengths, depths, trials, seed=0):
    """The cases of the grid, in (length, depth, trial) order."""
    if trials < 1:
        raise PpzooError(f"trials must be at least 1, got {trials}")
    cases = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                # Keyed by the cell's values (not its index): the same cell gets the same cases in any grid.
                rng = np.random.default_rng([seed, int(length), int(round(depth * 1000)), trial])
                cases.append(builder.case(int(length), float(depth), rng))
    return cases


def run_cases(answer_fn, cases, batch_size=8):
    """Continuations of every case (answer_fn: list of token-id prompts -> list of strings). Cases of one
    length have prompts of one size, so they are batched together without padding."""
    by_length = defaultdict(list)
    for i, case in enumerate(cases):
        by_length[case.length].append(i)
    continuations = [None] * len(cases)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            for i, text in zip(batch, answer_fn([cases[i].prompt for i in batch])):
                continuations[i] = text
    return continuations


def summarize(cases, continuations, lengths, depths, settings=None):
    """The result dict: `accuracy[d][l]` for depths[d] x lengths[l], per-cell counts and every trial."""
    correct = defaultdict(int)
    total = defaultdict(int)
    trials = []
    for case, text in zip(cases, continuations):
        ok = is_correct(text, case.value)
        cell = (case.length, case.depth)
        correct[cell] += ok
        total[cell] += 1
        trials.append({"length": case.length, "depth": case.depth, "needle_depth": round(case.needle_depth, 4),
                       "key": case.key, "value": case.value, "continuation": text, "correct": bool(ok)})
    accuracy = [[correct[(int(l), float(d))] / max(total[(int(l), float(d))], 1) for l in lengths] for d in depths]
    per_length = {str(l): sum(correct[(int(l), float(d))] for d in depths) / max(sum(total[(int(l), float(d))] for d in depths), 1)
                  for l in lengths}
    return {
        "task": "niah",
        "settings": dict(settings or {}),
        "lengths": [int(l) for l in lengths],
        "depths": [float(d) for d in depths],
        "accuracy": accuracy,  # rows: depths, columns: lengths
        "per_length": per_length,
        "overall_accuracy": sum(correct.values()) / max(sum(total.values()), 1),
        "cells": [{"length": int(l), "depth": float(d), "correct": correct[(int(l), float(d))],
                   "trials": total[(int(l), float(d))]} for d in depths for l in lengths],
        "trials": trials,
    }


def markdown_table(result):
    """The accuracy grid as a markdown table (depths down, lengths across)."""
    lines = ["| depth \\ length | " + " | ".join(str(l) for l in result["lengths"]) + " |",
             "| --- |" + " --- |" * len(result["lengths"])]
    for depth, row in zip(result["depths"], result["accuracy"]):
        lines.append(f"| {depth:g} | " + " | ".join(f"{a:.2f}" for a in row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Heatmap

CELL_W, CELL_H = 84, 40
MARGIN_LEFT, MARGIN_TOP, MARGIN_RIGHT, MARGIN_BOTTOM = 96, 56, 24, 56


def heatmap_size(num_lengths, num_depths):
    """(width, height) in pixels of the heatmap of a grid."""
    return (MARGIN_LEFT + num_lengths * CELL_W + MARGIN_RIGHT, MARGIN_TOP + num_depths * CELL_H + MARGIN_BOTTOM)


def _accuracy_color(accuracy):
    """Red (0) through amber (0.5) to green (1)."""
    stops = [(0.0, (200, 50, 50)), (0.5, (235, 190, 70)), (1.0, (40, 160, 90))]
    for (a0, c0), (a1, c1) in zip(stops, stops[1:]):
        if accuracy <= a1:
            t = (accuracy - a0) / (a1 - a0)
            return tuple(int(round(x0 + t * (x1 - x0))) for x0, x1 in zip(c0, c1))
    return stops[-1][1]


def write_heatmap(result, path, title=None):
    """Draw the grid with Pillow: lengths across, depths down, each cell colored and labelled by accuracy."""
    from PIL import Image, ImageDraw, ImageFont

    lengths, depths = result["lengths"], result["depths"]
    image = Image.new("RGB", heatmap_size(len(lengths), len(depths)), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)  # Pillow >= 10.1 scales its built-in font
    except TypeError:
        font = ImageFont.load_default()

    def centered(x, y, text):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((x - (right - left) / 2, y - (bottom - top) / 2), text, fill="black", font=font)

    draw.text((8, 8), title or "needle in a haystack: exact-match accuracy", fill="black", font=font)
    draw.text((8, 26), "rows: needle depth, columns: context length (tokens)", fill="black", font=font)
    for row, (depth, accuracies) in enumerate(zip(depths, result["accuracy"])):
        y0 = MARGIN_TOP + row * CELL_H
        centered(MARGIN_LEFT / 2, y0 + CELL_H / 2, f"{depth:.0%}")
        for col, accuracy in enumerate(accuracies):
            x0 = MARGIN_LEFT + col * CELL_W
            draw.rectangle([x0, y0, x0 + CELL_W - 1, y0 + CELL_H - 1], fill=_accuracy_color(accuracy), outline="white")
            centered(x0 + CELL_W / 2, y0 + CELL_H / 2, f"{accuracy:.2f}")
    bottom = MARGIN_TOP + len(depths) * CELL_H
    for col, length in enumerate(lengths):
        centered(MARGIN_LEFT + col * CELL_W + CELL_W / 2, bottom + 12, str(length))
    centered(MARGIN_LEFT + len(lengths) * CELL_W / 2, bottom + 36, "context length (tokens)")
    image.save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------------
# Running a model


def generator_answer_fn(model, tokenizer, max_new_tokens=8, prefill_chunk=512, max_length=None):
    """answer_fn for run_cases: greedy continuations through Generator (KV cache, chunked prefill)."""
    from ppzoo.inference.generate import Generator, SamplingConfig

    generator = Generator(model, tokenizer, max_length=max_length, prefill_chunk=prefill_chunk)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    def answer(prompts):
        return generator.generate(prompts, sampling)

    return answer


def evaluate_niah(model, tokenizer, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, trials=5, seed=0,
                  prefill_chunk=512, max_new_tokens=8, batch_size=8, haystack_split="validation",
                  haystack_chars=None, value_kind="number", num_values=None, out_dir=None, settings=None,
                  title=None):
    """Run the grid on `model` (a causal LM, see Generator); returns the result dict, and with `out_dir`
    writes niah.json and niah.png there (their paths are in result["files"]). `value_kind`: see
    ppzoo.data.needle (number: 4-digit values; token: one number token in a digit-free haystack)."""
    lengths, depths = [int(l) for l in lengths], [float(d) for d in depths]
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise PpzooError(f"depths must lie within [0, 1], got {depths}")
    haystack = Haystack(tokenizer, haystack_split, haystack_chars, drop_digits=value_kind == "token")
    builder = NeedleBuilder(tokenizer, haystack, value_kind, num_values)
    cases = build_grid(builder, lengths, depths, trials, seed)
    # The model's own max_position_embeddings must not refuse the longer prompts: measuring what happens
    # beyond the trained context is what the grid is for.
    answer_fn = generator_answer_fn(model, tokenizer, max_new_tokens, prefill_chunk,
                                    max_length=max(lengths) + max_new_tokens)
    continuations = run_cases(answer_fn, cases, batch_size)
    settings = {"trials": trials, "seed": seed, "prefill_chunk": prefill_chunk, "max_new_tokens": max_new_tokens,
                "haystack_split": haystack_split, "haystack_chars": haystack_chars, "value_kind": value_kind,
                "num_values": num_values if value_kind == "token" else None,
                **(settings or {})}
    result = summarize(cases, continuations, lengths, depths, settings)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, "niah.json")
        png_path = os.path.join(out_dir, "niah.png")
        result["files"] = {"json": json_path, "png": png_path}
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        write_heatmap(result, png_path, title)
    return result
